"""Build the demo data shipped in recipes/data/ from the shared pool (GSM8K and P3 rows only, no CodeAlpaca).

    python scripts/make_demo_data.py --shared ../shared/data --out recipes/data

Writes ``pool.jsonl`` (``--per-family`` rows of each of the 22 P3 families and ``--gsm8k`` GSM8K training rows,
seeded, shuffled) and ``target_gsm8k.jsonl`` (the first ``--target`` GSM8K test questions). Rows keep their
``id``, ``prompt``, ``completion``, ``source`` and ``template`` fields.
"""

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

EXCLUDED = {"code_alpaca"}  # CC BY-NC 4.0: not redistributed with the product


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def build_pool(rows: list[dict], *, per_family: int, gsm8k: int, seed: int) -> list[dict]:
    by_source = defaultdict(list)
    for row in rows:
        if row["source"] not in EXCLUDED:
            by_source[row["source"]].append(row)
    rng = random.Random(seed)
    pool = []
    for source in sorted(by_source):
        count = gsm8k if source == "gsm8k" else per_family
        pool += rng.sample(by_source[source], count)
    rng.shuffle(pool)
    return pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("recipes/data"))
    parser.add_argument("--per-family", type=int, default=12)
    parser.add_argument("--gsm8k", type=int, default=60)
    parser.add_argument("--target", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pool = build_pool(
        read_jsonl(args.shared / "pool.jsonl"), per_family=args.per_family, gsm8k=args.gsm8k, seed=args.seed
    )
    target = read_jsonl(args.shared / "targets" / "gsm8k.jsonl")[: args.target]
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "pool.jsonl", pool)
    write_jsonl(args.out / "target_gsm8k.jsonl", target)
    families = sorted({row["source"] for row in pool})
    print(f"pool: {len(pool)} rows, {len(families)} families; target: {len(target)} rows -> {args.out}")


if __name__ == "__main__":
    main()
