"""Shared fixtures: tiny models built from configs and synthetic batches, all in float64."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HFINFLUENCE_PROGRESS", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 61
RTOL, ATOL = 1e-7, 1e-9


def build_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    config = LlamaConfig(**{**settings, **overrides})
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).double().eval()


def build_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config).double().eval()


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


@pytest.fixture
def llama():
    return build_llama()


@pytest.fixture
def gpt2():
    return build_gpt2()
