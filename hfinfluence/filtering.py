"""Offline scoring and filtering of whole datasets: sharded across processes, streamed, resumable.

A run writes one folder (``output``):

    manifest.json         the command, the settings its results depend on, the run's status and history
    .lock                 held by the writing run (pid, host); a stale lock (dead pid) is taken over
    state/                fitted curvature + target direction (`Influence.save`), reused on resume
    shards/shard-000012.parquet
                          scores of rows [12·S, 13·S), S = ``shard_size``, written atomically by the
                          process that owns the shard (shard k belongs to process k mod #processes)
    scores.parquet        every candidate: row, id, group, score, rank, truncated, loss_tokens
    kept.parquet | kept.jsonl | kept/
                          (``filter``) the kept rows, every original column + influence_score, influence_rank
    report.md, score_histogram.png

Rows are cut into shards by position, independently of the number of processes and of the batch size, and a
shard file appears only once complete (written to a temporary name, then renamed). A rerun of the same
command skips the shards that exist, so a killed run continues where it stopped and ends with the same
files as an uninterrupted one. Before writing ``scores.parquet`` the merge checks that the shards cover
every row exactly once.

Example:
    >>> job = FilterJob(                                                     # doctest: +SKIP
    ...     command="filter", output="runs/gsm8k",
    ...     candidates=SourceSpec("../shared/data/pool_small.jsonl"),
    ...     target=SourceSpec("../shared/data/targets/gsm8k.jsonl"),
    ...     select=SelectSpec(keep_ratio=0.1),
    ... )
    >>> summary = run_job(job)                                               # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import PartialState
from accelerate.utils import get_int_from_env, parse_flag_from_env
from datasets import Dataset, IterableDataset
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import InfluenceConfig
from .data import CausalCollator, format_prompt_completion, format_text, load_dataset_any
from .errors import (
    ConfigError,
    ConfigMismatchError,
    DataFormatError,
    EmptyInputError,
    InfluenceError,
    MissingColumnError,
    OutputFolderError,
    PushToHubError,
)
from .influence import Influence
from .logs import get_logger
from .models import hub_offline, load_model_and_tokenizer, looks_like_local_path
from .report import ReportInputs, log_to_wandb, sizing_table, write_report
from .selection import keep_count, select_boltzmann, select_min_score, select_top_k, select_with_quotas

logger = get_logger(__name__)

MANIFEST, LOCK, STATE_DIR, SHARD_DIR = "manifest.json", ".lock", "state", "shards"
SCORES_FILE, REPORT_FILE, HISTOGRAM_FILE = "scores.parquet", "report.md", "score_histogram.png"
OUTPUT_FORMATS = {"parquet": "kept.parquet", "jsonl": "kept.jsonl", "arrow": "kept"}
SCORE_COLUMNS = ("influence_score", "influence_rank")
MODES = ("top_k", "boltzmann")
MANIFEST_VERSION = 1
STATE_CONFIG, FIT_INFO = "influence_config.json", "fit_info.json"
GRADIENT_LIMIT_BYTES = 64 * 2**20


# ---------------------------------------------------------------------------------------------- settings


@dataclass
class SourceSpec:
    """A dataset to read: a local file or folder, a ``save_to_disk`` folder or a Hub id (with config/split)."""

    path: str
    config: str | None = None
    split: str = "train"

    def identity(self) -> dict:
        """What the results depend on: the absolute path for local sources, the id for Hub datasets."""
        local = Path(self.path).expanduser()
        source = str(local.resolve()) if local.exists() or looks_like_local_path(self.path) else self.path
        return {"source": source, "config": self.config, "split": self.split}

    def local_path(self) -> Path | None:
        local = Path(self.path).expanduser()
        return local.resolve() if local.exists() else None

    def load(self, *, streaming: bool, role: str) -> Dataset | IterableDataset:
        try:
            return load_dataset_any(self.path, split=self.split, config=self.config, streaming=streaming)
        except InfluenceError as e:
            raise type(e)(f"`--{role}`: {e}") from e


@dataclass
class ReadSpec:
    """How rows become model inputs: raw text (loss on every token) or prompt + completion (loss on the completion).

    ``truncation_side=None`` cuts prompts on the left (the completion survives) and raw text on the right.
    """

    text_field: str | None = None
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    max_length: int = 512
    truncation_side: str | None = None

    @property
    def side(self) -> str:
        if self.truncation_side is not None:
            return self.truncation_side
        return "right" if self.text_field else "left"

    def fields(self) -> dict[str, str]:
        """``{flag: column}`` for every column a row must have."""
        if self.text_field:
            return {"--text-field": self.text_field}
        return {"--prompt-field": self.prompt_field, "--completion-field": self.completion_field}

    def formatter(self, tokenizer):
        if self.text_field:
            return format_text(tokenizer, self.text_field, self.max_length, self.side)
        return format_prompt_completion(
            tokenizer, self.prompt_field, self.completion_field, self.max_length, self.side
        )

    def identity(self) -> dict:
        return {"fields": self.fields(), "max_length": self.max_length, "truncation_side": self.side}


@dataclass
class SelectSpec:
    """What to keep: exactly one of ``keep_ratio``, ``top_k``, ``min_score``; how (``mode``) and per group or not."""

    keep_ratio: float | None = None
    top_k: int | None = None
    min_score: float | None = None
    mode: str = "top_k"
    temperature: float = 1.0
    group_quotas: bool = False

    def __post_init__(self):
        rules = [v is not None for v in (self.keep_ratio, self.top_k, self.min_score)]
        if sum(rules) != 1:
            raise ConfigError("Give exactly one of `--keep-ratio`, `--top-k` and `--min-score`.")
        if self.keep_ratio is not None and not 0 < self.keep_ratio <= 1:
            raise ConfigError(f"`--keep-ratio` must be in (0, 1], got {self.keep_ratio!r}.")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"`--top-k` must be >= 1, got {self.top_k!r}.")
        if self.mode not in MODES:
            raise ConfigError(f"`--mode` must be one of {MODES}, got {self.mode!r}.")
        if self.mode == "boltzmann" and not self.temperature > 0:
            raise ConfigError(f"`--temperature` must be > 0, got {self.temperature!r}.")
        if self.min_score is not None and (self.mode != "top_k" or self.group_quotas):
            raise ConfigError(
                "`--min-score` keeps every row at or above the threshold: it takes neither `--mode boltzmann` "
                "nor `--group-quotas`; use `--keep-ratio` or `--top-k` for those."
            )


@dataclass
class FilterJob:
    """Everything `run_job` needs. ``command`` is ``"filter"`` (score, select, write the kept rows) or ``"score"``.

    Settings that change scores (model, data, reading, engine config, fit rows, shard size) are the
    manifest's ``scoring`` part; a rerun that changes them is refused unless ``overwrite``, which then
    starts over. Settings that only change the outputs (selection, format, id/group columns) are its
    ``outputs`` part: with ``overwrite`` the existing scores are reused. ``batch_size``, the number of
    processes, ``curvature_cache`` and ``gradient_cache`` (folders of fitted curvatures and of candidates'
    sketched gradients, keyed by the settings they depend on and shared by runs against different targets)
    change neither, so a resumed run may use other values.
    """

    command: str
    output: str | Path
    candidates: SourceSpec
    target: SourceSpec
    read: ReadSpec = field(default_factory=ReadSpec)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    select: SelectSpec | None = None
    model: str | None = None
    model_dtype: str = "float32"
    fit_rows: int | None = 1024
    batch_size: int = 8
    shard_size: int = 256
    streaming: bool = False
    id_field: str | None = None
    group_field: str | None = None
    output_format: str = "parquet"
    push_to_hub: str | None = None
    private: bool = True
    overwrite: bool = False
    curvature_cache: str | None = None
    gradient_cache: str | None = None
    report_to: str = "none"
    argv: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.output = Path(self.output).expanduser()
        if self.command not in ("filter", "score"):
            raise ConfigError(f"`command` must be 'filter' or 'score', got {self.command!r}.")
        if self.command == "filter" and self.select is None:
            raise ConfigError("`filter` needs a selection rule: `--keep-ratio`, `--top-k` or `--min-score`.")
        if self.output_format not in OUTPUT_FORMATS:
            raise ConfigError(f"`--format` must be one of {list(OUTPUT_FORMATS)}, got {self.output_format!r}.")
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(self, name)!r}.")
        if self.fit_rows is not None and self.fit_rows < 1:
            raise ConfigError(f"`--fit-rows` must be >= 1 (or omitted for the default), got {self.fit_rows!r}.")
        if self.select is not None and self.select.group_quotas and not self.group_field:
            raise ConfigError("`--group-quotas` needs `--group-field`, the column that names each row's group.")
        if self.report_to not in ("none", "wandb"):
            raise ConfigError(f"`--report-to` must be 'none' or 'wandb', got {self.report_to!r}.")

    def scoring_settings(self) -> dict:
        """The settings the scores depend on (JSON-ready)."""
        model = self.model or "smollm2"
        if Path(model).expanduser().exists():
            model = str(Path(model).expanduser().resolve())
        return _jsonable(
            {
                "model": model,
                "model_dtype": self.model_dtype,
                "candidates": self.candidates.identity(),
                "target": self.target.identity(),
                "read": self.read.identity(),
                "influence": self.influence.to_dict(),
                "fit_rows": self.fit_rows,
                "shard_size": self.shard_size,
            }
        )

    def output_settings(self) -> dict:
        """The settings that only change the outputs written from the scores (JSON-ready)."""
        select = asdict(self.select) if self.select is not None else None
        return _jsonable(
            {
                "select": select,
                "id_field": self.id_field,
                "group_field": self.group_field,
                "format": self.output_format if self.command == "filter" else None,
            }
        )


def _jsonable(value):
    return json.loads(json.dumps(value))


# ---------------------------------------------------------------------------------------------- run folder


class RunFolder:
    """The output folder of one run: refuses foreign folders and mismatched reruns, holds the lock and manifest."""

    def __init__(self, path: Path):
        self.path = path
        self.shards = path / SHARD_DIR

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def read_manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise OutputFolderError(
                f"`--output` {str(self.path)!r}: its {MANIFEST} is not valid JSON ({e}); it was not written by "
                "hfinfluence or was edited. Choose another `--output`."
            ) from e

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True))

    def shard_path(self, index: int) -> Path:
        return self.shards / f"shard-{index:06d}.parquet"

    def clear_partial_shards(self) -> None:
        """Remove temporary files a killed run left behind (complete shards are only ever renamed into place)."""
        if self.shards.is_dir():
            for leftover in self.shards.glob(".shard-*.tmp-*"):
                leftover.unlink(missing_ok=True)

    def done_shards(self) -> set[int]:
        if not self.shards.is_dir():
            return set()
        return {int(p.stem.split("-")[1]) for p in self.shards.glob("shard-*.parquet")}


def check_output(job: FilterJob, inputs: list[Path]) -> dict | None:
    """Refuse an ``--output`` that overlaps an input, is foreign, or holds a run with other settings.

    Returns the existing manifest to resume (or None for a fresh run). Read-only: every process may call it.
    """
    out = job.output.resolve()
    for source in inputs:
        if out == source or out in source.parents or source in out.parents:
            raise OutputFolderError(
                f"`--output` {str(job.output)!r} overlaps the input {str(source)!r}; hfinfluence never writes over "
                "or inside its inputs. Choose an `--output` folder outside them."
            )
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"`--output` {str(job.output)!r} is a file; give a folder (new or empty).")
    folder = RunFolder(out)
    manifest = folder.read_manifest()
    if manifest is None:
        if out.is_dir() and any(out.iterdir()):
            raise OutputFolderError(
                f"`--output` {str(job.output)!r} exists and is not an hfinfluence run folder (no {MANIFEST}); "
                "choose a new or empty folder. hfinfluence does not write into folders it did not create."
            )
        return None
    check_lock(out)
    differences = _differences(manifest, job)
    if differences and not job.overwrite:
        raise ConfigMismatchError(
            f"`--output` {str(job.output)!r} holds a run with other settings:\n"
            + "\n".join(f"  {key}: saved {old}, now {new}" for key, old, new in differences)
            + "\nUse another `--output`, or pass `--overwrite` to replace that run "
            "(its scores are kept when only the selection or output settings changed)."
        )
    return manifest


def _differences(manifest: dict, job: FilterJob) -> list[tuple[str, str, str]]:
    saved = {"command": manifest.get("command"), **_flatten("", manifest.get("scoring", {}))}
    saved.update(_flatten("", manifest.get("outputs", {})))
    current = {"command": job.command, **_flatten("", job.scoring_settings()), **_flatten("", job.output_settings())}
    keys = sorted(set(saved) | set(current), key=lambda k: (k != "command", k))
    return [(k, json.dumps(saved.get(k)), json.dumps(current.get(k))) for k in keys if saved.get(k) != current.get(k)]


def _flatten(prefix: str, value) -> dict:
    if not isinstance(value, dict):
        return {prefix: value}
    items = {}
    for key, inner in value.items():
        items.update(_flatten(f"{prefix}.{key}" if prefix else key, inner))
    return items


def check_lock(out: Path) -> None:
    """Refuse when a live process on this host holds the folder's lock."""
    owner = _lock_owner(out / LOCK)
    if owner is None or not _alive(owner):
        return
    raise OutputFolderError(
        f"`--output` {str(out)!r} is being written by another hfinfluence run (pid {owner['pid']} on "
        f"{owner['host']}). Wait for it to finish, or use another `--output`."
    )


def acquire_lock(out: Path) -> None:
    """Take the folder's lock (main process). A lock whose process is gone is taken over, with a warning."""
    path = out / LOCK
    owner = _lock_owner(path)
    if owner is not None:
        if _alive(owner):
            check_lock(out)
        logger.warning(f"Taking over the lock of a run that is gone (pid {owner['pid']}); resuming its work.")
        path.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError as e:
        raise OutputFolderError(f"`--output` {str(out)!r} was locked by another run just now; retry later.") from e
    with os.fdopen(fd, "w") as handle:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, handle)


def release_lock(out: Path) -> None:
    """Remove the folder's lock if this process holds it."""
    owner = _lock_owner(out / LOCK)
    if owner is not None and owner.get("pid") == os.getpid():
        (out / LOCK).unlink(missing_ok=True)


def _lock_owner(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # cannot tell from here: assume it runs
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def reset_folder(folder: RunFolder, manifest: dict, job: FilterJob) -> dict | None:
    """Apply ``--overwrite`` to a previous run: drop its outputs, and its scores too if they are stale."""
    stale_scores = manifest.get("scoring") != job.scoring_settings()
    names = [*OUTPUT_FORMATS.values(), REPORT_FILE, HISTOGRAM_FILE]
    if stale_scores:
        names += [SCORES_FILE, STATE_DIR, SHARD_DIR]
    for name in names:
        target = folder.path / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    if stale_scores:
        return None
    return {**manifest, "status": "scored" if (folder.path / SCORES_FILE).is_file() else manifest.get("status")}


# ---------------------------------------------------------------------------------------------- data


def check_columns(dataset: Dataset | IterableDataset, read: ReadSpec, *, role: str, extra: dict) -> list[str]:
    """Check that ``dataset`` has every column the job reads; return its columns.

    ``extra`` maps further flags (``--id-field``, ``--group-field``) to their columns; None entries are skipped.
    """
    columns = _column_names(dataset)
    wanted = {**read.fields(), **{k: v for k, v in extra.items() if v}}
    for flag, column in wanted.items():
        if column not in columns:
            if role == "target" and flag in read.fields():
                raise DataFormatError(
                    f"The target has no column {column!r} ({flag}), which the candidates are read with; its "
                    f"columns are {sorted(columns)}. Give the target the candidates' format (rename its columns) "
                    "so both are read the same way."
                )
            raise MissingColumnError(
                f"The {role} have no column {column!r} ({flag}); their columns are {sorted(columns)}. "
                f"Pass the right column name with {flag}."
            )
    return columns


def _column_names(dataset: Dataset | IterableDataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    return [] if first is None else list(first)


def row_batches(dataset: Dataset | IterableDataset, size: int, *, start: int = 0) -> Iterator[tuple[int, dict]]:
    """``(first row index, columns of up to ``size`` rows)``, in order, for map-style and streaming datasets."""
    if isinstance(dataset, IterableDataset):
        position = 0
        for batch in dataset.iter(batch_size=size):
            if position >= start:
                yield position, batch
            position += len(next(iter(batch.values())))
        return
    for first in range(start, len(dataset), size):
        yield first, dataset[first : first + size]


def format_rows(formatter, rows: dict) -> dict:
    """Formatted columns (input_ids, labels, truncated, num_loss_tokens, …) of a batch of raw rows."""
    if not rows or not len(next(iter(rows.values()))):
        return {"input_ids": [], "attention_mask": [], "labels": [], "truncated": [], "num_loss_tokens": []}
    return formatter(rows)


def model_batches(formatted: dict, positions: list[int], collator: CausalCollator, batch_size: int):
    """Collated batches of the formatted rows at ``positions``, longest first to spare padding.

    Yields ``(positions in this batch, batch)``. Scores do not depend on batch composition or padding, so the
    order only changes speed.
    """
    order = sorted(positions, key=lambda i: (-len(formatted["input_ids"][i]), i))
    for first in range(0, len(order), batch_size):
        chosen = order[first : first + batch_size]
        rows = [{k: formatted[k][i] for k in ("input_ids", "attention_mask", "labels")} for i in chosen]
        yield chosen, collator(rows)


def fit_row_indices(num_rows: int, fit_rows: int | None, seed: int) -> list[int]:
    """The candidate rows the curvature is fitted on: a seeded random subset of ``fit_rows``, in row order."""
    if fit_rows is None or fit_rows >= num_rows:
        return list(range(num_rows))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_rows, generator=generator)[:fit_rows].tolist())


def take_fit_rows(candidates: Dataset | IterableDataset, fit_rows: int | None, seed: int) -> dict:
    """Raw columns of the fit rows: a seeded subset of a map-style dataset, a seeded shuffle buffer of a stream."""
    if isinstance(candidates, IterableDataset):
        if fit_rows is None:
            return _all_rows(candidates)
        stream = candidates.shuffle(seed=seed, buffer_size=max(fit_rows, 1000)).take(fit_rows)
        return next(iter(stream.iter(batch_size=fit_rows)), {})
    return candidates.select(fit_row_indices(len(candidates), fit_rows, seed))[:]


def local_share(count: int, state: PartialState) -> list[int]:
    """This process's positions among ``count`` items (every item everywhere when there are fewer than processes).

    Fit and target sums are all-reduced and then divided by all-reduced counts, so giving every process all
    of a small input leaves the result unchanged.
    """
    if count < state.num_processes:
        return list(range(count))
    return list(range(state.process_index, count, state.num_processes))


@dataclass
class ReadCounts:
    """How many rows of an input were read, truncated to ``max_length``, and left without loss tokens."""

    rows: int = 0
    truncated: int = 0
    no_loss: int = 0

    def add(self, formatted: dict) -> None:
        self.rows += len(formatted["input_ids"])
        self.truncated += int(sum(formatted["truncated"]))
        self.no_loss += int(sum(n == 0 for n in formatted["num_loss_tokens"]))


# ---------------------------------------------------------------------------------------------- fitting


def prepare_engine(job: FilterJob, context: RunContext, candidates, target) -> Influence:
    """Fit the curvature (or load it from the cache) and set the target; or load both from this run's ``state/``."""
    engine = Influence(context.model, job.influence)
    state_dir = job.output / STATE_DIR
    if (state_dir / STATE_CONFIG).is_file():
        engine.load(state_dir)
        logger.info(f"Loaded the fitted curvature and target from {state_dir}.")
        return engine

    started = time.perf_counter()
    cached = fitted_curvature(engine, job, context, candidates)
    context.times["fit (loaded from cache)" if cached else "fit"] = time.perf_counter() - started
    started = time.perf_counter()
    set_target(engine, job, context, target)
    context.times["target"] = time.perf_counter() - started
    context.info["leakage"] = leakage_summary(engine)
    if context.state.is_main_process:
        engine.save(state_dir)
    context.state.wait_for_everyone()
    return engine


def curvature_key(job: FilterJob) -> str:
    """Hash of every setting the fitted curvature depends on (not the target, not the selection)."""
    settings = job.scoring_settings()
    fit = {k: settings[k] for k in ("model", "model_dtype", "candidates", "read", "influence", "fit_rows")}
    return hashlib.sha256(json.dumps(fit, sort_keys=True).encode()).hexdigest()[:20]


def fitted_curvature(engine: Influence, job: FilterJob, context: RunContext, candidates) -> bool:
    """Fit the engine, or load the fit from ``job.curvature_cache`` when one with the same settings is there.

    A fresh fit is saved to the cache (main process), so runs against other targets skip it. Returns whether
    the fit came from the cache.
    """
    folder = Path(job.curvature_cache).expanduser() / curvature_key(job) if job.curvature_cache else None
    if folder is not None and (folder / FIT_INFO).is_file():  # written last: the entry is complete
        engine.load(folder)
        context.info["fit"] = json.loads((folder / FIT_INFO).read_text())
        logger.info(f"Loaded the fitted curvature from the cache {folder}.")
        return True
    fit_engine(engine, job, context, candidates)
    if folder is not None and context.state.is_main_process:
        engine.save(folder)
        atomic_write_text(folder / FIT_INFO, json.dumps(context.info["fit"]))
    context.state.wait_for_everyone()
    return False


def set_target(engine: Influence, job: FilterJob, context: RunContext, target) -> None:
    """Give the engine the target direction: every target row read like the candidates, split over processes."""
    formatted = format_rows(context.formatter, target[:] if isinstance(target, Dataset) else _all_rows(target))
    _, mine = _labelled_rows(
        formatted,
        "target",
        job,
        context,
        empty=f"No target row keeps a labelled token within `--max-length` {job.read.max_length}; raise "
        "`--max-length` or check the target's fields.",
    )
    engine.set_target(batch for _, batch in model_batches(formatted, mine, context.collator, job.batch_size))


def fit_engine(engine: Influence, job: FilterJob, context: RunContext, candidates) -> None:
    """Fit the curvature on the seeded subset of ``job.fit_rows`` candidate rows, split over processes."""
    raw = take_fit_rows(candidates, job.fit_rows, job.influence.seed)
    formatted = format_rows(context.formatter, raw)
    usable, mine = _labelled_rows(
        formatted,
        "fit",
        job,
        context,
        empty=f"None of the {len(formatted['input_ids'])} rows drawn to fit the curvature has a labelled token "
        f"within `--max-length` {job.read.max_length}; raise `--max-length` or check the fields.",
    )
    logger.info(f"Fitting the curvature on {len(usable)} candidate rows.")
    engine.fit(batch for _, batch in model_batches(formatted, mine, context.collator, job.batch_size))


def _labelled_rows(
    formatted: dict, stage: str, job: FilterJob, context: RunContext, *, empty: str
) -> tuple[list[int], list[int]]:
    """The rows of ``formatted`` with a labelled token, all and this process's share; counts go to ``info[stage]``.

    Raises `EmptyInputError` with the message ``empty`` when no row has one.
    """
    context.info[stage] = counts_of(formatted)
    warn_read_counts(stage, context.info[stage], job.read)
    usable = [i for i, n in enumerate(formatted["num_loss_tokens"]) if n > 0]
    if not usable:
        raise EmptyInputError(empty)
    return usable, [usable[i] for i in local_share(len(usable), context.state)]


def _all_rows(dataset: IterableDataset) -> dict:
    columns: dict[str, list] = {}
    for _, batch in row_batches(dataset, 1000):
        for key, values in batch.items():
            columns.setdefault(key, []).extend(values)
    return columns


def counts_of(formatted: dict) -> dict:
    """`ReadCounts` of formatted rows, as a dict for the manifest."""
    counts = ReadCounts()
    counts.add(formatted)
    return asdict(counts)


def warn_read_counts(role: str, counts: dict, read: ReadSpec) -> None:
    """Say how many rows of an input were truncated or lost every labelled token (both are in the report too)."""
    if counts["truncated"]:
        logger.warning(
            f"{counts['truncated']} of {counts['rows']} {role} rows are longer than `--max-length` {read.max_length} "
            f"and were truncated ({read.side} side); raise `--max-length` to keep them whole."
        )
    if counts["no_loss"]:
        logger.warning(
            f"{counts['no_loss']} of {counts['rows']} {role} rows have no labelled token within `--max-length` "
            f"{read.max_length}: they are left out (candidates: not scored, never kept). Raise `--max-length` or "
            "use `--truncation-side left` to keep completions."
        )


def leakage_summary(engine: Influence) -> dict | None:
    """The engine's leakage diagnostic of the current target, JSON-ready (None when it has none)."""
    report = getattr(engine, "leakage_report", None)
    if report is None:
        return None
    return {"total": report.total, "worst_layers": report.worst_layers(), "text": str(report)}


# ---------------------------------------------------------------------------------------------- scoring


@dataclass
class RunContext:
    """What the stages share within one invocation: process state, model, tokenizer, timings and findings."""

    state: PartialState
    model: torch.nn.Module | None = None
    tokenizer: object = None
    formatter: object = None
    collator: CausalCollator | None = None
    times: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def score_shards(job: FilterJob, context: RunContext, engine: Influence, candidates, folder: RunFolder) -> int:
    """Score every shard this process owns and has no file yet; return the number of candidate rows."""
    state, done = context.state, folder.done_shards()
    folder.shards.mkdir(parents=True, exist_ok=True)
    total = len(candidates) if isinstance(candidates, Dataset) else None
    owned = _owned_rows(total, job.shard_size, state, done)
    bar = tqdm(total=owned, unit="row", desc="score candidates", disable=not _progress(state), smoothing=0.1)
    cache = GradientCache(job, engine) if job.gradient_cache else None
    seen = [0]
    for index, first, rows in pending_shards(candidates, job.shard_size, state, done, seen):
        table = score_shard(
            rows, first, engine, context, batch_size=job.batch_size, cache=cache, index=index, progress=bar.update
        )
        write_shard(folder.shard_path(index), table, state)
    bar.close()
    return seen[0] if total is None else total


def pending_shards(candidates, shard_size: int, state: PartialState, done: set[int], seen: list[int]):
    """``(shard index, first row, raw rows)`` of the shards this process owns and has not written yet.

    A map-style dataset is sliced shard by shard; a stream is read through (every process reads all of it, and
    ``seen[0]`` ends as its length).
    """

    def wanted(index: int) -> bool:
        return index % state.num_processes == state.process_index and index not in done

    if isinstance(candidates, Dataset):
        seen[0] = len(candidates)
        for index in range(-(-len(candidates) // shard_size)):
            if wanted(index):
                yield index, index * shard_size, candidates[index * shard_size : (index + 1) * shard_size]
        return
    for first, rows in row_batches(candidates, shard_size):
        seen[0] = first + len(next(iter(rows.values())))
        if wanted(first // shard_size):
            yield first // shard_size, first, rows


def _owned_rows(total: int | None, shard_size: int, state: PartialState, done: set[int]) -> int | None:
    if total is None:
        return None
    shards = range(-(-total // shard_size))
    mine = [k for k in shards if k % state.num_processes == state.process_index and k not in done]
    return sum(min(shard_size, total - k * shard_size) for k in mine)


def _progress(state: PartialState) -> bool:
    return state.is_main_process and os.environ.get("HFINFLUENCE_PROGRESS", "1") != "0"


def score_shard(
    rows: dict,
    first: int,
    engine: Influence,
    context: RunContext,
    *,
    batch_size: int,
    cache: GradientCache | None = None,
    index: int = 0,
    progress=None,
) -> pa.Table:
    """Score one shard's raw rows; rows without a labelled token get a null score.

    With a gradient ``cache`` the rows' sketched gradients are read from it (or computed and stored) and scored
    by a dot product with the target direction; otherwise `Influence.score` scores each batch.
    ``progress(n)`` is called with the number of rows done after each batch.
    """
    formatted = format_rows(context.formatter, rows)
    count = len(formatted["input_ids"])
    scores = np.full(count, np.nan)
    usable = [i for i, n in enumerate(formatted["num_loss_tokens"]) if n > 0]
    progress = progress or (lambda rows: None)
    reported = [0]
    batches = _reporting(model_batches(formatted, usable, context.collator, batch_size), progress, reported)
    if cache is None:
        for chosen, batch in batches:
            scores[chosen] = engine.score(batch).to(torch.float64).numpy()
    elif usable:
        gradients = cache.load(index, usable)
        if gradients is None:
            gradients = cache.compute(engine, batches, usable)
            cache.save(index, usable, gradients)
        scores[usable] = (gradients.to(torch.float64) @ cache.direction.to(torch.float64)).numpy()
    progress(count - reported[0])  # rows read from the cache, rows without loss
    return pa.table(
        {
            "row": pa.array(np.arange(first, first + count), pa.int64()),
            "score": pa.array(scores, pa.float64(), from_pandas=True),
            "truncated": pa.array(formatted["truncated"], pa.bool_()),
            "loss_tokens": pa.array(formatted["num_loss_tokens"], pa.int32()),
        }
    )


def _reporting(batches, progress, reported: list[int]):
    """Pass ``batches`` through, calling ``progress(rows)`` once each batch has been used."""
    for chosen, batch in batches:
        yield chosen, batch
        progress(len(chosen))
        reported[0] += len(chosen)


class GradientCache:
    """Candidates' sketched gradients, one file per shard, shared by runs that differ only in their target.

    The gradients depend on the model, the candidates, how they are read and the fitted sketches, so the
    folder is keyed by the curvature key and the shard size. A later run against another target reads them and
    scores each row by one dot product instead of a forward+backward pass. Each row costs
    Σ_layers m_E · m_A values on disk, so this needs real sketches: rows above `GRADIENT_LIMIT_BYTES` are refused.
    """

    def __init__(self, job: FilterJob, engine: Influence):
        self.folder = Path(job.gradient_cache).expanduser() / f"{curvature_key(job)}-shard{job.shard_size}"
        self.names = sorted(engine.layers)  # a loaded engine lists its layers in another order than a fitted one
        shapes = [[name, engine.layers[name].sketch_dim_e, engine.layers[name].sketch_dim_a] for name in self.names]
        self.layout = json.dumps(shapes)
        row_bytes = sum(lay.sketch_dim_e * lay.sketch_dim_a for lay in engine.layers.values()) * 4
        if row_bytes > GRADIENT_LIMIT_BYTES:
            raise ConfigError(
                f"`--gradient-cache` would store {row_bytes / 2**20:.0f} MiB per row (the sketches barely compress "
                "this model); set `--sketch-budget` or `--sketch-dims`, or drop `--gradient-cache`."
            )
        self.direction = torch.cat([engine.target[name].reshape(-1) for name in self.names]).cpu()
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.folder / f"shard-{index:06d}.safetensors"

    def load(self, index: int, usable: list[int]) -> torch.Tensor | None:
        """The shard's stored gradients [rows, values], or None when absent or made for other rows."""
        if not self.path(index).is_file():
            return None
        with safe_open(str(self.path(index)), framework="pt") as handle:
            layout = (handle.metadata() or {}).get("layout")
            stored = {key: handle.get_tensor(key) for key in handle.keys()}
        if layout != self.layout or stored["positions"].tolist() != usable:
            logger.warning(f"Ignoring {self.path(index)}: it was made for other rows or sketches.")
            return None
        return stored["gradients"]

    def compute(self, engine: Influence, batches, usable: list[int]) -> torch.Tensor:
        """Sketched gradients [len(usable), values] of the usable rows, in ``usable`` order."""
        where = {position: i for i, position in enumerate(usable)}
        out = torch.empty(len(usable), self.direction.numel(), dtype=self.direction.dtype)
        for chosen, batch in batches:
            layers = engine.sketch_gradients(batch, candidates=True)  # also feeds the seed check
            flat = torch.cat([layers[name].reshape(len(chosen), -1) for name in self.names], dim=1)
            out[[where[c] for c in chosen]] = flat.detach().cpu().to(out.dtype)
        return out

    def save(self, index: int, usable: list[int], gradients: torch.Tensor) -> None:
        tmp = self.folder / f".{self.path(index).name}.tmp-{os.getpid()}"
        positions = torch.tensor(usable, dtype=torch.int64)
        tensors = {"positions": positions, "gradients": gradients.contiguous()}
        save_file(tensors, str(tmp), metadata={"layout": self.layout})
        os.replace(tmp, self.path(index))


def write_shard(path: Path, table: pa.Table, state: PartialState) -> None:
    """Write a shard atomically, recording which of how many processes wrote it."""
    writer = {b"process_index": str(state.process_index).encode(), b"num_processes": str(state.num_processes).encode()}
    table = table.replace_schema_metadata(writer)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def merge_shards(folder: RunFolder, num_rows: int, shard_size: int) -> tuple[pa.Table, dict[int, list[int]]]:
    """Concatenate the shards and check that they cover rows 0 … num_rows-1 exactly once.

    Returns the merged table (row order) and, per process index, the shards it wrote.
    """
    expected = -(-num_rows // shard_size)
    present = sorted(folder.done_shards())
    if present != list(range(expected)):
        missing = sorted(set(range(expected)) - set(present))
        extra = sorted(set(present) - set(range(expected)))
        raise EmptyInputError(
            f"Shards of {str(folder.path)!r} do not match {num_rows} rows: missing {missing[:10]}, unexpected "
            f"{extra[:10]}. Did the candidates change? Rerun with `--overwrite`."
        )
    tables, writers = [], {}
    for index in present:
        table = pq.read_table(folder.shard_path(index))
        writer = int((table.schema.metadata or {}).get(b"process_index", b"-1"))
        writers.setdefault(writer, []).append(index)
        tables.append(table.replace_schema_metadata(None))
    merged = pa.concat_tables(tables)
    rows = merged.column("row").to_numpy()
    if not np.array_equal(rows, np.arange(num_rows)):
        raise EmptyInputError(
            f"The shards of {str(folder.path)!r} do not cover each of the {num_rows} rows exactly once. "
            "Rerun with `--overwrite`."
        )
    return merged, writers


def rank_scores(scores: np.ndarray) -> np.ndarray:
    """Rank 1 = highest score, ties by row; NaN (unscored) rows get rank 0 (none)."""
    valid = np.flatnonzero(~np.isnan(scores))
    order = valid[np.lexsort((valid, -scores[valid]))]
    ranks = np.zeros(scores.shape[0], dtype=np.int64)
    ranks[order] = np.arange(1, order.size + 1)
    return ranks


def attach_columns(merged: pa.Table, candidates, job: FilterJob) -> pa.Table:
    """``scores.parquet``: row, id, group, score, rank, truncated, loss_tokens (nulls for unscored rows)."""
    scores = merged.column("score").to_numpy(zero_copy_only=False)
    ranks = rank_scores(scores)
    columns = {"row": merged.column("row")}
    columns.update(read_columns(candidates, [c for c in (job.id_field, job.group_field) if c]))
    columns["score"] = merged.column("score")
    columns["rank"] = pa.array(ranks, pa.int64(), mask=ranks == 0)
    columns["truncated"] = merged.column("truncated")
    columns["loss_tokens"] = merged.column("loss_tokens")
    renamed = {job.id_field: "id", job.group_field: "group"}
    return pa.table({renamed.get(name, name): column for name, column in columns.items()})


def read_columns(dataset: Dataset | IterableDataset, names: list[str]) -> dict[str, pa.Array]:
    """The columns ``names`` of every row, as Arrow arrays (one extra pass over a stream)."""
    if not names:
        return {}
    if isinstance(dataset, Dataset):
        table = dataset.select_columns(names).with_format("arrow")[:]
        return {name: table.column(name).combine_chunks() for name in names}
    values: dict[str, list] = {name: [] for name in names}
    for _, batch in row_batches(dataset.select_columns(names), 10_000):
        for name in names:
            values[name].extend(batch[name])
    return {name: pa.array(column) for name, column in values.items()}


# ---------------------------------------------------------------------------------------------- selection


def select_rows(scores: np.ndarray, select: SelectSpec, *, groups: list | None, seed: int) -> np.ndarray:
    """Row indices kept by ``select`` among the scored rows, in row order."""
    valid = np.flatnonzero(~np.isnan(scores))
    values = torch.from_numpy(scores[valid])
    if select.min_score is not None:
        chosen = select_min_score(values, select.min_score)
        return np.sort(valid[chosen.numpy()])

    ratio = select.keep_ratio if select.keep_ratio is not None else min(1.0, select.top_k / max(valid.size, 1))
    pick = select_top_k
    if select.mode == "boltzmann":
        generator = torch.Generator().manual_seed(seed)

        def pick(s, k):
            return select_boltzmann(s, k, tau=select.temperature, generator=generator)

    if select.group_quotas:
        chosen = select_with_quotas(values, [groups[i] for i in valid], ratio, select=pick)
    else:
        k = keep_count(valid.size, ratio) if select.keep_ratio is not None else min(select.top_k, valid.size)
        chosen = pick(values, k)
    return np.sort(valid[chosen.numpy()])


def kept_dataset(candidates, kept: np.ndarray, scores: np.ndarray, ranks: np.ndarray, cache: Path) -> Dataset:
    """The kept rows, in row order, with every original column plus influence_score and influence_rank."""
    if isinstance(candidates, Dataset):
        subset = candidates.select(kept.tolist())
    else:
        subset = _collect_rows(candidates, kept, cache)
    replaced = [c for c in SCORE_COLUMNS if c in subset.column_names]
    if replaced:
        logger.warning(f"The candidates already have {replaced}; they are replaced by this run's values.")
        subset = subset.remove_columns(replaced)
    subset = subset.add_column("influence_score", scores[kept].tolist())
    return subset.add_column("influence_rank", ranks[kept].tolist())


def _collect_rows(stream: IterableDataset, kept: np.ndarray, cache: Path) -> Dataset:
    wanted = set(kept.tolist())

    def generate():
        for first, batch in row_batches(stream, 1000):
            for offset in range(len(next(iter(batch.values())))):
                if first + offset in wanted:
                    yield {key: values[offset] for key, values in batch.items()}

    digest = hashlib.sha256(kept.astype(np.int64).tobytes()).hexdigest()[:16]
    return Dataset.from_generator(generate, cache_dir=str(cache), fingerprint=f"kept-{digest}")


def write_kept(dataset: Dataset, out: Path, output_format: str) -> Path:
    """Write the kept rows atomically: kept.parquet, kept.jsonl or a ``save_to_disk`` folder ``kept/``."""
    final = out / OUTPUT_FORMATS[output_format]
    tmp = out / f".{final.name}.tmp-{os.getpid()}"
    if output_format == "parquet":
        dataset.to_parquet(str(tmp))
    elif output_format == "jsonl":
        write_jsonl(dataset, tmp)
    else:
        dataset.save_to_disk(str(tmp))
        if final.exists():
            shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def write_jsonl(dataset: Dataset, path: Path) -> None:
    """One JSON object per row. Floats keep every digit (pandas' writer, behind `Dataset.to_json`, rounds them to
    10); values JSON cannot hold (dates, bytes) are written as their ``str``."""
    with open(path, "w", encoding="utf-8") as handle:
        for batch in dataset.iter(batch_size=1000):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns), strict=True):
                handle.write(json.dumps(dict(zip(columns, values, strict=True)), ensure_ascii=False, default=str))
                handle.write("\n")


# ---------------------------------------------------------------------------------------------- hub


def check_push(repo: str | None) -> None:
    """Refuse ``--push-to-hub`` up front (before any work) when it cannot succeed: offline or not logged in."""
    if repo is None:
        return
    if hub_offline():
        raise PushToHubError(
            f"`--push-to-hub` {repo!r} needs the network, but HF_HUB_OFFLINE is set. Unset it, or drop "
            "`--push-to-hub` and upload the written folder later (`hf upload`)."
        )
    import huggingface_hub

    if huggingface_hub.get_token() is None:
        raise PushToHubError(
            f"`--push-to-hub` {repo!r} needs a Hugging Face login: run `hf auth login` or set HF_TOKEN first."
        )


def push_kept(dataset: Dataset, repo: str, *, private: bool) -> None:
    """Upload the kept rows as a Hub dataset (private unless ``private=False``)."""
    try:
        dataset.push_to_hub(repo, private=private)
    except (OSError, ValueError) as e:
        raise PushToHubError(
            f"Pushing to the Hub dataset {repo!r} failed ({type(e).__name__}: {e}). The outputs on disk are "
            "complete; push them later with `hf upload`."
        ) from e


# ---------------------------------------------------------------------------------------------- orchestration


@contextlib.contextmanager
def collect_notes(notes: list[str]):
    """Record what the run tells the user (warnings, and the tokenizer fixes the model loader makes) for the report."""
    package = logging.getLogger("hfinfluence")

    class NoteHandler(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING or record.name == "hfinfluence.models":
                notes.append(record.getMessage())

    handler = NoteHandler(level=logging.INFO)
    loader = logging.getLogger("hfinfluence.models")
    previous = loader.level
    loader.setLevel(min(loader.getEffectiveLevel(), logging.INFO))
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        loader.setLevel(previous)


def load_model(job: FilterJob, context: RunContext) -> None:
    """Load the model and tokenizer onto this process's device; build the row formatter and collator."""
    started = time.perf_counter()
    dtype = getattr(torch, job.model_dtype)
    model, tokenizer = load_model_and_tokenizer(job.model, dtype=dtype, device=context.state.device)
    context.model, context.tokenizer = model, tokenizer
    context.formatter = job.read.formatter(tokenizer)
    context.collator = CausalCollator(tokenizer)
    context.times["load model"] = time.perf_counter() - started


def process_state() -> PartialState:
    """accelerate's process state, joined to the launcher's process group also on CPU.

    `PartialState` only forms a CPU process group when told the run is on CPU; an `accelerate launch --cpu` or a
    machine without an accelerator is. A launcher that started several processes which still see a world of one
    would have each score everything into the same folder, so that is refused.
    """
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not _has_accelerator()
    state = PartialState(cpu=cpu)
    launched = get_int_from_env(["WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    if launched > 1 and state.num_processes != launched:
        raise ConfigError(
            f"The launcher started {launched} processes but accelerate sees {state.num_processes}; each would score "
            "every row. Launch with `accelerate launch` (add `--cpu` on CPU) or `torchrun`."
        )
    return state


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


@dataclass
class RunSummary:
    """What a run produced: paths, counts and this invocation's wall times (seconds per stage)."""

    output: Path
    num_rows: int
    scored: int
    kept: int | None
    resumed_shards: int
    files: dict[str, Path]
    times: dict[str, float]
    notes: list[str]


def run_job(job: FilterJob) -> RunSummary:
    """Score (and for ``filter`` select and write) the candidates of ``job``; resumes a previous run of it.

    Every process of an ``accelerate launch`` calls this; outputs are written by the main process.
    """
    started = time.perf_counter()
    context = RunContext(state=process_state())
    check_push(job.push_to_hub)
    with collect_notes(context.notes):
        candidates = job.candidates.load(streaming=job.streaming, role="candidates")
        target = job.target.load(streaming=job.streaming, role="target")
        extra = {"--id-field": job.id_field, "--group-field": job.group_field}
        check_columns(candidates, job.read, role="candidates", extra=extra)
        check_columns(target, job.read, role="target", extra={})
        folder, manifest, resumed = open_run(job, context)
        try:
            if manifest.get("status") not in ("scored", "complete"):
                manifest = score_all(job, context, candidates, target, folder, manifest)
            summary = finish(job, context, candidates, folder, manifest)
        finally:
            context.state.wait_for_everyone()
            if context.state.is_main_process:
                release_lock(folder.path)
    summary.resumed_shards = resumed
    summary.times["total"] = time.perf_counter() - started
    return summary


def input_paths(job: FilterJob) -> list[Path]:
    """Local paths the job reads (candidates, target, model), which outputs must stay clear of."""
    paths = [job.candidates.local_path(), job.target.local_path()]
    if job.model is not None and Path(job.model).expanduser().exists():
        paths.append(Path(job.model).expanduser().resolve())
    return [p for p in paths if p is not None]


def open_run(job: FilterJob, context: RunContext) -> tuple[RunFolder, dict, int]:
    """Check the output folder on every process; the main process locks it and writes the manifest."""
    existing = check_output(job, input_paths(job))
    folder = RunFolder(job.output.resolve())
    context.state.wait_for_everyone()  # every process has looked at the folder before the main one writes to it
    if context.state.is_main_process:
        folder.path.mkdir(parents=True, exist_ok=True)
        acquire_lock(folder.path)
        if existing is not None and job.overwrite:
            existing = reset_folder(folder, existing, job)
        folder.clear_partial_shards()
        manifest = existing or {"version": MANIFEST_VERSION, "status": "started", "history": [], "info": {}}
        manifest.update(command=job.command, scoring=job.scoring_settings(), outputs=job.output_settings())
        manifest["history"].append(
            {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "processes": context.state.num_processes, "argv": job.argv}
        )
        folder.write_manifest(manifest)
    context.state.wait_for_everyone()
    manifest = folder.read_manifest()
    resumed = len(folder.done_shards())
    if resumed:
        logger.info(f"Resuming: {resumed} shard(s) of scores already in {folder.shards}.")
    return folder, manifest, resumed


def score_all(job: FilterJob, context: RunContext, candidates, target, folder: RunFolder, manifest: dict) -> dict:
    """Load the model, fit (or reload) the engine, score every shard and merge them into ``scores.parquet``."""
    load_model(job, context)
    engine = prepare_engine(job, context, candidates, target)
    info = manifest.setdefault("info", {})
    for key in ("fit", "target", "leakage"):
        if key in context.info:
            info[key] = context.info[key]
    order = {name: i for i, name in enumerate(engine.tracked)}  # model order, also after `Influence.load`
    info.setdefault("sizing", sorted(engine.sizing().to_dicts(), key=lambda row: order[row["module"]]))
    info["memory_plan"] = str(engine.memory_plan(batch_size=job.batch_size, tokens=job.read.max_length))
    info["notes"] = list(dict.fromkeys([*info.get("notes", []), *context.notes]))
    if context.state.is_main_process:
        logger.info(f"Sizing:\n{sizing_table(info)}\n{info['memory_plan']}")
        folder.write_manifest({**manifest, "status": "scoring"})

    started = time.perf_counter()
    num_rows = score_shards(job, context, engine, candidates, folder)
    context.times["score"] = time.perf_counter() - started
    if engine.seed_check is not None:  # this process's first scored candidates (the main process's are reported)
        info["seed_check"] = {**asdict(engine.seed_check), "text": str(engine.seed_check)}
    context.state.wait_for_everyone()
    if context.state.is_main_process:
        merged, writers = merge_shards(folder, num_rows, job.shard_size)
        table = attach_columns(merged, candidates, job)
        write_parquet(table, folder.path / SCORES_FILE)
        manifest["history"][-1]["shards_by_process"] = {str(k): v for k, v in sorted(writers.items())}
        manifest.update(status="scored", num_rows=num_rows)
        folder.write_manifest(manifest)
    context.state.wait_for_everyone()
    return folder.read_manifest()


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def finish(job: FilterJob, context: RunContext, candidates, folder: RunFolder, manifest: dict) -> RunSummary:
    """Main process: select, write the kept rows, the report (and W&B, Hub); mark the run complete."""
    table = pq.read_table(folder.path / SCORES_FILE)
    scores = table.column("score").to_numpy(zero_copy_only=False)
    files = {"scores": folder.path / SCORES_FILE}
    summary = RunSummary(folder.path, len(scores), int((~np.isnan(scores)).sum()), None, 0, files, context.times, [])
    if not context.state.is_main_process:
        return summary

    truncated = table.column("truncated").to_numpy(zero_copy_only=False)
    counts = {"rows": len(scores), "truncated": int(truncated.sum()), "no_loss": int(np.isnan(scores).sum())}
    warn_read_counts("candidate", counts, job.read)
    info = manifest.setdefault("info", {})
    info["notes"] = list(dict.fromkeys([*info.get("notes", []), *context.notes]))

    started = time.perf_counter()
    kept, dataset = write_selection(job, candidates, table, folder, files) if job.command == "filter" else (None, None)
    context.times["write"] = time.perf_counter() - started
    inputs = ReportInputs(job, manifest, table, kept, context.times, examples(candidates, table, job.read))
    files.update(write_report(inputs, folder.path))
    if job.report_to == "wandb":
        log_to_wandb(inputs, folder.path)
    if job.push_to_hub and dataset is not None:
        push_kept(dataset, job.push_to_hub, private=job.private)

    manifest.update(status="complete", outputs_written={k: str(v.name) for k, v in files.items()})
    folder.write_manifest(manifest)
    shutil.rmtree(folder.shards, ignore_errors=True)
    summary.kept = None if kept is None else int(kept.size)
    summary.notes = info["notes"]
    return summary


def write_selection(job: FilterJob, candidates, table: pa.Table, folder: RunFolder, files: dict):
    """Select rows from the scores and write them (``files["kept"]``); return (kept row indices, kept dataset)."""
    scores = table.column("score").to_numpy(zero_copy_only=False)
    ranks = table.column("rank").fill_null(0).to_numpy()
    groups = table.column("group").to_pylist() if "group" in table.column_names else None
    kept = select_rows(scores, job.select, groups=groups, seed=job.influence.seed)
    dataset = kept_dataset(candidates, kept, scores, ranks, folder.path / ".cache")
    files["kept"] = write_kept(dataset, folder.path, job.output_format)
    shutil.rmtree(folder.path / ".cache", ignore_errors=True)
    return kept, dataset


def examples(candidates, table: pa.Table, read: ReadSpec, count: int = 10) -> dict[str, list[dict]]:
    """The ``count`` highest- and lowest-scored rows as ``{row, score, text}``, text shortened for the report."""
    ranks = table.column("rank").fill_null(0).to_numpy()
    scores = table.column("score").to_numpy(zero_copy_only=False)
    order = np.argsort(np.where(ranks > 0, ranks, np.iinfo(np.int64).max), kind="stable")[: int((ranks > 0).sum())]
    picks = {"highest": order[:count].tolist(), "lowest": order[::-1][:count].tolist()}
    wanted = sorted({i for rows in picks.values() for i in rows})
    texts = dict(zip(wanted, _texts(candidates, wanted, read), strict=True))
    return {
        side: [{"row": i, "score": float(scores[i]), "rank": int(ranks[i]), "text": texts[i]} for i in rows]
        for side, rows in picks.items()
    }


def _texts(candidates, rows: list[int], read: ReadSpec) -> list[str]:
    if isinstance(candidates, Dataset):
        chosen = candidates.select(rows)[:]
    else:
        wanted, chosen = set(rows), {}
        for first, batch in row_batches(candidates, 1000):
            for offset in range(len(next(iter(batch.values())))):
                if first + offset in wanted:
                    for key, values in batch.items():
                        chosen.setdefault(key, []).append(values[offset])
    if read.text_field:
        return [str(t) for t in chosen.get(read.text_field, [])]
    pairs = zip(chosen.get(read.prompt_field, []), chosen.get(read.completion_field, []), strict=True)
    return [f"{p} ⟶ {c}" for p, c in pairs]


def size_report(
    *,
    model: str | None,
    candidates: SourceSpec,
    read: ReadSpec,
    influence: InfluenceConfig,
    fit_rows: int | None = 256,
    batch_size: int = 8,
    streaming: bool = False,
    model_dtype: str = "float32",
) -> str:
    """``hfinfluence size``: the memory plan before fitting, then the sizing table and plan after fitting.

    The fit runs on ``fit_rows`` candidate rows (a seeded random subset); nothing is scored or written.
    """
    context = RunContext(state=process_state())
    with collect_notes(context.notes):
        dataset = candidates.load(streaming=streaming, role="candidates")
        check_columns(dataset, read, role="candidates", extra={})
        job = FilterJob(
            command="score", output=".", candidates=candidates, target=candidates, read=read, influence=influence,
            model=model, model_dtype=model_dtype, fit_rows=fit_rows, batch_size=batch_size,
        )  # fmt: skip
        load_model(job, context)
        engine = Influence(context.model, influence)
        before = engine.memory_plan(batch_size=batch_size, tokens=read.max_length)
        if context.state.is_main_process:
            logger.info(f"{len(engine.tracked)} tracked modules; before the fit:\n{before}")
        started = time.perf_counter()
        fit_engine(engine, job, context, dataset)
        seconds = time.perf_counter() - started
    after = engine.memory_plan(batch_size=batch_size, tokens=read.max_length)
    fit = context.info["fit"]
    return (
        f"sizing from a fit on {fit['rows']} candidate rows ({seconds:.0f} s; {fit['truncated']} truncated to "
        f"{read.max_length} tokens):\n{engine.sizing()}\n{after}"
    )
