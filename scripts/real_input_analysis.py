"""Diagnose what drives the selections of `real_input_filter.py`: families, row length and score scale.

Reads OUT/<target>/scores.parquet of each run and prints, per target:

- the families with the most kept rows (top ``--keep-ratio`` by score) and the relevant families' share;
- how the score relates to the number of loss tokens of a row (Spearman correlation), and the mean loss
  tokens of kept rows against the pool;
- for comparison only, the relevant share when rows are ranked by score per loss token (a candidate-side
  proxy for ``--loss-reduction mean``; the real option also changes the curvature and the target).

    .venv/bin/python scripts/real_input_analysis.py --out runs/real-input
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from real_input_filter import RELEVANT


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rank_x, rank_y = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rank_x, rank_y)[0, 1])


def top_share(values: np.ndarray, groups: np.ndarray, families: list[str], keep: int) -> float:
    order = np.lexsort((np.arange(values.size), -values))[:keep]
    return float(np.isin(groups[order], families).mean())


def describe(name: str, folder: Path, keep_ratio: float) -> list[str]:
    table = pq.read_table(folder / "scores.parquet").to_pydict()
    scored = np.array([s is not None for s in table["score"]])
    scores = np.array([s for s in table["score"] if s is not None])
    groups = np.array(table["group"])[scored]
    tokens = np.array(table["loss_tokens"])[scored]
    keep = round(scores.size * keep_ratio)
    order = np.lexsort((np.arange(scores.size), -scores))[:keep]
    lines = [f"## {name}", ""]
    kept_families = Counter(groups[order]).most_common(6)
    lines.append("kept families: " + ", ".join(f"{family} {count}" for family, count in kept_families))
    lines.append(
        f"loss tokens: kept mean {tokens[order].mean():.1f}, pool mean {tokens.mean():.1f}; "
        f"Spearman(score, loss tokens) = {spearman(scores, tokens):+.2f}"
    )
    for label, families in RELEVANT.get(name, {}).items():
        base = float(np.isin(groups, families).mean())
        raw = top_share(scores, groups, families, keep)
        per_token = top_share(scores / np.maximum(tokens, 1), groups, families, keep)
        lines.append(
            f"{label}: base rate {base:.1%}; kept share by score {raw:.1%} ({raw / base:.2f}×), "
            f"by score per loss token {per_token:.1%} ({per_token / base:.2f}×)"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--names", nargs="+", default=list(RELEVANT))
    parser.add_argument("--keep-ratio", type=float, default=0.1)
    args = parser.parse_args()
    for name in args.names:
        if (args.out / name / "scores.parquet").is_file():
            print("\n".join(describe(name, args.out / name, args.keep_ratio)))


if __name__ == "__main__":
    main()
