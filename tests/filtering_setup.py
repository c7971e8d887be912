"""Set-up shared by the filtering and command-line tests: a row pool and target over the tiny tokenizer's words."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hfinfluence.models import tiny_llama, tiny_tokenizer

NUMBERS = "one two three four five six seven eight nine ten".split()


def pool_rows(count: int, *, seed: int = 0) -> list[dict]:
    """Arithmetic and animal rows over the tiny tokenizer's words, with extra columns of several types."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        a, b, c = (NUMBERS[j] for j in rng.integers(0, len(NUMBERS), size=3))
        if i % 3 == 0:
            prompt, completion, source = "the cat sat on the", f" {['mat', 'dog', 'sun'][i % 3 - 1]} .", "animals"
        else:
            prompt, completion, source = f"what is {a} plus {b} ?", f" {c}", "math"
        rows.append(
            {
                "id": f"row-{i:03d}",
                "prompt": prompt,
                "completion": completion,
                "source": source,
                "weight": float(i) / 7,
                "tags": [source, str(i % 2)],
                "meta": {"position": i, "even": i % 2 == 0},
            }
        )
    return rows


TARGET_ROWS = [{"prompt": f"what is {n} plus two ?", "completion": " four"} for n in NUMBERS[:6]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def save_tiny_model(folder: Path, tokenizer) -> Path:
    """Save a tiny float64 Llama and ``tokenizer`` to ``folder``."""
    tiny_llama(dtype=torch.float64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_workspace(root: Path) -> Path:
    """Fill ``root``: ``model`` (a saved tiny Llama + tokenizer), a 37-row ``pool.jsonl``, a 6-row ``target.jsonl``."""
    save_tiny_model(root / "model", tiny_tokenizer())
    write_jsonl(root / "pool.jsonl", pool_rows(37))
    write_jsonl(root / "target.jsonl", TARGET_ROWS)
    return root
