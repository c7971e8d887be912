"""Set-up shared by the trainer tests and their two-process script: demo rows, a word tokenizer, a tiny Llama."""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from pathlib import Path

import datasets
import torch

from hfinfluence.data import CausalCollator, format_prompt_completion
from hfinfluence.models import tiny_llama, tiny_tokenizer
from hfinfluence.trainer import InfluenceTrainer, InfluenceTrainingArguments

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "recipes" / "data"
POOL_FILE, TARGET_FILE = DEMO_DATA / "pool.jsonl", DEMO_DATA / "target_gsm8k.jsonl"


def read_rows(path: Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit]


@functools.cache
def demo_tokenizer(words: int = 400):
    """A word-level tokenizer over the most frequent words of the shipped demo pool and target."""
    text = " ".join(r["prompt"] + r["completion"] for r in read_rows(POOL_FILE) + read_rows(TARGET_FILE))
    counts = Counter(re.findall(r"\w+|[^\w\s]", text.lower()))
    return tiny_tokenizer([word for word, _ in counts.most_common(words)])


def demo_datasets(*, pool_rows: int = 64, target_rows: int = 8, max_length: int = 32):
    """(pool, target): formatted prompt/completion rows of the demo data, loss on the completion."""
    tokenizer = demo_tokenizer()
    formatter = format_prompt_completion(tokenizer, max_length=max_length)
    pool = datasets.Dataset.from_list(read_rows(POOL_FILE, pool_rows)).map(formatter, batched=True)
    target = datasets.Dataset.from_list(read_rows(TARGET_FILE, target_rows)).map(formatter, batched=True)
    return pool, target


def tiny_model(*, dtype: torch.dtype = torch.float64, seed: int = 0):
    return tiny_llama(vocab_size=len(demo_tokenizer()), hidden=32, layers=2, intermediate=64, dtype=dtype, seed=seed)


def make_args(output_dir, **overrides) -> InfluenceTrainingArguments:
    settings = dict(
        per_device_train_batch_size=2,
        buffer_multiplier=4,
        max_steps=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        record_selections=True,
        dataloader_pin_memory=False,
        use_cpu=True,
        seed=0,
        curvature_refresh_steps=2,
        target_refresh_steps=2,
    )
    return InfluenceTrainingArguments(output_dir=str(output_dir), **{**settings, **overrides})


def make_trainer(output_dir, *, model=None, pool=None, target=None, **overrides) -> InfluenceTrainer:
    default_pool, default_target = demo_datasets()
    return InfluenceTrainer(
        model=model if model is not None else tiny_model(),
        args=make_args(output_dir, **overrides),
        train_dataset=default_pool if pool is None else pool,
        target_dataset=default_target if target is None else target,
        data_collator=CausalCollator(demo_tokenizer()),
        processing_class=demo_tokenizer(),
    )
