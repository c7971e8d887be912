"""Validation tuner for the damping λ: the linear datamodeling score (LDS) of each λ, by retraining on subsets.

For users who can afford a few dozen retrains of a small model (ALGORITHMS.md §8). A tiny Llama built from a
config (the SmolLM2 tokenizer, its vocabulary cut to the tokens the data uses) is warmed up on pool rows that are
not in the training set; that warmed-up model is then fine-tuned on ``--subsets`` random halves S_j of the
training set, each time from the same weights, with the same hyperparameters and batch order. For every
curvature / damping setting the engine scores the training rows against each target row — at the warmed-up
model (``--score-at start``, default: the model the fine-tuning starts from) or at the model fine-tuned on the
whole training set (``final``) — and

    LDS = mean over targets t of Spearman_j( Σ_{i ∈ S_j} score(i, t),  −loss_t(θ_{S_j}) )

(positive scores predict a lower target loss, so a good λ gives a high LDS). Settings: exact K-FAC
(``sketch="none"``) at ``damping_factor`` × the mean eigenvalue for each factor of ``--factors``, the sketched
default with each ``--budgets`` value (λ and m chosen together), EK-FAC and plain gradient products.

    python scripts/tune_damping.py                      # ~10 min on 2 busy CPU cores

Data paths default to ``../shared/data`` relative to the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from hfinfluence import Influence, InfluenceConfig
from hfinfluence.data import CausalCollator, format_prompt_completion, load_dataset_any
from hfinfluence.losses import per_example_loss
from hfinfluence.models import load_model_and_tokenizer, tiny_llama

DATA = "../shared/data"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default=f"{DATA}/pool_small.jsonl")
    parser.add_argument("--targets", nargs="+", default=[f"{DATA}/targets/gsm8k.jsonl", f"{DATA}/targets/sciq.jsonl"])
    parser.add_argument("--train", type=int, default=128, help="training rows drawn from the pool")
    parser.add_argument("--warmup-rows", type=int, default=256, help="other pool rows for the shared warm-up")
    parser.add_argument("--targets-per-file", type=int, default=8)
    parser.add_argument("--subsets", type=int, default=48)
    parser.add_argument("--alpha", type=float, default=0.5, help="fraction of the training rows in each subset")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs on a subset / the training set")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--retrain-seeds", type=int, default=1, help="batch orders averaged per subset")
    parser.add_argument(
        "--score-at",
        choices=("final", "start"),
        default="start",
        help="score at the model fine-tuned on the whole training set (final) or at the warmed-up start",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--factors", default="0.001,0.01,0.1,1,10,100", help="damping_factor grid (exact K-FAC)")
    parser.add_argument("--budgets", default="32,64", help="sketch_budget values of the sketched default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="docs/faithfulness/tune_damping.json")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data


def sample_rows(path: str, count: int, rng: random.Random) -> list[dict]:
    dataset = load_dataset_any(path)
    return [dataset[i] for i in rng.sample(range(len(dataset)), min(count, len(dataset)))]


def compact_vocabulary(rows: list[dict], special_ids: list[int]) -> dict[int, int]:
    """Map the token ids that occur (plus the special tokens) onto 0 … V-1."""
    used = sorted({t for row in rows for t in row["input_ids"]} | set(special_ids))
    return {token: index for index, token in enumerate(used)}


def remap(rows: list[dict], vocabulary: dict[int, int]) -> list[dict]:
    return [
        {
            "input_ids": [vocabulary[t] for t in row["input_ids"]],
            "labels": [-100 if t == -100 else vocabulary[t] for t in row["labels"]],
        }
        for row in rows
    ]


def prepare_data(args) -> tuple[dict[str, list[dict]], int, int, list[str]]:
    """Formatted rows (train, warm-up, targets) in the compact vocabulary, its size, the pad id and target ids."""
    _, tokenizer = load_model_and_tokenizer()
    rng = random.Random(args.seed)
    pool = sample_rows(args.pool, args.train + args.warmup_rows, rng)
    targets = [row for path in args.targets for row in sample_rows(path, args.targets_per_file, rng)]
    formatter = format_prompt_completion(tokenizer, max_length=args.max_length)
    formatted = {
        "train": [formatter(r) for r in pool[: args.train]],
        "warmup": [formatter(r) for r in pool[args.train :]],
        "targets": [formatter(r) for r in targets],
    }
    specials = [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id]
    vocabulary = compact_vocabulary([r for rows in formatted.values() for r in rows], [s for s in specials if s])
    data = {key: remap(rows, vocabulary) for key, rows in formatted.items()}
    return data, len(vocabulary), vocabulary[tokenizer.pad_token_id], [row["id"] for row in targets]


def batches_of(rows: list[dict], pad_id: int, batch_size: int) -> list[dict]:
    collate = CausalCollator(SimpleNamespace(pad_token_id=pad_id))
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


# ---------------------------------------------------------------------------------------------- training


def train(model, rows: list[dict], args, *, pad_id: int, epochs: int, seed: int) -> None:
    """AdamW or SGD on the summed per-example losses / batch size, batch order fixed by ``seed``."""
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    order = random.Random(seed)
    model.train()
    for _ in range(epochs):
        shuffled = rows[:]
        order.shuffle(shuffled)
        for batch in batches_of(shuffled, pad_id, args.batch_size):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = per_example_loss(logits, batch["labels"]).sum() / len(batch["input_ids"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def target_losses(model, batches: list[dict]) -> torch.Tensor:
    losses = [
        per_example_loss(model(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits, b["labels"])
        for b in batches
    ]
    return torch.cat(losses)


def retrain(initial: dict, build, rows: list[dict], args, *, pad_id: int, targets: list[dict]) -> torch.Tensor:
    """Target losses [n_targets] after fine-tuning copies of the warmed-up weights on ``rows``, averaged over
    ``--retrain-seeds`` batch orders."""
    losses = []
    for offset in range(args.retrain_seeds):
        model = build()
        model.load_state_dict(initial)
        train(model, rows, args, pad_id=pad_id, epochs=args.epochs, seed=args.seed + 1 + offset)
        losses.append(target_losses(model, targets))
    return torch.stack(losses).mean(0)


# ---------------------------------------------------------------------------------------------- scores and LDS


def settings(args) -> dict[str, InfluenceConfig]:
    exact = {"sketch": "none", "sketch_budget": None}
    configs = {f"kfac@{f:g}": InfluenceConfig(damping_factor=f, **exact) for f in map(float, args.factors.split(","))}
    for budget in (int(b) for b in args.budgets.split(",") if b):
        configs[f"kfac, sketch_budget={budget}"] = InfluenceConfig(sketch_budget=budget)
    configs["ekfac@0.1"] = InfluenceConfig(curvature="ekfac", **exact)
    configs["identity"] = InfluenceConfig(curvature="identity", **exact)
    return configs


def score_all(model, train_batches, target_batches, configs) -> dict[str, torch.Tensor]:
    """Pairwise scores [n_train, n_targets] of every setting at the model trained on the whole training set."""
    scores = {}
    for name, config in configs.items():
        engine = Influence(model, config).fit(train_batches)
        scores[name] = engine.pairwise(train_batches, target_batches).double()
    return scores


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Rank correlation along dim 0 for each column."""
    rx, ry = (v.argsort(0).argsort(0).double() for v in (x, y))
    rx, ry = rx - rx.mean(0), ry - ry.mean(0)
    return (rx * ry).sum(0) / (rx.norm(dim=0) * ry.norm(dim=0))


def lds(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> dict:
    """LDS from scores [n_train, n_t], subset masks [M, n_train] and retrained target losses [M, n_t]."""
    predicted = masks.double() @ scores
    per_target = spearman(predicted, -losses)
    return {"lds": float(per_target.mean()), "lds_per_target_min": float(per_target.min())}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["HFINFLUENCE_PROGRESS"] = "0"
    clock = time.perf_counter()
    data, vocab_size, pad_id, target_ids = prepare_data(args)

    def build():
        return tiny_llama(
            vocab_size,
            hidden=args.hidden,
            layers=args.layers,
            intermediate=2 * args.hidden,
            max_positions=args.max_length,
            seed=args.seed,
        )

    model = build()
    train(model, data["warmup"], args, pad_id=pad_id, epochs=1, seed=args.seed)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    target_batches = batches_of(data["targets"], pad_id, args.batch_size)
    warm_loss = float(target_losses(model, target_batches).mean())
    train_batches = batches_of(data["train"], pad_id, args.batch_size)
    if args.score_at == "start":
        scores = score_all(model, train_batches, target_batches, settings(args))
    train(model, data["train"], args, pad_id=pad_id, epochs=args.epochs, seed=args.seed + 1)
    full_loss = float(target_losses(model, target_batches).mean())
    if args.score_at == "final":
        scores = score_all(model, train_batches, target_batches, settings(args))
    scored = time.perf_counter()

    rng = torch.Generator().manual_seed(args.seed)
    size = round(args.alpha * len(data["train"]))
    masks = torch.zeros(args.subsets, len(data["train"]), dtype=torch.bool)
    losses = []
    for j in range(args.subsets):
        chosen = torch.randperm(len(data["train"]), generator=rng)[:size]
        masks[j, chosen] = True
        rows = [data["train"][i] for i in sorted(chosen.tolist())]
        losses.append(retrain(initial, build, rows, args, pad_id=pad_id, targets=target_batches))
    losses = torch.stack(losses).double()
    results = {name: lds(s, masks, losses) for name, s in scores.items()}
    report = {
        "command": "python " + " ".join(sys.argv),
        "args": vars(args),
        "vocabulary": vocab_size,
        "target_ids": target_ids,
        "target_loss": {
            "warm_up": warm_loss,
            "fine_tuned_on_train": full_loss,
            "subsets_mean": float(losses.mean()),
            "subsets_sd_across_subsets": float(losses.std(0).mean()),
        },
        "lds": results,
        "wall_seconds": {"scores": round(scored - clock, 1), "total": round(time.perf_counter() - clock, 1)},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(f"| setting | LDS (mean over {len(target_ids)} targets) | min over targets |\n|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['lds']:.3f} | {row['lds_per_target_min']:.3f} |")
    best = max((n for n in results if n.startswith("kfac@")), key=lambda n: results[n]["lds"])
    print(f"\nbest exact K-FAC damping: {best}; target loss {report['target_loss']}; wall {report['wall_seconds']} s")
    print(f"per-subset spread of target losses (mean sd): {statistics.fmean(losses.std(0).tolist()):.4f}")


if __name__ == "__main__":
    main()
