"""Loading every kind of source, prompt/completion and raw-text formatting, packing and collation."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from conftest import ATOL, RTOL, SHARED_DATA
from datasets import Dataset, DatasetDict, IterableDataset
from torch.utils.data import DataLoader

from hfinfluence.data import (
    IGNORE_INDEX,
    CausalCollator,
    format_prompt_completion,
    format_text,
    load_dataset_any,
    pack_texts,
)
from hfinfluence.errors import DataFormatError, EmptyInputError, MissingColumnError, SourceNotFoundError
from hfinfluence.models import tiny_gpt2, tiny_llama, tiny_tokenizer

ROWS = [
    {"index": 0, "prompt": "what is one plus one ?", "completion": " two"},
    {"index": 1, "prompt": "is the sun a cat ?", "completion": " no"},
    {"index": 2, "prompt": "the cat sat on the", "completion": " mat ."},
    {"index": 3, "prompt": "what is two plus two plus two plus two ?", "completion": " eight"},
    {"index": 4, "prompt": "which animal sat on the mat ?", "completion": " the cat sat on the mat ."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def write_source(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` in the format the suffix names (``.json`` as one JSON array)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        Dataset.from_list(rows).to_csv(path, index=False)
    else:
        Dataset.from_list(rows).to_parquet(path)
    return path


def token_ids(tokenizer, text: str, *, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


# Loading


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_files_of_every_format_load_whole(tmp_path, suffix):
    dataset = load_dataset_any(write_source(tmp_path / f"rows{suffix}", ROWS))
    assert isinstance(dataset, Dataset)
    assert dataset.to_list() == ROWS


def test_text_files_and_split_slices(tmp_path):
    (tmp_path / "notes.txt").write_text("the cat\nsat on\nthe mat\n")
    assert load_dataset_any(tmp_path / "notes.txt", split="train[:2]")["text"] == ["the cat", "sat on"]


def test_folder_of_files_and_split_names(tmp_path):
    write_source(tmp_path / "train.jsonl", ROWS[:3])
    write_source(tmp_path / "test.jsonl", ROWS[3:])
    assert load_dataset_any(tmp_path)["index"] == [0, 1, 2]
    assert load_dataset_any(str(tmp_path), split="test")["index"] == [3, 4]


def test_save_to_disk_folders(tmp_path):
    Dataset.from_list(ROWS).save_to_disk(tmp_path / "single")
    DatasetDict({"train": Dataset.from_list(ROWS[:2]), "validation": Dataset.from_list(ROWS[2:])}).save_to_disk(
        tmp_path / "splits"
    )
    assert load_dataset_any(tmp_path / "single").to_list() == ROWS
    assert load_dataset_any(tmp_path / "splits", split="validation")["index"] == [2, 3, 4]
    with pytest.raises(SourceNotFoundError, match=r"'test'.*\['train', 'validation'\]"):
        load_dataset_any(tmp_path / "splits", split="test")


def test_streaming_yields_the_same_rows(tmp_path):
    path = write_source(tmp_path / "rows.jsonl", ROWS)
    Dataset.from_list(ROWS).save_to_disk(tmp_path / "saved")
    for source in (path, tmp_path / "saved"):
        stream = load_dataset_any(source, streaming=True)
        assert isinstance(stream, IterableDataset)
        assert list(stream) == ROWS


@pytest.mark.parametrize("content", ["", "\n\n", "prompt,completion\n"])
def test_empty_sources_raise_empty_input_naming_the_source(tmp_path, content):
    path = tmp_path / ("empty.csv" if "," in content else "empty.jsonl")
    path.write_text(content)
    with pytest.raises(EmptyInputError, match=str(path)):
        load_dataset_any(path)


def test_empty_saved_dataset_raises_empty_input(tmp_path):
    Dataset.from_dict({"prompt": [], "completion": []}).save_to_disk(tmp_path / "none")
    with pytest.raises(EmptyInputError, match="none"):
        load_dataset_any(tmp_path / "none")


def test_missing_and_unreadable_sources(tmp_path):
    (tmp_path / "notes.md").write_text("# not data\n")
    (tmp_path / "table.xlsx").write_bytes(b"PK")

    with pytest.raises(SourceNotFoundError, match="no such file"):
        load_dataset_any(tmp_path / "missing.jsonl")
    with pytest.raises(SourceNotFoundError, match="holds no .json"):
        load_dataset_any(tmp_path)
    with pytest.raises(DataFormatError, match="supported suffixes"):
        load_dataset_any(tmp_path / "table.xlsx")
    with pytest.raises(DataFormatError, match="`config`"):
        load_dataset_any(write_source(tmp_path / "rows.jsonl", ROWS), config="default")


def test_hub_id_offline_raises_one_clear_chained_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceNotFoundError, match="cannot be reached offline") as info:
        load_dataset_any("hfinfluence-tests/no-such-dataset")
    assert isinstance(info.value.__cause__, OSError)


def test_offline_set_after_import_is_refused_before_any_request(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(SourceNotFoundError, match="set after `datasets` was imported"):
        load_dataset_any("hfinfluence-tests/no-such-dataset")


# Prompt / completion formatting


def test_loss_falls_on_the_completion_and_eos_only(tokenizer):
    row = format_prompt_completion(tokenizer, max_length=64)(ROWS[2])
    prompt = token_ids(tokenizer, ROWS[2]["prompt"], special=True)
    completion = [*token_ids(tokenizer, ROWS[2]["completion"], special=False), tokenizer.eos_token_id]

    assert prompt[0] == tokenizer.bos_token_id
    assert row["input_ids"] == prompt + completion
    assert row["labels"] == [IGNORE_INDEX] * len(prompt) + completion
    assert row["attention_mask"] == [1] * len(prompt + completion)
    assert row["truncated"] is False and row["num_loss_tokens"] == len(completion)


def test_rows_and_batches_format_alike(tokenizer):
    dataset = Dataset.from_list(ROWS)
    formatter = format_prompt_completion(tokenizer, max_length=9)
    one_by_one = dataset.map(formatter, remove_columns=dataset.column_names)
    batched = dataset.map(formatter, batched=True, batch_size=2, remove_columns=dataset.column_names)
    assert one_by_one.to_list() == batched.to_list()
    assert one_by_one.column_names == ["input_ids", "attention_mask", "labels", "truncated", "num_loss_tokens"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_invariants_for_every_max_length(tokenizer, side):
    row = ROWS[4]
    full = format_prompt_completion(tokenizer, max_length=1000)(row)
    prompt_length = full["labels"].count(IGNORE_INDEX)
    completion = full["input_ids"][prompt_length:]

    for max_length in range(1, len(full["input_ids"]) + 2):
        cut = format_prompt_completion(tokenizer, max_length=max_length, truncation_side=side)(row)
        ids, labels = cut["input_ids"], cut["labels"]
        assert len(ids) == min(max_length, len(full["input_ids"])) == len(labels)
        assert cut["truncated"] == (max_length < len(full["input_ids"]))
        assert cut["num_loss_tokens"] == sum(label != IGNORE_INDEX for label in labels[1:])
        assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids, strict=True))
        if side == "right" or not cut["truncated"]:
            assert ids == full["input_ids"][:max_length] and labels == full["labels"][:max_length]
        elif max_length > len(completion):
            # The prompt gives way from its start; bos and the whole completion survive.
            kept = max_length - 1 - len(completion)
            assert ids == [
                tokenizer.bos_token_id,
                *full["input_ids"][prompt_length - kept : prompt_length],
                *completion,
            ]
        else:
            assert ids == [tokenizer.bos_token_id, *completion[: max_length - 1]]


def test_rows_without_labelled_tokens_are_detectable_and_counted(tokenizer):
    dataset = Dataset.from_list(ROWS)
    formatter = format_prompt_completion(tokenizer, max_length=8, truncation_side="right")
    dataset = dataset.map(formatter, batched=True)

    prompts = [token_ids(tokenizer, row["prompt"], special=True) for row in ROWS]
    completions = [token_ids(tokenizer, row["completion"], special=False) for row in ROWS]
    full_lengths = [len(prompt) + len(completion) + 1 for prompt, completion in zip(prompts, completions, strict=True)]
    assert sum(dataset["truncated"]) == sum(length > 8 for length in full_lengths)
    no_loss = dataset.filter(lambda row: row["num_loss_tokens"] == 0)
    assert no_loss["index"] == [i for i, prompt in enumerate(prompts) if len(prompt) >= 8]
    assert all(set(labels) == {IGNORE_INDEX} for labels in no_loss["labels"])


def test_missing_field_lists_the_available_columns(tokenizer):
    formatter = format_prompt_completion(tokenizer, completion_field="answer", max_length=32)
    with pytest.raises(MissingColumnError, match=r"`completion_field`='answer'.*\['completion', 'index', 'prompt'\]"):
        formatter(ROWS[0])
    with pytest.raises(MissingColumnError, match="`completion_field`='answer'"):
        Dataset.from_list(ROWS).map(formatter, batched=True)
    assert issubclass(MissingColumnError, ValueError)


def test_bad_values_and_options_are_refused(tokenizer):
    with pytest.raises(DataFormatError, match="must hold strings"):
        format_prompt_completion(tokenizer)({"prompt": "a", "completion": None})
    with pytest.raises(DataFormatError, match="truncation_side"):
        format_prompt_completion(tokenizer, truncation_side="middle")
    with pytest.raises(DataFormatError, match="max_length"):
        format_text(tokenizer, max_length=0)

    no_eos = tiny_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(DataFormatError, match="append_eos=False"):
        format_prompt_completion(no_eos)
    row = format_prompt_completion(no_eos, append_eos=False, max_length=32)(ROWS[0])
    assert row["input_ids"][-1] != tokenizer.eos_token_id


# Raw text and packing


@pytest.mark.parametrize("side", ["right", "left"])
def test_raw_text_labels_every_token(tokenizer, side):
    text = {"text": "the cat sat on the mat ."}
    full = [*token_ids(tokenizer, text["text"], special=True), tokenizer.eos_token_id]
    row = format_text(tokenizer, max_length=64, truncation_side=side)(text)
    cut = format_text(tokenizer, max_length=4, truncation_side=side)(text)

    assert row["input_ids"] == row["labels"] == full and not row["truncated"]
    assert row["num_loss_tokens"] == len(full) - 1
    assert cut["truncated"] and cut["labels"] == cut["input_ids"]
    assert cut["input_ids"] == (full[:4] if side == "right" else [full[0], *full[-3:]])


def stream_of(tokenizer, texts: list[str]) -> list[int]:
    return [token for text in texts for token in [*token_ids(tokenizer, text, special=True), tokenizer.eos_token_id]]


def test_packing_cuts_the_token_stream_into_blocks(tokenizer):
    texts = [row["prompt"] + row["completion"] for row in ROWS]
    dataset = Dataset.from_dict({"text": texts, "index": list(range(len(texts)))})
    stream = stream_of(tokenizer, texts)

    packed = pack_texts(dataset, tokenizer, block_size=8)
    assert packed.column_names == ["input_ids", "attention_mask", "labels"]
    assert all(len(ids) == 8 for ids in packed["input_ids"])
    assert [token for ids in packed["input_ids"] for token in ids] == stream[: len(stream) // 8 * 8]
    assert packed["labels"] == packed["input_ids"]

    kept = pack_texts(dataset, tokenizer, block_size=8, drop_remainder=False)
    assert [token for ids in kept["input_ids"] for token in ids] == stream


def test_packing_streams_and_checks_its_inputs(tokenizer, tmp_path):
    texts = [row["prompt"] for row in ROWS]
    path = write_source(tmp_path / "texts.jsonl", [{"text": text} for text in texts])
    stream = stream_of(tokenizer, texts)
    packed = pack_texts(load_dataset_any(path, streaming=True), tokenizer, block_size=8)
    assert isinstance(packed, IterableDataset)
    assert [token for row in packed for token in row["input_ids"]] == stream[: len(stream) // 8 * 8]

    with pytest.raises(MissingColumnError, match="`text_field`='content'"):
        pack_texts(Dataset.from_dict({"text": texts}), tokenizer, text_field="content")
    with pytest.raises(EmptyInputError, match="block_size"):
        pack_texts(Dataset.from_dict({"text": ["the cat"]}), tokenizer, block_size=64)


# Collation


def test_collator_pads_right_and_keeps_numeric_columns(tokenizer):
    rows = [format_prompt_completion(tokenizer, max_length=32)(row) | {"index": row["index"]} for row in ROWS[:3]]
    rows[0]["source"] = "text is dropped"
    batch = CausalCollator(tokenizer, pad_to_multiple_of=8, keep=("index",))(rows)

    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
    assert batch["input_ids"].shape == (3, 16) and batch["input_ids"].dtype == torch.long
    assert batch["index"].tolist() == [0, 1, 2] and batch["index"].dtype == torch.long
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["input_ids"][i].tolist() == row["input_ids"] + [tokenizer.pad_token_id] * (16 - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (16 - n)
        assert batch["labels"][i].tolist() == row["labels"] + [IGNORE_INDEX] * (16 - n)


def test_collator_fills_missing_labels_and_mask_from_input_ids(tokenizer):
    batch = CausalCollator(tokenizer)([{"input_ids": [1, 4]}, {"input_ids": torch.tensor([1, 4, 38])}])
    assert batch["labels"].tolist() == [[1, 4, IGNORE_INDEX], [1, 4, 38]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_collator_refuses_what_it_cannot_batch(tokenizer):
    collator = CausalCollator(tokenizer, keep="index")
    with pytest.raises(EmptyInputError):
        collator([])
    with pytest.raises(MissingColumnError, match="`keep`='index'"):
        collator([{"input_ids": [1, 4]}])
    with pytest.raises(DataFormatError, match="one number per row"):
        collator([{"input_ids": [1, 4], "index": "a"}])
    with pytest.raises(DataFormatError, match="2 values like `input_ids`"):
        collator([{"input_ids": [1, 4], "labels": [4], "index": 0}])
    with pytest.raises(DataFormatError, match="no pad token"):
        CausalCollator(tiny_tokenizer(with_pad=False))


def per_example_loss(model, batch: dict) -> torch.Tensor:
    """Summed token loss of each row, [batch]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return losses.sum(dim=1)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_padding_leaves_each_examples_loss_unchanged(tokenizer, build):
    model = build(dtype=torch.float64)
    rows = [format_prompt_completion(tokenizer, max_length=32)(row) for row in ROWS]
    collator = CausalCollator(tokenizer, pad_to_multiple_of=16)

    together = per_example_loss(model, collator(rows))
    alone = torch.cat([per_example_loss(model, CausalCollator(tokenizer)([row])) for row in rows])
    # Llama's rotary tables are computed in float32 whatever the model dtype, so its rows agree to ~1e-9 only.
    torch.testing.assert_close(together, alone, rtol=RTOL, atol=ATOL)


def test_jsonl_to_dataloader_sees_every_row_once(tokenizer, tmp_path):
    dataset = load_dataset_any(write_source(tmp_path / "rows.jsonl", ROWS))
    dataset = dataset.map(format_prompt_completion(tokenizer, max_length=16), batched=True)
    loader = DataLoader(dataset, batch_size=2, collate_fn=CausalCollator(tokenizer, keep=("index",)))

    seen = [index for batch in loader for index in batch["index"].tolist()]
    assert sorted(seen) == [row["index"] for row in ROWS]


@pytest.mark.skipif(SHARED_DATA is None, reason="shared/data not found next to the repository")
def test_shared_pool_loads_and_formats(tokenizer):
    pool = load_dataset_any(SHARED_DATA / "pool_small.jsonl")
    assert len(pool) == 984 and {"prompt", "completion", "source"} <= set(pool.column_names)

    formatted = pool.map(format_prompt_completion(tokenizer, max_length=64), batched=True)
    assert max(len(ids) for ids in formatted["input_ids"]) <= 64
    assert 0 < sum(formatted["truncated"]) < len(pool)
    assert min(formatted["num_loss_tokens"]) > 0
