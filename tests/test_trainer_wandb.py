"""InfluenceTrainer with `report_to="wandb"` in offline mode: the run folder is read back from its record file."""

from __future__ import annotations

import json

import pytest
import torch
from trainer_setup import make_trainer

from hfinfluence.tracking import find_offline_runs, read_offline_run

torch.set_num_threads(1)

PER_STEP_KEYS = (
    "influence/score_mean",
    "influence/score_std",
    "influence/score_hist",
    "influence/damping",
    "influence/target_loss",
    "influence/leakage",
    "influence/seed_spearman",
    "influence/seed_spread",
    "select/kept_fraction",
    "select/effective_fraction",
    "select/weight_min",
    "select/weight_max",
    "select/kept/gsm8k",
    "select/examples_seen",
)
INFLUENCE_ARGUMENTS = (
    "selection",
    "selection_method",
    "keep_ratio",
    "tau",
    "buffer_multiplier",
    "target_refresh_steps",
    "curvature_refresh_steps",
    "selection_warmup_steps",
    "global_selection",
    "sketch",
    "sketch_dims",
    "epsilon",
    "damping",
    "curvature",
    "influence_seed",
)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    import wandb

    wandb.teardown()  # an earlier run in this process fixed wandb's settings (its folder); start afresh
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "hfinfluence-tests")
    yield tmp_path
    wandb.finish()
    wandb.teardown()


def test_offline_run_holds_influence_metrics_tables_and_config(offline_wandb):
    trainer = make_trainer(
        offline_wandb / "out", report_to="wandb", max_steps=4, logging_steps=2, table_log_steps=2, run_name="offline"
    )
    trainer.train()
    import wandb

    wandb.finish()
    wandb.teardown()  # stops wandb's service process, which writes the record file: nothing is left to flush

    runs = find_offline_runs(offline_wandb)
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    for key in (*PER_STEP_KEYS, "influence/sizing", "influence/candidates"):
        assert key in run.summary, key
    assert [row["train/global_step"] for row in run.history if "influence/score_mean" in row] == [2, 4]
    assert run.summary["select/kept_fraction"] == 0.25
    assert run.summary["influence/score_hist"]["_type"] == "histogram"
    assert sum(run.summary["influence/score_hist"]["values"]) == 16  # two steps of 8 candidates

    table = json.loads((run.folder / "files" / run.summary["influence/candidates"]["path"]).read_text())
    assert table["columns"] == ["step", "end", "score", "weight", "group", "row", "snippet"]
    highest = [row for row in table["data"] if row[1] == "highest"]
    lowest = [row for row in table["data"] if row[1] == "lowest"]
    assert len(highest) == len(lowest) == 5 and highest[0][2] >= lowest[0][2]
    assert all(isinstance(row[6], str) and row[6] for row in table["data"])

    sizing = json.loads((run.folder / "files" / run.summary["influence/sizing"]["path"]).read_text())
    assert len(sizing["data"]) == len(trainer.engine.tracked)
    for name in INFLUENCE_ARGUMENTS:
        assert run.config[name] == getattr(trainer.args, name), name
