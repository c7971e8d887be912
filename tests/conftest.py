"""Shared fixtures: tiny models built from configs and synthetic batches, all in float64; the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from hfinfluence.models import tiny_gpt2, tiny_llama

os.environ.setdefault("HFINFLUENCE_PROGRESS", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 61
RTOL, ATOL = 1e-7, 1e-9
REPO = Path(__file__).resolve().parents[1]
# `shared/data` inside the checkout or next to it, None when neither exists.
SHARED_DATA = next((p for p in (REPO / "shared" / "data", REPO.parent / "shared" / "data") if p.is_dir()), None)
SIZES = {"vocab_size": VOCAB, "hidden": 16, "layers": 2, "heads": 2, "max_positions": 64}


def build_llama(seed: int = 0, **sizes) -> LlamaForCausalLM:
    """A float64 `tiny_llama` of the tests' sizes (``sizes`` override them); every token id is an ordinary word.

    The global RNG is seeded with ``seed`` as well, so whatever a test draws after building (LoRA weights) repeats.
    """
    torch.manual_seed(seed)
    settings = {**SIZES, "kv_heads": 2, "intermediate": 24, "pad_token_id": None, **sizes}
    return tiny_llama(**settings, seed=seed, dtype=torch.float64)


def build_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A float64 `tiny_gpt2` of the tests' sizes; the global RNG is seeded with ``seed`` as well."""
    torch.manual_seed(seed)
    return tiny_gpt2(**SIZES, seed=seed, dtype=torch.float64)


def make_batch(n: int, length: int = 10, *, seed: int = 0, prompt: int = 3, pad_to: int | None = None) -> dict:
    """``n`` random sequences of varied length, right-padded; loss only after the first ``prompt`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    width = pad_to or length
    input_ids = torch.zeros(n, width, dtype=torch.long)
    attention_mask = torch.zeros(n, width, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i in range(n):
        real = int(torch.randint(prompt + 2, length + 1, (1,), generator=generator))
        tokens = torch.randint(1, VOCAB, (real,), generator=generator)
        input_ids[i, :real], attention_mask[i, :real] = tokens, 1
        labels[i, prompt:real] = tokens[prompt:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def split_batch(batch: dict, size: int) -> list[dict]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is faster, and far faster on a busy machine, than torch's default pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def llama():
    return build_llama()


@pytest.fixture
def gpt2():
    return build_gpt2()
