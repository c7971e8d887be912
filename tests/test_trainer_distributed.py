"""A real two-process InfluenceTrainer run (`accelerate launch --cpu --num_processes 2` through mpirun)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_dist_script import run

SCRIPT = Path(__file__).with_name("trainer_dist_script.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")


def free_port() -> int:
    """A port nobody listens on now, so that concurrent multi-process runs on this machine do not collide."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_processes(out: Path) -> None:
    hostfile = out / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = {
        **os.environ,
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HFINFLUENCE_PROGRESS": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": os.pathsep.join([str(SCRIPT.parent), os.environ.get("PYTHONPATH", "")]),
    }
    command = [str(ACCELERATE), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--mpirun_hostfile", str(hostfile)]
    result = subprocess.run(
        [*command, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    if shutil.which("mpirun") is None:
        pytest.skip("CPU multi-process launch goes through mpirun (Debian package openmpi-bin)")
    out = tmp_path_factory.mktemp("two_processes")
    launch_two_processes(out)
    return out


def test_two_processes_agree_and_select_like_one_process_on_the_global_buffer(two_process_run, tmp_path):
    torch.set_num_threads(1)
    run(tmp_path, mode="global", per_device_batch=4)  # one process, the same 16-row global buffers

    ranks = [json.loads((two_process_run / f"global_rank{r}.json").read_text()) for r in range(2)]
    single = json.loads((tmp_path / "global_rank0.json").read_text())
    assert [r["world_size"] for r in ranks] == [2, 2] and single["world_size"] == 1
    assert ranks[0]["history"] == ranks[1]["history"]
    assert len(ranks[0]["history"]) == 4 and all(len(step["index"]) == 16 for step in ranks[0]["history"])
    for two, one in zip(ranks[0]["history"], single["history"], strict=True):
        assert two["index"] == one["index"]
        assert two["weight"] == one["weight"]
        torch.testing.assert_close(torch.tensor(two["score"]), torch.tensor(one["score"]), rtol=1e-9, atol=1e-9)
    assert ranks[0]["totals"] == single["totals"]

    tensors = [load_file(str(two_process_run / f"global_rank{r}.safetensors")) for r in range(2)]
    reference = load_file(str(tmp_path / "global_rank0.safetensors"))
    assert any("gradient_covariance" in key for key in reference)
    for key, value in tensors[0].items():
        torch.testing.assert_close(tensors[1][key], value, rtol=0, atol=0)  # all-reduced: identical bits
        torch.testing.assert_close(value, reference[key], rtol=1e-9, atol=1e-12)


def test_per_process_selection_keeps_its_share_of_each_shard(two_process_run):
    ranks = [json.loads((two_process_run / f"local_rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["history"] == ranks[1]["history"]
    for step in ranks[0]["history"]:
        assert sum(step["weight"][:8]) == 2 and sum(step["weight"][8:]) == 2
