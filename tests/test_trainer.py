"""InfluenceTrainer end to end on a tiny Llama and real demo rows (GSM8K + P3), one process."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from trainer_setup import demo_datasets, demo_tokenizer, make_args, make_trainer, tiny_model

from hfinfluence import Influence
from hfinfluence.data import CausalCollator
from hfinfluence.errors import ConfigError, EmptyInputError, MissingColumnError
from hfinfluence.losses import per_example_loss
from hfinfluence.trainer import InfluenceTrainer, InfluenceTrainingArguments

torch.set_num_threads(1)  # tiny models: threads only add contention on a shared 2-core machine


def parameters(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def logged(trainer, key: str) -> list[float]:
    return [row[key] for row in trainer.state.log_history if key in row]


def collate(trainer, indices: list[int]) -> dict:
    return CausalCollator(demo_tokenizer())([trainer.train_dataset[i] for i in indices])


# ---------------------------------------------------------------------- modes


@pytest.mark.parametrize("selection", ["filter", "reweight", "off"])
def test_each_selection_mode_trains_logs_and_repeats(tmp_path, selection):
    histories = []
    for attempt in range(2):
        model = tiny_model()
        before = parameters(model)
        trainer = make_trainer(tmp_path / str(attempt), model=model, selection=selection)
        trainer.train()
        assert any(not torch.equal(a, b) for a, b in zip(before, parameters(model), strict=True))
        histories.append(trainer.selection_history)

    assert histories[0] == histories[1]
    assert len(histories[0]) == 4
    kept = logged(trainer, "select/kept_fraction")
    assert len(kept) == 4 and all(k == {"filter": 0.25, "reweight": 1.0, "off": 1.0}[selection] for k in kept)
    assert len(logged(trainer, "select/examples_seen")) == 4
    if selection == "off":
        assert not logged(trainer, "influence/score_mean")
        assert all(len(record["index"]) == 2 for record in histories[0])
    else:
        for key in ("influence/score_mean", "influence/score_std", "influence/damping", "select/effective_fraction"):
            assert len(logged(trainer, key)) == 4 and all(math.isfinite(v) for v in logged(trainer, key))
        assert len(logged(trainer, "select/kept/gsm8k")) == 4
        # the seed check measured the first curvature and was dropped at the first refresh, its value kept
        assert trainer.engine.shadow is None and trainer.engine.seed_check is not None
        assert len(logged(trainer, "influence/seed_spearman")) == 4
        assert all(len(record["index"]) == 8 for record in histories[0])
    if selection == "reweight":
        for record in histories[0]:
            weights = torch.tensor(record["weight"])
            assert (weights >= 0).all() and weights.mean().item() == pytest.approx(1.0)
            assert weights.std() > 0


def test_off_sees_the_same_data_order_as_filter(tmp_path):
    """The baseline trains on the stream the selecting run draws its buffers from, in the same order."""
    off = make_trainer(tmp_path / "off", selection="off", max_steps=8)
    off.train()
    filtering = make_trainer(tmp_path / "filter", selection="filter", max_steps=2)
    filtering.train()
    seen_off = [i for record in off.selection_history for i in record["index"]]
    seen_filter = [i for record in filtering.selection_history for i in record["index"]]
    assert seen_off == seen_filter and len(set(seen_off)) == 16


def test_off_with_score_baseline_logs_scores_without_selecting(tmp_path):
    trainer = make_trainer(tmp_path, selection="off", score_baseline=True)
    trainer.train()
    assert all(record["weight"] == [1.0, 1.0] for record in trainer.selection_history)
    assert len(logged(trainer, "influence/score_mean")) == 4


def test_boltzmann_is_seeded_and_differs_from_top_k(tmp_path):
    runs = {}
    for name, method in (("a", "boltzmann"), ("b", "boltzmann"), ("top", "top_k")):
        trainer = make_trainer(tmp_path / name, selection_method="boltzmann" if method == "boltzmann" else "top_k")
        trainer.train()
        runs[name] = [record["weight"] for record in trainer.selection_history]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["top"]
    assert all(sum(weights) == 2 for weights in runs["a"])


# ---------------------------------------------------------------------- what one step computes


@pytest.mark.parametrize(
    "selection, training_pass, accumulation",
    [("filter", "retained", 1), ("filter", "recompute", 1), ("reweight", "retained", 1), ("filter", "retained", 2)],
)
def test_one_step_scores_and_update_match_independent_references(tmp_path, selection, training_pass, accumulation):
    """Scores equal `Influence.score` on a fresh engine; the SGD update equals the weighted token-mean loss's."""
    model = tiny_model()
    reference = copy.deepcopy(model)
    trainer = make_trainer(
        tmp_path,
        model=model,
        selection=selection,
        training_pass=training_pass,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    trainer.train()
    records = trainer.selection_history
    assert len(records) == accumulation and all(record["step"] == 0 for record in records)

    engine = Influence(copy.deepcopy(reference), trainer.args.influence_config())
    engine.fit([collate(trainer, records[0]["index"])])
    engine.set_target(trainer.target_batches())
    expected = engine.score(collate(trainer, records[0]["index"])).double()
    torch.testing.assert_close(torch.tensor(records[0]["score"], dtype=torch.float64), expected, rtol=1e-9, atol=1e-9)
    if selection == "filter":
        kept = torch.tensor(records[0]["weight"]).nonzero().flatten()
        assert set(kept.tolist()) == set(expected.topk(2).indices.tolist())

    loss = 0.0
    for record in records:  # each micro-step: Σ w · token loss / Σ w · labelled tokens, averaged over micro-steps
        batch = collate(trainer, record["index"])
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        token_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        weights = torch.tensor(record["weight"], dtype=torch.float64)[:, None]
        loss = loss + (weights * token_loss).sum() / (weights * (labels != -100)).sum() / accumulation
    loss.backward()
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.detach(), p.detach() - 0.5 * p.grad, rtol=1e-9, atol=1e-11)


def test_warmup_then_fit_and_refresh_schedule(tmp_path, monkeypatch):
    calls = []
    for method in ("fit", "set_target", "refresh_curvature"):
        original = getattr(Influence, method)

        def spy(self, *args, _original=original, _name=method, **kwargs):
            calls.append((_name, trainer.state.global_step))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Influence, method, spy)
    trainer = make_trainer(
        tmp_path, selection_warmup_steps=2, curvature_refresh_steps=2, target_refresh_steps=3, max_steps=8
    )
    trainer.train()

    assert calls == [
        ("fit", 2),
        ("set_target", 2),
        ("refresh_curvature", 4),
        ("set_target", 5),
        ("refresh_curvature", 6),
    ]
    warmup = trainer.selection_history[:2]
    assert all(record["weight"] == [1, 1, 0, 0, 0, 0, 0, 0] for record in warmup)
    assert all(score is None for record in warmup for score in record["score"])
    scored = [row["step"] for row in trainer.state.log_history if "influence/score_mean" in row]
    assert scored == [3, 4, 5, 6, 7, 8]
    assert trainer.sizing_table is not None and len(trainer.sizing_table) == len(trainer.engine.tracked)


# ---------------------------------------------------------------------- training features


@pytest.mark.parametrize(
    "features",
    [
        {"gradient_accumulation_steps": 2},
        {"bf16": True},
        {"activation_checkpointing": True},
        {"lora": True},
    ],
    ids=["accumulation", "bf16", "checkpointing", "lora"],
)
def test_training_features_work_with_selection(tmp_path, features):
    features = dict(features)
    model = tiny_model(dtype=torch.float32)
    if features.pop("lora", False):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    before = parameters(model)
    trainer = make_trainer(tmp_path, model=model, max_steps=3, **features)
    trainer.train()

    assert any(not torch.equal(a, b) for a, b in zip(before, parameters(model), strict=True))
    assert trainer.totals.seen == 3 * 8 * trainer.args.gradient_accumulation_steps
    assert all(math.isfinite(v) for v in logged(trainer, "influence/score_mean"))
    assert len(logged(trainer, "influence/score_mean")) == 3
    if trainer.args.activation_checkpointing:
        assert trainer.model.is_activation_checkpointing
    if hasattr(model, "peft_config"):
        assert all("lora_" in name for name in trainer.engine.tracked)


def test_reentrant_activation_checkpointing_is_refused_with_the_fix(tmp_path):
    with pytest.raises(NotImplementedError, match="use_reentrant"):
        make_trainer(tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})
    model = tiny_model()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(NotImplementedError, match="use_reentrant=False"):
        make_trainer(tmp_path, model=model, max_steps=1).train()


def test_observed_scores_survive_activation_checkpointing():
    """Non-reentrant checkpointing re-runs the forward inside backward; the capture must ignore that re-run."""
    pool, target = demo_datasets(pool_rows=6)
    batch = CausalCollator(demo_tokenizer())([pool[i] for i in range(6)])
    model = tiny_model()
    engine = Influence(model, make_args("unused").influence_config())
    engine.fit([batch])
    engine.set_target([CausalCollator(demo_tokenizer())(list(target))])
    expected = engine.score(batch)

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with engine.observe(batch["attention_mask"], batch["labels"]) as observation:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses = per_example_loss(logits, batch["labels"])
        torch.autograd.grad(losses.sum(), observation.outputs, retain_graph=True)
    torch.testing.assert_close(observation.scores, expected, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------- checkpoints


def test_resume_selects_like_an_uninterrupted_run(tmp_path):
    settings = dict(
        selection_method="boltzmann",
        max_steps=6,
        curvature_refresh_steps=2,
        target_refresh_steps=2,
        save_strategy="steps",
        save_steps=3,
    )
    full = make_trainer(tmp_path / "full", **settings)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "influence" / "engine").is_dir()
    assert (checkpoint / "influence" / "pending_factors_rank0.safetensors").is_file()

    resumed = make_trainer(tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.selection_history == full.selection_history[3:]
    assert resumed.totals == full.totals
    for a, b in zip(parameters(full.model), parameters(resumed.model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    shutil.rmtree(checkpoint / "influence")  # without the selection state the continuation differs
    fresh = make_trainer(tmp_path / "fresh", **settings)
    fresh.train(resume_from_checkpoint=str(checkpoint))
    assert [r["weight"] for r in fresh.selection_history] != [r["weight"] for r in full.selection_history[3:]]


# ---------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"keep_ratio": 0.0}, ConfigError, "keep_ratio"),
        ({"keep_ratio": 1.5}, ConfigError, "keep_ratio"),
        ({"buffer_multiplier": 0}, ConfigError, "smaller than the batch"),
        ({"buffer_multiplier": 2.5}, ConfigError, "buffer_multiplier"),
        ({"selection": "sometimes"}, ConfigError, "selection"),
        ({"selection_method": "greedy"}, ConfigError, "selection_method"),
        ({"selection": "reweight", "training_pass": "recompute"}, ConfigError, "recompute"),
        ({"tau": 0.0}, ConfigError, "tau"),
        ({"sketch_dims": "8,x"}, ConfigError, "sketch_dims"),
        ({"damping": "lots"}, ConfigError, "damping"),
        ({"sketch": "fourier"}, ConfigError, "sketch"),
    ],
)
def test_bad_arguments_fail_at_construction(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        make_args(tmp_path, **overrides)


def test_bad_datasets_fail_before_training(tmp_path):
    pool, target = demo_datasets()
    with pytest.raises(EmptyInputError, match="target_dataset"):
        make_trainer(tmp_path, target=target.select([]))
    raw_target = target.remove_columns(["input_ids", "attention_mask", "labels", "truncated", "num_loss_tokens"])
    with pytest.raises(MissingColumnError, match="input_ids.*format_prompt_completion"):
        make_trainer(tmp_path, target=raw_target)
    no_loss = target.map(lambda row: {"labels": [-100] * len(row["labels"]), "num_loss_tokens": 0})
    with pytest.raises(EmptyInputError, match="labelled token"):
        make_trainer(tmp_path, target=no_loss)
    with pytest.raises(EmptyInputError, match="labelled token"):
        make_trainer(tmp_path, target=no_loss.remove_columns(["num_loss_tokens"]))
    with pytest.raises(ConfigError, match="target_dataset"):
        InfluenceTrainer(
            model=tiny_model(),
            args=make_args(tmp_path),
            train_dataset=pool,
            data_collator=CausalCollator(demo_tokenizer()),
        )
    with pytest.raises(ConfigError, match="InfluenceTrainingArguments"):
        from transformers import TrainingArguments

        InfluenceTrainer(
            model=tiny_model(), args=TrainingArguments(str(tmp_path)), train_dataset=pool, target_dataset=target
        )
    assert isinstance(make_args(tmp_path), InfluenceTrainingArguments)


def test_arguments_mirror_every_engine_config_field(tmp_path):
    """Every `InfluenceConfig` field is a training argument (the engine's `seed` is `influence_seed`, its
    `delta` is `sizing_delta`)."""
    import dataclasses

    from hfinfluence import InfluenceConfig

    names = {f.name for f in dataclasses.fields(InfluenceConfig)} - {"seed", "delta"}
    args = make_args(tmp_path, sketch_dims="6,8", damping="0.01", influence_seed=7, curvature="identity")
    assert names <= {f.name for f in dataclasses.fields(InfluenceTrainingArguments)}
    config = args.influence_config()
    assert (config.sketch_dims, config.damping, config.seed, config.curvature) == ((6, 8), 0.01, 7, "identity")
    assert make_args(tmp_path, seed=3).influence_config().seed == 3
    assert make_args(tmp_path, sizing_delta=0.2).influence_config().delta == 0.2


@pytest.mark.parametrize("curvature", ["ekfac", "identity"])
def test_other_curvatures_refresh_during_training(tmp_path, curvature):
    trainer = make_trainer(tmp_path, curvature=curvature, max_steps=5, curvature_refresh_steps=2)
    trainer.train()
    assert len(logged(trainer, "influence/score_mean")) == 5
    assert all(math.isfinite(v) for v in logged(trainer, "influence/score_mean"))


def test_argument_defaults_are_the_engine_defaults(tmp_path):
    import dataclasses

    from hfinfluence import InfluenceConfig

    engine = InfluenceConfig().to_dict()
    mine = make_args(tmp_path).influence_config().to_dict()
    assert {k: v for k, v in mine.items() if k != "seed"} == {k: v for k, v in engine.items() if k != "seed"}
    assert len(dataclasses.fields(InfluenceConfig)) > 10
