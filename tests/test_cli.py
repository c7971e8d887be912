"""The `hfinfluence` command: one clear line per bad input, kill-and-resume, two processes, W&B offline."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import load_dataset
from filtering_setup import TARGET_ROWS, pool_rows, save_tiny_model, write_jsonl, write_workspace

from hfinfluence.cli import main
from hfinfluence.models import tiny_tokenizer

PYTHON = sys.executable
ACCELERATE = Path(sys.executable).with_name("accelerate")
CONSOLE_SCRIPT = Path(sys.executable).with_name("hfinfluence")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Tiny float64 models (one whose tokenizer has no pad token), a 37-row pool, targets good and bad."""
    root = write_workspace(tmp_path_factory.mktemp("cli"))
    save_tiny_model(root / "model-no-pad", tiny_tokenizer(with_pad=False))
    write_jsonl(root / "big-pool.jsonl", pool_rows(1200, seed=1))
    write_jsonl(root / "target-text.jsonl", [{"text": row["prompt"] + row["completion"]} for row in TARGET_ROWS])
    (root / "empty.jsonl").write_text("")
    return root


def arguments(files: Path, output: Path, *extra: str, pool: str = "pool.jsonl", target: str = "target.jsonl"):
    return [
        "filter",
        "--model",
        str(files / "model"),
        "--dtype",
        "float64",
        "--candidates",
        str(files / pool),
        "--target",
        str(files / target),
        "--output",
        str(output),
        "--keep-ratio",
        "0.25",
        "--max-length",
        "24",
        "--fit-rows",
        "32",
        "--batch-size",
        "3",
        "--shard-size",
        "4",
        "--group-field",
        "source",
        "--id-field",
        "id",
        *extra,
    ]


def replace(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced, or with ``flag value`` appended."""
    argv = list(argv)
    if flag not in argv:
        return [*argv, flag, value]
    argv[argv.index(flag) + 1] = value
    return argv


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("hfinfluence: error:")]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--prompt-field", "question"), "The candidates have no column 'question' (--prompt-field)"),
        (("--group-field", "family"), "The candidates have no column 'family' (--group-field)"),
        (("--candidates", "empty.jsonl"), "`--candidates`: The file"),
        (("--target", "empty.jsonl"), "`--target`: The file"),
        (("--target", "target-text.jsonl"), "The target has no column 'prompt' (--prompt-field)"),
        (("--candidates", "missing.jsonl"), "`--candidates`: `source`="),
        (("--keep-ratio", "1.5"), "`--keep-ratio` must be in (0, 1]"),
        (("--damping", "-1"), "`damping` must be 'auto' or a float >= 0"),
    ],
)
def test_bad_input_gives_one_clear_line_and_status_2(files, tmp_path, capsys, change, message):
    flag, value = change
    value = str(files / value) if value.endswith(".jsonl") else value
    status = main(replace(arguments(files, tmp_path / "run"), flag, value))
    lines = error_lines(capsys.readouterr().err)
    assert status == 2
    assert len(lines) == 1 and message in lines[0], lines


def test_score_writes_every_score_and_no_kept_rows(files, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [a for a in arguments(files, out) if a not in ("--keep-ratio", "0.25")]
    assert main(["score", *argv[1:]]) == 0
    assert "kept" not in capsys.readouterr().out
    assert len(pq.read_table(out / "scores.parquet")) == 37
    assert not any(out.glob("kept*"))
    assert "## Counts per `source`" in (out / "report.md").read_text()


def test_size_prints_the_sizing_table_and_memory_plan(files, capsys):
    argv = ["size", "--model", str(files / "model"), "--dtype", "float64", "--candidates", str(files / "pool.jsonl")]
    assert main([*argv, "--max-length", "24", "--fit-rows", "16"]) == 0
    out = capsys.readouterr().out
    assert "sizing from a fit on 16 candidate rows" in out
    assert "model.layers.0.self_attn.q_proj" in out and "first fit: exact (or pilot) factors" in out


def test_over_long_rows_are_truncated_counted_and_reported(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(replace(arguments(files, out), "--max-length", "7")) == 0
    err = capsys.readouterr().err
    truncated = sum(r["truncated"] for r in pq.read_table(out / "scores.parquet").to_pylist())
    assert truncated > 0
    assert f"{truncated} of 37 candidate rows are longer than `--max-length` 7 and were truncated (left side)" in err
    assert f"{truncated} of 37 candidates" in (out / "report.md").read_text()


def test_a_tokenizer_without_pad_token_is_fixed_and_the_fix_reported(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(replace(arguments(files, out), "--model", str(files / "model-no-pad"))) == 0
    message = "The tokenizer has no pad token; using its eos token '</s>' for padding."
    assert message in capsys.readouterr().err
    assert message in (out / "report.md").read_text()


def test_push_to_hub_offline_is_refused_before_any_work(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main([*arguments(files, tmp_path / "run"), "--push-to-hub", "me/kept"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "needs the network, but HF_HUB_OFFLINE is set" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_mismatched_rerun_names_each_difference(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(arguments(files, out)) == 0
    capsys.readouterr()
    assert main(replace(arguments(files, out), "--fit-rows", "20")) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings" in error_lines(err)[0]
    assert "  fit_rows: saved 32, now 20" in err.splitlines()


def offline_env(tmp_path: Path) -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HFINFLUENCE_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
    }


def test_a_hub_dataset_that_cannot_be_reached_offline_is_one_line(files, tmp_path):
    """Through the console script, in a fresh process with HF_HUB_OFFLINE=1 and an empty cache."""
    argv = replace(arguments(files, tmp_path / "run"), "--candidates", "nobody-here/not-cached")
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), *argv], env=offline_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    lines = error_lines(result.stderr)
    assert result.returncode == 2
    assert len(lines) == 1 and "'nobody-here/not-cached' cannot be reached offline" in lines[0], result.stderr


def test_a_hub_model_that_cannot_be_reached_offline_is_one_line(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(replace(arguments(files, tmp_path / "run"), "--model", "nobody-here/not-cached")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "'nobody-here/not-cached' cannot be reached offline" in lines[0], lines


def test_wandb_offline_run_holds_the_report(files, tmp_path, monkeypatch):
    import wandb

    from hfinfluence.tracking import find_offline_runs, read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    wandb.teardown()  # wandb keeps one settings object per process: start from a clean one, leave none behind
    try:
        assert main([*arguments(files, out), "--report-to", "wandb"]) == 0
    finally:
        wandb.teardown()
    runs = find_offline_runs(out)
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    assert run.summary["select/kept"] == 9
    assert run.summary["select/kept/math"] + run.summary["select/kept/animals"] == 9
    assert {"influence/score_histogram", "influence/sizing", "influence/highest"} <= run.logged_keys()
    assert run.config["read"]["max_length"] == 24


def test_killed_runs_resume_and_end_equal_to_an_uninterrupted_run(files, tmp_path):
    """Ctrl-C one run and SIGKILL the next mid-scoring; the third finishes; compare with one clean run."""
    # 150 shards scored one row per pass: seconds of scoring, so the signals land mid-run even on a fast machine
    argv = replace(arguments(files, tmp_path / "resumed", pool="big-pool.jsonl"), "--shard-size", "8")
    argv = replace(argv, "--batch-size", "1")
    env = offline_env(tmp_path)
    command = [PYTHON, "-m", "hfinfluence", *argv]

    first = interrupt_after_shards(command, env, tmp_path / "resumed", shards=2, sig=signal.SIGINT)
    assert first.returncode == 130 and "interrupted; rerun the same command to resume" in first.stderr
    second = interrupt_after_shards(command, env, tmp_path / "resumed", shards=6, sig=signal.SIGKILL)
    assert second.returncode == -signal.SIGKILL
    shards = sorted(p.name for p in (tmp_path / "resumed" / "shards").iterdir())
    assert len(shards) >= 6 and all(name.startswith("shard-") for name in shards)
    assert not (tmp_path / "resumed" / "scores.parquet").exists()

    third = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "shard(s) reused from an earlier invocation" in third.stdout
    assert main(replace(argv, "--output", str(tmp_path / "clean"))) == 0

    for name in ("scores.parquet", "kept.parquet"):
        assert pq.read_table(tmp_path / "resumed" / name).equals(pq.read_table(tmp_path / "clean" / name))
    history = json.loads((tmp_path / "resumed" / "manifest.json").read_text())["history"]
    assert len(history) == 3


def interrupt_after_shards(command, env, out: Path, *, shards: int, sig: int) -> subprocess.CompletedProcess:
    """Start ``command``, send ``sig`` once ``out/shards`` holds ``shards`` files, and wait for the process."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if len(list((out / "shards").glob("shard-*.parquet"))) >= shards:
            process.send_signal(sig)
            break
        time.sleep(0.02)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode != 0, f"the run ended before it could be interrupted:\n{stderr[-2000:]}"
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_processes_score_every_row_once_like_one_process(files, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("CPU multi-process launch goes through mpirun (Debian package openmpi-bin)")
    argv = arguments(files, tmp_path / "two")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = {**offline_env(tmp_path), "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    launch = [str(ACCELERATE), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--mpirun_hostfile", str(hostfile)]
    launch += ["--main_process_port", str(free_port())]
    command = [*launch, "-m", "hfinfluence", *argv]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert main(replace(argv, "--output", str(tmp_path / "one"))) == 0

    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["history"][-1]["processes"] == 2
    by_process = manifest["history"][-1]["shards_by_process"]
    assert sorted(by_process) == ["0", "1"] and sorted(by_process["0"] + by_process["1"]) == list(range(10))
    two, one = (pq.read_table(tmp_path / name / "scores.parquet") for name in ("two", "one"))
    assert two.column("row").to_pylist() == list(range(37))
    np.testing.assert_allclose(two.column("score").to_numpy(), one.column("score").to_numpy(), rtol=1e-9)
    kept_two = load_dataset("parquet", data_files=str(tmp_path / "two" / "kept.parquet"), split="train")
    kept_one = load_dataset("parquet", data_files=str(tmp_path / "one" / "kept.parquet"), split="train")
    assert sorted(kept_two["influence_score"]) == pytest.approx(sorted(kept_one["influence_score"]), rel=1e-9)
