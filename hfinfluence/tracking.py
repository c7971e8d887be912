"""Metrics for W&B and any ``report_to`` backend: selection metrics, score histograms, tables; offline runs read back.

Scalars go through the usual `Trainer.log` path, so every ``report_to`` integration sees them; keys are
namespaced ``influence/…`` (scores, curvature, target) and ``select/…`` (what was kept). Histograms and tables
are W&B media, logged straight to the active run (W&B is imported lazily, nothing is logged without a run).

Nothing needs a login: with ``WANDB_MODE=offline`` a run is written to ``./wandb/offline-run-*`` and can be
uploaded later with ``wandb sync <folder>``. `read_offline_run` parses such a folder without the network.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.integrations import WandbCallback
from transformers.integrations.integration_utils import rewrite_logs

NAMESPACES = ("influence/", "select/")
STEP_KEY = "train/global_step"


def selection_metrics(
    scores: torch.Tensor,
    weights: torch.Tensor,
    *,
    groups: Sequence[str] | None = None,
    group_names: Sequence[str] | None = None,
    losses: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
) -> dict[str, float]:
    """Summary of one or more scored buffers: [n] ``scores`` (NaN = not scored) and [n] loss ``weights`` (0 = dropped).

    Returns ``influence/score_mean``, ``influence/score_std``, ``influence/kept_score_mean`` (weighted by the
    weights) when any score is finite; ``select/kept_fraction``, ``select/weight_min``, ``select/weight_max``,
    ``select/effective_fraction`` = (Σw)² / (n Σw²) (1 for uniform weights, the kept fraction for 0/1 weights);
    ``influence/buffer_loss`` = Σ losses / Σ tokens when given; and ``select/kept/<group>``, the number of
    examples with w > 0 per group, when ``groups`` ([n] labels) is given: for every name in ``group_names``
    (default: the groups present), so each log has the same keys.
    """
    weights = weights.to(torch.float64)
    metrics = {
        "select/kept_fraction": float((weights > 0).double().mean()),
        "select/weight_min": float(weights.min()),
        "select/weight_max": float(weights.max()),
        "select/effective_fraction": float(
            weights.sum() ** 2 / (weights.numel() * (weights**2).sum()).clamp(min=1e-300)
        ),
    }
    finite = torch.isfinite(scores)
    if finite.any():
        values = scores[finite].to(torch.float64)
        metrics["influence/score_mean"] = float(values.mean())
        metrics["influence/score_std"] = float(values.std(unbiased=False))
        kept = weights[finite]
        metrics["influence/kept_score_mean"] = float((kept * values).sum() / kept.sum().clamp(min=1e-300))
    if losses is not None and tokens is not None and torch.isfinite(losses).all() and tokens.sum() > 0:
        metrics["influence/buffer_loss"] = float(losses.sum() / tokens.sum())
    if groups is not None:
        counts = Counter(g for g, w in zip(groups, weights.tolist(), strict=True) if w > 0)
        for name in group_names if group_names is not None else sorted(set(groups)):
            metrics[f"select/kept/{name or 'none'}"] = float(counts[name])
    return metrics


def wandb_run():
    """The active W&B run, or None (also when wandb is not installed). Imports wandb only when called."""
    try:
        import wandb
    except ImportError:
        return None
    return wandb.run


def log_histogram(key: str, values: torch.Tensor | Sequence[float], *, step: int | None = None, run=None) -> bool:
    """Log a histogram of ``values`` under ``key`` to ``run`` (default: the active run); False when there is none."""
    run = run or wandb_run()
    if run is None:
        return False
    import wandb

    data = values.detach().cpu().tolist() if isinstance(values, torch.Tensor) else list(values)
    run.log({key: wandb.Histogram(data), **({} if step is None else {STEP_KEY: step})})
    return True


def log_table(
    key: str, columns: Sequence[str], rows: Sequence[Sequence], *, step: int | None = None, run=None
) -> bool:
    """Log a `wandb.Table` under ``key`` to ``run`` (default: the active run); False when there is none."""
    run = run or wandb_run()
    if run is None:
        return False
    import wandb

    table = wandb.Table(columns=list(columns), data=[list(row) for row in rows])
    run.log({key: table, **({} if step is None else {STEP_KEY: step})})
    return True


class NamespacedWandbCallback(WandbCallback):
    """The stock `WandbCallback`, except that ``influence/…`` and ``select/…`` keys are logged as they are.

    The stock callback prefixes every training key with ``train/``; this one leaves the namespaced keys alone
    so dashboards, this package's tests and offline readers find ``influence/score_mean`` by that name.
    """

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        namespaced = {k: v for k, v in (logs or {}).items() if k.startswith(NAMESPACES)}
        rest = {k: v for k, v in (logs or {}).items() if k not in namespaced}
        if self._wandb is None:
            return
        if not self._initialized:
            self.setup(args, state, model)
        if not state.is_world_process_zero:
            return
        single_values = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")
        for key in (*single_values, "total_flos"):
            if key in rest:
                self._wandb.run.summary[key] = rest.pop(key)
        self._wandb.log({**rewrite_logs(rest), **namespaced, STEP_KEY: state.global_step})


# ---------------------------------------------------------------------- reading offline runs

_HEADER = b":W&B"
_BLOCK = 32 * 1024
_RECORD_HEADER = 7  # crc32 (4), length (2), type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What a W&B run folder holds: config, history rows and the final summary, as plain Python values."""

    folder: Path
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def logged_keys(self) -> set[str]:
        return {key for row in self.history for key in row}


def find_offline_runs(directory: str | Path) -> list[Path]:
    """``offline-run-*`` folders below ``directory`` (its ``wandb/`` subfolder included), oldest first."""
    directory = Path(directory)
    return sorted(p for p in directory.rglob("offline-run-*") if p.is_dir() and list(p.glob("*.wandb")))


def read_offline_run(folder: str | Path) -> OfflineRun:
    """Parse the ``run-*.wandb`` record log of a run folder (offline or synced) into an `OfflineRun`.

    The file is a sequence of 32 KiB blocks holding length-prefixed chunks of serialised
    ``wandb_internal_pb2.Record`` messages (after a 7-byte file header); chunks marked first/middle/last
    are joined into one record.
    """
    from wandb.proto import wandb_internal_pb2

    folder = Path(folder)
    files = sorted(folder.glob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"No .wandb record file in {folder}.")
    run = OfflineRun(folder)
    for payload in _records(files[0].read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _apply(run.config, record.run.config.update)
        elif kind == "config":
            _apply(run.config, record.config.update)
        elif kind == "history":
            row: dict = {}
            _apply(row, record.history.item)
            run.history.append(row)
        elif kind == "summary":
            _apply(run.summary, record.summary.update)
    return run


def _records(data: bytes):
    if not data.startswith(_HEADER):
        raise ValueError("Not a W&B record file (bad header).")
    position, pending = 7, b""
    while position + _RECORD_HEADER <= len(data):
        room = _BLOCK - position % _BLOCK
        if room < _RECORD_HEADER:
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + _RECORD_HEADER])
        if kind == 0:  # zero padding up to the end of the block
            position += room
            continue
        chunk = data[position + _RECORD_HEADER : position + _RECORD_HEADER + length]
        position += _RECORD_HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            yield pending
            pending = b""


def _apply(target: dict, items) -> None:
    """Set each ``key``/``nested_key`` item's JSON value into ``target`` (nested keys become nested dicts)."""
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = target
        for part in path[:-1]:
            node = node.setdefault(part, {})
        try:
            value = json.loads(item.value_json)
        except json.JSONDecodeError:
            value = item.value_json
        node[path[-1]] = math.nan if value == "NaN" else value
