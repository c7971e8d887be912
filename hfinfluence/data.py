"""Data in, model-ready batches out: loading, prompt/completion and raw-text formatting, packing, collation.

Formatted rows hold ``input_ids``, ``attention_mask`` and ``labels`` (-100 on tokens without loss),
plus ``truncated`` (bool: the row was cut to ``max_length``) and ``num_loss_tokens`` (int: labelled
tokens a causal LM predicts, i.e. not counting position 0, whose label the shifted loss never uses).
A row with ``num_loss_tokens == 0`` has no loss and no gradient; drop it with
``dataset.filter(lambda row: row["num_loss_tokens"] > 0)``.

Example:
    >>> from hfinfluence.models import tiny_tokenizer
    >>> tokenizer = tiny_tokenizer()
    >>> format_row = format_prompt_completion(tokenizer, max_length=16)
    >>> row = format_row({"prompt": "what is one plus one ?", "completion": " two"})
    >>> row["labels"]
    [-100, -100, -100, -100, -100, -100, -100, 45, 2]
    >>> CausalCollator(tokenizer)([row])["input_ids"].shape
    torch.Size([1, 9])
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from datasets import Dataset, IterableDataset, load_dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

from .errors import DataFormatError, EmptyInputError, MissingColumnError, SourceNotFoundError
from .models import hub_offline, looks_like_local_path

IGNORE_INDEX = -100
DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
MODEL_INPUTS = ("input_ids", "attention_mask", "labels")
FORMATTED_COLUMNS = (*MODEL_INPUTS, "truncated", "num_loss_tokens")
TRUNCATION_SIDES = ("left", "right")


def load_dataset_any(
    source: str | Path,
    *,
    split: str = "train",
    config: str | None = None,
    streaming: bool = False,
) -> Dataset | IterableDataset:
    """Load one split from a local data file, a folder of them, a ``save_to_disk`` folder or a Hub id.

    Args:
        source: a ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` / ``.txt`` file (all of it is the
            ``"train"`` split); a folder of such files (splits inferred from the file names, as
            ``datasets`` does); a ``save_to_disk`` folder (a saved ``Dataset`` is returned whatever
            ``split``); or a Hub dataset id.
        split: split name; slices such as ``"train[:100]"`` work except on ``save_to_disk`` folders.
        config: the Hub dataset's configuration name; local sources have none.
        streaming: return an ``IterableDataset`` that reads lazily.

    Raises:
        SourceNotFoundError: no such path, no data file in the folder, no such split in a saved
            ``DatasetDict``, or the Hub id cannot be reached (offline: it is not in the cache).
        DataFormatError: an unsupported file suffix, or ``config`` given for a local source.
        EmptyInputError: the split holds no rows.

    Example:
        >>> pool = load_dataset_any("../shared/data/pool_small.jsonl")  # doctest: +SKIP
        >>> pool.column_names  # doctest: +SKIP
        ['id', 'prompt', 'completion', 'source', 'template']
    """
    path = Path(source).expanduser()
    is_local = path.exists() or isinstance(source, Path) or looks_like_local_path(str(source))
    if is_local and config is not None:
        raise DataFormatError(f"`config`={config!r} names a Hub dataset configuration; {str(source)!r} is local.")

    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        dataset = _load_saved(path, split=split, streaming=streaming)
    elif path.exists():
        dataset = _load_local(path, split=split, streaming=streaming)
    elif is_local:
        raise SourceNotFoundError(f"`source`={str(source)!r}: no such file or folder.")
    else:
        dataset = _load_hub(str(source), split=split, config=config, streaming=streaming)

    if _is_empty(dataset):
        raise EmptyInputError(f"Split {split!r} of {str(source)!r} holds no rows.")
    return dataset


def _load_saved(path: Path, *, split: str, streaming: bool) -> Dataset | IterableDataset:
    folder = path
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise SourceNotFoundError(
                f"`split`={split!r} is not in the saved dataset at {str(path)!r}; its splits: {sorted(splits)}."
            )
        folder = path / split
    # `load_from_disk` fails with an IndexError on a saved split without rows: look first.
    if not json.loads((folder / "state.json").read_text())["_data_files"]:
        raise EmptyInputError(f"Split {split!r} of {str(path)!r} holds no rows.")

    dataset = load_from_disk(str(folder))
    return dataset.to_iterable_dataset() if streaming else dataset


def _load_local(path: Path, *, split: str, streaming: bool) -> Dataset | IterableDataset:
    if path.is_dir():
        if not any(file.suffix.lower() in DATA_SUFFIXES for file in path.rglob("*") if file.is_file()):
            raise SourceNotFoundError(f"The folder {str(path)!r} holds no {'/'.join(DATA_SUFFIXES)} file.")
        builder, data_files = str(path), None
    else:
        builder = DATA_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise DataFormatError(f"Cannot read {str(path)!r}: supported suffixes are {list(DATA_SUFFIXES)}.")
        if path.stat().st_size == 0:
            raise EmptyInputError(f"The file {str(path)!r} is empty.")
        data_files = {"train": str(path)}

    try:
        return load_dataset(builder, data_files=data_files, split=split, streaming=streaming)
    except StopIteration as e:  # the json reader's answer to a file of blank lines
        raise EmptyInputError(f"{str(path)!r} holds no rows.") from e
    except ValueError as e:  # how `datasets` refuses to build a split of zero rows
        if "corresponds to no data" not in str(e):
            raise
        raise EmptyInputError(f"Split {split!r} of {str(path)!r} holds no rows.") from e


def _load_hub(repo_id: str, *, split: str, config: str | None, streaming: bool) -> Dataset | IterableDataset:
    offline = hub_offline()
    if offline and not datasets.config.HF_HUB_OFFLINE:
        # `datasets` reads HF_HUB_OFFLINE once, at import; going on would reach for the network.
        raise SourceNotFoundError(
            f"The Hub id {repo_id!r} cannot be loaded offline: HF_HUB_OFFLINE was set after `datasets` "
            f"was imported, so `datasets` would still go online. Set it before starting Python."
        )
    try:
        return load_dataset(repo_id, config, split=split, streaming=streaming)
    except OSError as e:  # ConnectionError, DatasetNotFoundError, FileNotFoundError
        if offline:
            message = (
                f"The Hub id {repo_id!r} cannot be reached offline: HF_HUB_OFFLINE is set and it is not "
                f"in the local cache. Load it once with network access, or save it (`save_to_disk`, "
                f"`.to_json`) and pass the path, or unset HF_HUB_OFFLINE."
            )
        else:
            message = (
                f"The Hub dataset {repo_id!r} could not be loaded: check the id, `config`={config!r}, "
                f"your network and, for gated or private datasets, your login (`hf auth login`)."
            )
        raise SourceNotFoundError(message) from e


def _is_empty(dataset: Dataset | IterableDataset) -> bool:
    if isinstance(dataset, IterableDataset):
        return next(iter(dataset), None) is None
    return len(dataset) == 0


def format_prompt_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    max_length: int = 2048,
    truncation_side: str = "left",
    *,
    append_eos: bool = True,
) -> Callable[[Mapping], dict]:
    """A row formatter for fine-tuning: loss on the completion (and the eos after it), none on the prompt.

    The prompt is tokenized with the tokenizer's special tokens (a Llama bos, say), the completion
    without, so the prompt/completion boundary is exact; eos is appended to the completion. A row
    longer than ``max_length`` is cut and flagged ``truncated``:

    - ``"left"`` (default): the prompt loses tokens from its start (a leading bos is kept) so the
      completion survives; only a completion longer than ``max_length`` is itself cut, at its end.
    - ``"right"``: the joined sequence loses tokens from its end; the completion may vanish.

    Args:
        tokenizer: any ``transformers`` tokenizer; needs an eos token when ``append_eos``.
        prompt_field, completion_field: the text columns.
        max_length: tokens per row at most.
        truncation_side: ``"left"`` or ``"right"``, see above.
        append_eos: end the completion with the eos token.

    Returns:
        A function mapping a row, or a batch of rows (``dataset.map(..., batched=True)``), to
        ``input_ids``, ``attention_mask``, ``labels``, ``truncated`` and ``num_loss_tokens``.

    Raises:
        MissingColumnError: (when called) a field is not a column; the message lists the columns.
        DataFormatError: a bad option, no eos token, or (when called) a value that is not a string.

    Example:
        >>> formatter = format_prompt_completion(tokenizer, max_length=512)  # doctest: +SKIP
        >>> dataset = dataset.map(formatter, batched=True, remove_columns=dataset.column_names)  # doctest: +SKIP
        >>> dataset = dataset.filter(lambda row: row["num_loss_tokens"] > 0)  # doctest: +SKIP
    """
    eos = _check_options(tokenizer, max_length=max_length, truncation_side=truncation_side, append_eos=append_eos)
    bos_token_id = tokenizer.bos_token_id

    def format_rows(rows: Mapping) -> dict:
        prompts, batched = _text_column(rows, prompt_field, argument="prompt_field")
        completions, _ = _text_column(rows, completion_field, argument="completion_field")
        prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]

        examples = []
        for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
            completion = completion + eos
            truncated = len(prompt) + len(completion) > max_length
            if truncated:
                prompt, completion = _truncate(prompt, completion, max_length, truncation_side, bos_token_id)
            labels = [IGNORE_INDEX] * len(prompt) + completion
            examples.append(_example(prompt + completion, labels, truncated))
        return _stack(examples, batched)

    return format_rows


def format_text(
    tokenizer: PreTrainedTokenizerBase,
    text_field: str = "text",
    max_length: int = 2048,
    truncation_side: str = "right",
    *,
    append_eos: bool = True,
) -> Callable[[Mapping], dict]:
    """A row formatter for raw text: every token carries loss (``labels == input_ids``).

    Texts are tokenized with the tokenizer's special tokens and end with eos. A row longer than
    ``max_length`` is cut and flagged ``truncated``: at its end with ``"right"`` (default), at its
    start with ``"left"`` (a leading bos is kept).

    Returns:
        A function mapping a row, or a batch of rows, to ``input_ids``, ``attention_mask``,
        ``labels``, ``truncated`` and ``num_loss_tokens``.

    Raises:
        MissingColumnError: (when called) ``text_field`` is not a column.
        DataFormatError: a bad option, no eos token, or (when called) a value that is not a string.

    Example:
        >>> from hfinfluence.models import tiny_tokenizer
        >>> format_text(tiny_tokenizer(), max_length=3)({"text": "the cat sat on"})["input_ids"]
        [1, 4, 38]
    """
    eos = _check_options(tokenizer, max_length=max_length, truncation_side=truncation_side, append_eos=append_eos)

    def format_rows(rows: Mapping) -> dict:
        texts, batched = _text_column(rows, text_field, argument="text_field")
        examples = []
        for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
            ids = ids + eos
            truncated = len(ids) > max_length
            if truncated:
                ids, _ = _truncate(ids, [], max_length, truncation_side, tokenizer.bos_token_id)
            examples.append(_example(ids, list(ids), truncated))
        return _stack(examples, batched)

    return format_rows


def pack_texts(
    dataset: Dataset | IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_field: str = "text",
    block_size: int = 2048,
    append_eos: bool = True,
    drop_remainder: bool = True,
    batch_size: int = 1000,
) -> Dataset | IterableDataset:
    """Pretraining-style packing: concatenate tokenized texts, cut the stream into ``block_size`` blocks.

    Each text is tokenized with the tokenizer's special tokens and followed by eos, so documents stay
    delimited; attention still crosses document borders inside a block, as in standard causal-LM
    pretraining. The stream is cut per ``map`` batch of ``batch_size`` texts, so each batch's last
    partial block is dropped (``drop_remainder``) or kept as one shorter row.

    Returns:
        A dataset of ``input_ids``, ``attention_mask`` (all 1) and ``labels`` (``== input_ids``), one
        block a row, without the original columns.

    Raises:
        MissingColumnError: ``text_field`` is not a column.
        DataFormatError: a bad option or no eos token.
        EmptyInputError: the texts hold fewer tokens than one block (map-style datasets only).

    Example:
        >>> from hfinfluence.models import tiny_tokenizer
        >>> texts = Dataset.from_dict({"text": ["the cat sat", "on the mat"]})
        >>> [row["input_ids"] for row in pack_texts(texts, tiny_tokenizer(), block_size=4)]
        [[1, 4, 38, 40], [2, 1, 11, 4]]
    """
    eos = _check_options(tokenizer, max_length=block_size, truncation_side="right", append_eos=append_eos)
    if dataset.column_names is not None and text_field not in dataset.column_names:
        raise _missing_column(text_field, dataset.column_names, argument="text_field")

    def pack_rows(rows: Mapping) -> dict:
        texts, _ = _text_column(rows, text_field, argument="text_field")
        encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
        stream = [token for ids in encoded for token in ids + eos]
        stop = len(stream) - len(stream) % block_size if drop_remainder else len(stream)
        blocks = [stream[start : start + block_size] for start in range(0, stop, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks], "labels": blocks}

    packed = dataset.map(pack_rows, batched=True, batch_size=batch_size, remove_columns=dataset.column_names)
    if isinstance(packed, Dataset) and len(packed) == 0:
        raise EmptyInputError(f"The texts hold fewer tokens than one block, `block_size`={block_size}.")
    return packed


@dataclass
class CausalCollator:
    """Pad formatted rows into a causal-LM batch, on the right.

    ``input_ids`` are padded with the tokenizer's pad token, ``attention_mask`` with 0 and ``labels``
    with -100; a row without ``labels`` gets its ``input_ids`` as labels, one without
    ``attention_mask`` all ones. Every other column is dropped, except those named in ``keep``, which
    must hold one number per row and come back as a 1-D tensor under their name (``keep=("index",)``
    traces rows through selection).

    Args:
        tokenizer: supplies ``pad_token_id`` (`load_model_and_tokenizer` always sets one).
        pad_to_multiple_of: round the padded length up to a multiple of this.
        keep: numeric columns to return as tensors.

    Returns (when called on a list of rows):
        ``input_ids``, ``attention_mask``, ``labels``: LongTensors [batch, length]; each kept column
        a tensor [batch].

    Example:
        >>> from hfinfluence.models import tiny_tokenizer
        >>> rows = [{"input_ids": [1, 4], "index": 0}, {"input_ids": [1, 4, 38], "index": 1}]
        >>> CausalCollator(tiny_tokenizer(), keep=("index",))(rows)["labels"]
        tensor([[   1,    4, -100],
                [   1,    4,   38]])
    """

    tokenizer: PreTrainedTokenizerBase
    pad_to_multiple_of: int | None = None
    keep: Sequence[str] = ()

    def __post_init__(self):
        if self.tokenizer.pad_token_id is None:
            raise DataFormatError(
                "The tokenizer has no pad token; load it with `load_model_and_tokenizer` or set "
                "`tokenizer.pad_token = tokenizer.eos_token`."
            )
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise DataFormatError(f"`pad_to_multiple_of` must be >= 1, got {self.pad_to_multiple_of!r}.")
        self.keep = (self.keep,) if isinstance(self.keep, str) else tuple(self.keep)

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if len(features) == 0:
            raise EmptyInputError("`CausalCollator` got no rows to collate.")
        input_ids = [_long_row(feature, "input_ids") for feature in features]
        length = max(len(ids) for ids in input_ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        shape = (len(features), length)
        batch = {
            "input_ids": torch.full(shape, self.tokenizer.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros(shape, dtype=torch.long),
            "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
        }
        for i, (feature, ids) in enumerate(zip(features, input_ids, strict=True)):
            n = len(ids)
            batch["input_ids"][i, :n] = ids
            batch["attention_mask"][i, :n] = _long_row(feature, "attention_mask", like=ids, default=1)
            batch["labels"][i, :n] = _long_row(feature, "labels", like=ids, default=ids)
        for name in self.keep:
            batch[name] = _kept_column(features, name)
        return batch


def _check_options(
    tokenizer: PreTrainedTokenizerBase, *, max_length: int, truncation_side: str, append_eos: bool
) -> list[int]:
    """Check the shared formatting options; return the ids appended to every text, ``[eos]`` or ``[]``."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise DataFormatError(f"`max_length` must be a positive int, got {max_length!r}.")
    if truncation_side not in TRUNCATION_SIDES:
        raise DataFormatError(f"`truncation_side` must be 'left' or 'right', got {truncation_side!r}.")
    if not append_eos:
        return []
    if tokenizer.eos_token_id is None:
        raise DataFormatError("The tokenizer has no eos token to append; set one or pass `append_eos=False`.")
    return [tokenizer.eos_token_id]


def _missing_column(field: str, columns, *, argument: str) -> MissingColumnError:
    return MissingColumnError(
        f"`{argument}`={field!r} is not a column of the data; available columns: {sorted(columns)}."
    )


def _text_column(rows: Mapping, field: str, *, argument: str) -> tuple[list[str], bool]:
    """``(the field's strings, whether ``rows`` is a batch)`` for a row or a batch of rows."""
    if field not in rows:
        raise _missing_column(field, rows.keys(), argument=argument)
    values = rows[field]
    batched = isinstance(values, list)
    values = values if batched else [values]
    for value in values:
        if not isinstance(value, str):
            raise DataFormatError(f"Column `{argument}`={field!r} must hold strings, found {value!r}.")
    return values, batched


def _truncate(
    first: list[int], second: list[int], max_length: int, side: str, bos_token_id: int | None
) -> tuple[list[int], list[int]]:
    """Cut ``first + second`` to ``max_length`` tokens: at the end, or (``"left"``) at ``first``'s start.

    With ``"left"`` a leading bos of ``first`` is kept, and ``second`` loses tokens from its end only
    once the rest of ``first`` is gone.
    """
    if side == "right":
        first = first[:max_length]
        return first, second[: max_length - len(first)]
    head = first[:1] if bos_token_id is not None and first[:1] == [bos_token_id] else []
    body = first[len(head) :]
    room = max(max_length - len(head) - len(second), 0)
    first = head + body[len(body) - room :]
    return first, second[: max_length - len(first)]


def _example(input_ids: list[int], labels: list[int], truncated: bool) -> dict:
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": labels,
        "truncated": truncated,
        "num_loss_tokens": sum(label != IGNORE_INDEX for label in labels[1:]),
    }


def _stack(examples: list[dict], batched: bool) -> dict:
    if not batched:
        return examples[0]
    return {column: [example[column] for example in examples] for column in FORMATTED_COLUMNS}


def _long_row(feature: Mapping, name: str, *, like: torch.Tensor | None = None, default=None):
    """``feature[name]`` as a 1-D LongTensor, as long as ``like`` if given; ``default`` when absent."""
    if name not in feature:
        if default is None:
            raise _missing_column(name, feature.keys(), argument="features")
        return default
    row = torch.as_tensor(feature[name], dtype=torch.long)
    if row.ndim != 1 or (like is not None and row.shape != like.shape):
        expected = "a flat list" if like is None else f"{len(like)} values like `input_ids`"
        raise DataFormatError(f"Column {name!r} must hold {expected}, got shape {list(row.shape)}.")
    return row


def _kept_column(features: Sequence[Mapping], name: str) -> torch.Tensor:
    if any(name not in feature for feature in features):
        missing = next(feature for feature in features if name not in feature)
        raise _missing_column(name, missing.keys(), argument="keep")
    values = [feature[name] for feature in features]
    try:
        column = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataFormatError(f"`keep` column {name!r} must hold one number per row, got {values[:3]!r}.") from e
    if column.ndim != 1:
        raise DataFormatError(f"`keep` column {name!r} must hold one number per row, not {list(column.shape)}.")
    return column
