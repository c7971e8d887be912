"""Filter a real pool against each of several targets with `hfinfluence filter` and tabulate what was kept.

For each ``TARGET.jsonl`` in ``--targets`` it runs (one after the other, each resumable by rerunning this script)

    hfinfluence filter --candidates POOL --target TARGETS/TARGET.jsonl --output OUT/TARGET \
        --keep-ratio 0.1 --group-field source --id-field id [EXTRA ARGUMENTS]

and then prints, per target, the share of kept rows from the target's relevant families against their share
of the pool (the base rate), and the command's wall time. Relevant families follow ../shared/data/README.md;
for ``sciq`` both the strict reading (``sciq`` only) and a broad one (science QA: sciq, qasc, quartz, quarel)
are shown.

    .venv/bin/python scripts/real_input_filter.py --pool ../shared/data/pool_small.jsonl \
        --targets ../shared/data/targets --out runs/real-input -- --max-length 128 --fit-rows 256
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

RELEVANT = {
    "gsm8k": {"gsm8k": ["gsm8k"]},
    "code": {"code_alpaca": ["code_alpaca"]},
    "sciq": {"sciq": ["sciq"], "science QA": ["sciq", "qasc", "quartz", "quarel"]},
    "sentiment": {"reviews": ["rotten_tomatoes", "amazon_polarity", "yelp_review_full", "app_reviews"]},
}


def run_target(pool: Path, target: Path, out: Path, keep_ratio: float, extra: list[str]) -> float:
    """Run (or resume) one filter command; return its wall time in seconds, summed over the invocations it took.

    Each invocation (command and seconds) is logged in OUT/TARGET.wall_time.json; a complete run is not rerun.
    """
    command = ["hfinfluence", "filter", "--candidates", str(pool), "--target", str(target), "--output", str(out)]
    command += ["--keep-ratio", str(keep_ratio), "--group-field", "source", "--id-field", "id", *extra]
    log = out.parent / f"{out.name}.wall_time.json"
    invocations = json.loads(log.read_text())["invocations"] if log.is_file() else []
    manifest = out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("status") == "complete" and invocations:
        return sum(entry["seconds"] for entry in invocations)

    print(f"$ {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    try:
        subprocess.run([str(Path(sys.executable).with_name("hfinfluence")), *command[1:]], check=True)
    finally:
        invocations.append({"command": command, "seconds": time.perf_counter() - started})
        log.write_text(json.dumps({"invocations": invocations}, indent=2))
    return sum(entry["seconds"] for entry in invocations)


def table_rows(name: str, out: Path, seconds: float | None) -> list[str]:
    scores = pq.read_table(out / "scores.parquet").to_pylist()
    kept = [row for row in scores if row["rank"] is not None and row["rank"] <= _kept_count(out)]
    rows = []
    for label, families in RELEVANT.get(name, {}).items():
        base = sum(row["group"] in families for row in scores) / len(scores)
        share = sum(row["group"] in families for row in kept) / len(kept)
        wall = f"{seconds / 60:.1f} min" if seconds is not None else "n/a"
        rows.append(f"| {name} | {label} | {len(kept)} | {share:.1%} | {base:.1%} | {share / base:.2f}× | {wall} |")
    return rows


def _kept_count(out: Path) -> int:
    manifest = json.loads((out / "manifest.json").read_text())
    return len(pq.read_table(out / manifest["outputs_written"]["kept"], columns=["id"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=Path, required=True)
    parser.add_argument("--targets", type=Path, required=True, help="folder of TARGET.jsonl files")
    parser.add_argument("--names", nargs="+", default=list(RELEVANT), help="targets to run, in order")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keep-ratio", type=float, default=0.1)
    parser.add_argument("extra", nargs="*", help="further `hfinfluence filter` arguments (after --)")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    times = {}
    for name in args.names:
        times[name] = run_target(
            args.pool, args.targets / f"{name}.jsonl", args.out / name, args.keep_ratio, args.extra
        )
    lines = [
        "| target | relevant families | kept | relevant share of kept | base rate | ratio | wall time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in args.names:
        lines += table_rows(name, args.out / name, times.get(name))
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
