"""Fit the influence engine on real data with the bundled SmolLM2-135M and show what it picks.

Fits the curvature on the first ``--rows`` rows of a candidate pool, targets the first ``--target-rows``
rows of a target set, prints the sizing table and the top-scored candidates with their ``source``.

    python scripts/engine_real_input.py \
        --pool ../shared/data/pool_small.jsonl --target ../shared/data/targets/gsm8k.jsonl
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from hfinfluence import Influence, InfluenceConfig
from hfinfluence.data import CausalCollator, format_prompt_completion, load_dataset_any
from hfinfluence.models import load_model_and_tokenizer


def batches_of(dataset, tokenizer, *, max_length: int, batch_size: int) -> list[dict]:
    formatter = format_prompt_completion(tokenizer, max_length=max_length)
    rows = [formatter(row) for row in dataset]
    collate = CausalCollator(tokenizer)
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", required=True, help="candidate jsonl with prompt/completion/source")
    parser.add_argument("--target", required=True, help="target jsonl with prompt/completion")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--target-rows", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--sketch", default="gaussian")
    parser.add_argument("--epsilon", type=float, default=InfluenceConfig.epsilon)
    parser.add_argument("--sketch-budget", type=int, default=InfluenceConfig.sketch_budget)
    parser.add_argument(
        "--delta", type=float, default=InfluenceConfig.delta, help="the sizing rule's δ (1: no log term)"
    )
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer()
    pool = load_dataset_any(args.pool).select(range(args.rows))
    target = load_dataset_any(args.target).select(range(args.target_rows))
    candidates = batches_of(pool, tokenizer, max_length=args.max_length, batch_size=args.batch_size)
    targets = batches_of(target, tokenizer, max_length=args.max_length, batch_size=args.batch_size)
    loaded = time.perf_counter()

    config = InfluenceConfig(
        sketch=args.sketch, epsilon=args.epsilon, sketch_budget=args.sketch_budget, delta=args.delta
    )
    engine = Influence(model, config)
    engine.fit(candidates)
    fitted = time.perf_counter()
    engine.set_target(targets)
    scores = torch.cat([engine.score(batch) for batch in candidates])
    scored = time.perf_counter()

    print(engine.sizing())
    print(engine.memory_plan(batch_size=args.batch_size, tokens=args.max_length))
    print(f"\ntop {args.top} of {len(scores)} candidates for {os.path.basename(args.target)}:")
    for rank, index in enumerate(scores.argsort(descending=True)[: args.top].tolist(), start=1):
        row = pool[index]
        snippet = " ".join(row["prompt"].split())[:70]
        print(f"{rank}. score {scores[index]:+.4g}  source={row['source']:<22} {snippet}")
    share = sum(pool[i]["source"] == "gsm8k" for i in range(len(pool))) / len(pool)
    print(f"\n(gsm8k rows in the fitted pool: {share:.0%})")
    print(
        f"wall time: load {loaded - start:.1f} s, fit {fitted - loaded:.1f} s, "
        f"target + score {scored - fitted:.1f} s, total {scored - start:.1f} s"
    )


if __name__ == "__main__":
    main()
