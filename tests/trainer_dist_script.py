"""Training runs for test_trainer_distributed.py, launched under `accelerate launch --cpu --num_processes 2`.

    accelerate launch --cpu --num_processes 2 --mpirun_hostfile HOSTFILE tests/trainer_dist_script.py OUT

Runs a global-selection and a per-process-selection training on the same data; each process writes what it
saw (world size, selection history, counts) to OUT/<mode>_rank<r>.json and its curvature factors, target
gradient and parameters to OUT/<mode>_rank<r>.safetensors. `run` is also called in one process by the test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from trainer_setup import make_trainer

MODES = {"global": True, "local": False}


def run(out: Path, *, mode: str, per_device_batch: int) -> None:
    trainer = make_trainer(
        out / f"run-{mode}",
        per_device_train_batch_size=per_device_batch,
        global_selection=MODES[mode],
        max_steps=4,
        curvature_refresh_steps=2,
        target_refresh_steps=3,
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    summary = {
        "world_size": trainer.accelerator.num_processes,
        "history": trainer.selection_history,
        "totals": trainer.totals.to_dict(),
    }
    (out / f"{mode}_rank{rank}.json").write_text(json.dumps(summary))
    tensors = {}
    for name, curvature in trainer.engine.curvature.items():
        tensors[f"{name}::activation_covariance"] = curvature.activation_covariance
        tensors[f"{name}::gradient_covariance"] = curvature.gradient_covariance
        tensors[f"{name}::target_gradient"] = trainer.engine.target_gradient[name]
    for name, parameter in trainer.model.named_parameters():
        tensors[f"param::{name}"] = parameter.detach()
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / f"{mode}_rank{rank}.safetensors")
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    for mode in MODES:
        run(Path(sys.argv[1]), mode=mode, per_device_batch=2)
