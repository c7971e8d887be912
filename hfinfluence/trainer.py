"""`InfluenceTrainer`: filter or reweight every training batch by its influence on a target set.

Each micro-step the trainer draws a candidate *buffer* of ``buffer_multiplier × per_device_train_batch_size``
examples per process and runs ONE forward pass over it while the influence engine observes it
(`Influence.observe`). The gradient of the summed per-example losses with respect to the tracked layers'
outputs (no parameter gradients) gives each candidate's score

    score(z) = g_targetᵀ (F + λI)⁻¹ g_z        (positive = training on z lowers the target loss)

The scores are gathered from every process and turned into per-example loss weights: 1/0 for
``selection="filter"`` (keep ``keep_ratio`` of the buffer by ``top_k`` or ``boltzmann``), softmax weights with mean
1 for ``selection="reweight"``. The weighted loss is then back-propagated through the same retained graph
(``training_pass="retained"``), or, for ``filter`` only, the kept rows get a fresh forward+backward
(``training_pass="recompute"``), which is cheaper when few rows are kept; docs/TRAINING.md measures both.
``selection="off"`` is plain `Trainer` training on the same data order, the baseline every run compares to.

The optimizer sees the same loss the `Trainer` would compute on the kept rows: the weighted sum of token losses
divided by the weighted number of labelled tokens of the buffer over all processes (``loss_reduction="sum"``),
or by the summed weights (``"mean"``).

Schedule, counted in optimizer steps: no scoring before ``selection_warmup_steps``; then a first `Influence.fit`
(which fixes the sketch sizes by the effective-dimension rule) and `Influence.set_target`; afterwards the
curvature is refreshed from the training passes' own captured tensors every ``curvature_refresh_steps`` and the
target direction recomputed every ``target_refresh_steps``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate.logging import get_logger
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments
from transformers.integrations import WandbCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from . import selection as select
from .config import InfluenceConfig
from .curvature import FactorSums
from .data import CausalCollator
from .errors import ConfigError, DataFormatError, EmptyInputError, MissingColumnError
from .influence import Influence
from .losses import per_example_loss
from .tracking import NamespacedWandbCallback, log_histogram, log_table, selection_metrics

logger = get_logger(__name__)

SELECTIONS = ("filter", "reweight", "off")
SELECTION_METHODS = ("top_k", "boltzmann")
TRAINING_PASSES = ("retained", "recompute")
INDEX_COLUMN, GROUP_ID_COLUMN = "influence_index", "influence_group_id"
EXTRA_COLUMNS = (INDEX_COLUMN, GROUP_ID_COLUMN)
STATE_FOLDER, ENGINE_FOLDER = "influence", "engine"
MODEL_INPUT_SKIP = ("labels", *EXTRA_COLUMNS)


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class InfluenceTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the influence selection settings and the engine's `InfluenceConfig` fields.

    Selection: ``selection``, ``selection_method``, ``keep_ratio``, ``tau``, ``buffer_multiplier``,
    ``global_selection``, ``training_pass``. Schedule: ``selection_warmup_steps``, ``curvature_refresh_steps``,
    ``target_refresh_steps``, ``curvature_fit_examples``. Tracking: ``group_column``, ``table_log_steps``,
    ``table_rows``, ``log_target_loss``, ``score_baseline``, ``record_selections``. Engine: ``modules``,
    ``sketch``, ``sketch_dims``, ``epsilon``, ``sizing_constant``, ``sizing_delta`` (the engine's ``delta``),
    ``damping``, ``damping_factor``, ``sketch_budget``, ``curvature``, ``influence_seed`` (the engine's ``seed``;
    defaults to ``seed``), ``loss_reduction``, ``factor_dtype``, ``exact_factor_limit``, ``seed_check``,
    ``allow_shared``.

    >>> args = InfluenceTrainingArguments("out", selection="filter", buffer_multiplier=4)  # doctest: +SKIP
    >>> args.keep_ratio  # defaults to 1 / buffer_multiplier                                   # doctest: +SKIP
    0.25
    """

    selection: str = _help("'filter' (keep a fraction), 'reweight' (weight every example) or 'off'.", default="filter")
    selection_method: str = _help("How `filter` keeps examples: 'top_k' or 'boltzmann'.", default="top_k")
    keep_ratio: float | None = _help(
        "Fraction of each buffer kept by `filter`; default 1 / buffer_multiplier.", default=None
    )
    tau: float = _help("Temperature of 'boltzmann' and 'reweight', in standard deviations of the scores.", default=1.0)
    buffer_multiplier: int = _help("Candidates scored per step = buffer_multiplier × per-device batch.", default=4)
    global_selection: bool = _help("Select over all processes' candidates (all-gather) or per process.", default=True)
    training_pass: str = _help(
        "'retained': backward through the scoring graph; 'recompute': fresh pass on kept rows (filter only).",
        default="retained",
    )
    selection_warmup_steps: int = _help("Optimizer steps of plain training before the first scoring.", default=0)
    curvature_refresh_steps: int = _help(
        "Refresh the curvature from training passes every this many steps.", default=50
    )
    target_refresh_steps: int = _help("Recompute the target direction every this many steps.", default=50)
    curvature_fit_examples: int = _help("Training rows for the first fit; 0 = the first scored buffer.", default=0)
    group_column: str | None = _help(
        "Column of the training data whose kept counts are logged per value.", default="source"
    )
    table_log_steps: int = _help(
        "Log a table of the highest- and lowest-scored candidates every this many steps (W&B).", default=50
    )
    table_rows: int = _help("Rows at each end of that table.", default=5)
    log_target_loss: bool = _help(
        "Log the target loss (a forward pass over the target set) at each target refresh.", default=True
    )
    score_baseline: bool = _help(
        "With selection='off', still score every batch for the logs (costs the scoring pass).", default=False
    )
    record_selections: bool = _help(
        "Keep every step's candidate indices and weights in `trainer.selection_history`.", default=False
    )
    modules: list[str] | None = _help(
        "Engine: module name patterns to track; default every linear layer in the blocks.",
        default=InfluenceConfig.modules,
    )
    sketch: str = _help(
        "Engine: sketch family, 'gaussian', 'rademacher', 'countsketch' or 'none'.",
        default=InfluenceConfig.sketch,
    )
    sketch_dims: str = _help(
        "Engine: 'auto' (effective-dimension rule), an int, or 'm_A,m_E'.", default=InfluenceConfig.sketch_dims
    )
    epsilon: float = _help("Engine: target relative accuracy of the sketched scores.", default=InfluenceConfig.epsilon)
    sizing_constant: float = _help(
        "Engine: the constant c of m = ceil(c · (d_eff + ln 1/δ) / ε²).", default=InfluenceConfig.sizing_constant
    )
    sizing_delta: float = _help(
        "Engine: failure probability δ of the sizing rule (1 drops its ln 1/δ term).", default=InfluenceConfig.delta
    )
    damping: str = _help("Engine: 'auto' or a float ridge λ.", default=InfluenceConfig.damping)
    damping_factor: float = _help(
        "Engine: multiple of the mean Kronecker eigenvalue used by damping='auto'.",
        default=InfluenceConfig.damping_factor,
    )
    sketch_budget: int | None = _help(
        "Engine: most rows per sketch side; a layer needing more gets a larger damping (λ and m chosen together).",
        default=InfluenceConfig.sketch_budget,
    )
    curvature: str = _help(
        "Engine: 'kfac', 'ekfac' (refreshed by a refit on the buffer) or 'identity'.",
        default=InfluenceConfig.curvature,
    )
    influence_seed: int | None = _help("Engine: sketch seed; defaults to `seed`.", default=None)
    loss_reduction: str = _help(
        "Engine and loss: per-example loss is the 'sum' or 'mean' of its token losses.",
        default=InfluenceConfig.loss_reduction,
    )
    factor_dtype: str = _help(
        "Engine: 'float32' or 'float64' factor accumulation.", default=InfluenceConfig.factor_dtype
    )
    exact_factor_limit: int = _help(
        "Engine: widths sized from exact factors up to this; wider ones from a pilot sketch.",
        default=InfluenceConfig.exact_factor_limit,
    )
    seed_check: int = _help(
        "Engine: candidates scored also through a second sketch seed (0: off), until the first curvature "
        "refresh; their agreement is logged as influence/seed_spearman and influence/seed_spread.",
        default=InfluenceConfig.seed_check,
    )
    allow_shared: bool = _help(
        "Engine: track tied or reused modules instead of refusing them.", default=InfluenceConfig.allow_shared
    )

    def __post_init__(self):
        super().__post_init__()
        self._check_choices()
        if isinstance(self.buffer_multiplier, bool) or not isinstance(self.buffer_multiplier, int):
            raise ConfigError(f"`buffer_multiplier` must be an int >= 1, got {self.buffer_multiplier!r}.")
        if self.buffer_multiplier < 1:
            raise ConfigError(
                f"`buffer_multiplier`={self.buffer_multiplier} makes the candidate buffer smaller than the batch "
                f"(`per_device_train_batch_size`={self.per_device_train_batch_size}); use 1 or more."
            )
        if self.keep_ratio is None:
            self.keep_ratio = 1.0 / self.buffer_multiplier
        select.keep_count(1, self.keep_ratio)  # raises ConfigError outside (0, 1]
        if not self.tau > 0:
            raise ConfigError(f"`tau` must be > 0, got {self.tau!r}.")
        for name in ("curvature_refresh_steps", "target_refresh_steps", "table_log_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {getattr(self, name)!r}.")
        for name in ("selection_warmup_steps", "curvature_fit_examples", "table_rows"):
            if getattr(self, name) < 0:
                raise ConfigError(f"`{name}` must be >= 0, got {getattr(self, name)!r}.")
        self.influence_config()  # validates the engine fields now, not at the first scored step

    def _check_choices(self) -> None:
        for name, choices in (
            ("selection", SELECTIONS),
            ("selection_method", SELECTION_METHODS),
            ("training_pass", TRAINING_PASSES),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(f"`{name}` must be one of {choices}, got {getattr(self, name)!r}.")
        if self.training_pass == "recompute" and self.selection != "filter":
            raise ConfigError(
                "`training_pass`='recompute' only applies to `selection`='filter' (it re-runs the kept rows); "
                f"with `selection`={self.selection!r} use 'retained'."
            )

    def influence_config(self) -> InfluenceConfig:
        """The engine's `InfluenceConfig` built from the engine fields of these arguments."""
        return InfluenceConfig(
            modules=self.modules,
            sketch=self.sketch,
            sketch_dims=_parse_sketch_dims(self.sketch_dims),
            epsilon=self.epsilon,
            sizing_constant=self.sizing_constant,
            delta=self.sizing_delta,
            damping=_parse_damping(self.damping),
            damping_factor=self.damping_factor,
            sketch_budget=self.sketch_budget,
            curvature=self.curvature,
            seed=self.seed if self.influence_seed is None else self.influence_seed,
            loss_reduction=self.loss_reduction,
            factor_dtype=self.factor_dtype,
            exact_factor_limit=self.exact_factor_limit,
            seed_check=self.seed_check,
            allow_shared=self.allow_shared,
        )


def _parse_sketch_dims(value: Any) -> Any:
    """'auto', an int, 'a,b' or [a, b] (from the command line or YAML) → what `InfluenceConfig` takes."""
    if isinstance(value, str) and value != "auto":
        try:
            parts = [int(part) for part in value.split(",")]
        except ValueError as e:
            raise ConfigError(f"`sketch_dims` must be 'auto', an int or 'm_A,m_E', got {value!r}.") from e
        value = parts[0] if len(parts) == 1 else tuple(parts)
    return tuple(value) if isinstance(value, list) else value


def _parse_damping(value: Any) -> Any:
    if isinstance(value, str) and value != "auto":
        try:
            return float(value)
        except ValueError as e:
            raise ConfigError(f"`damping` must be 'auto' or a float >= 0, got {value!r}.") from e
    return value


class _ExtraColumnsCollator:
    """Pass the trainer's bookkeeping columns (row index, group id) around the user's collator, as [batch] tensors."""

    def __init__(self, collator: Callable):
        self.collator = collator

    def __call__(self, features: Sequence[Mapping]) -> dict:
        present = [name for name in EXTRA_COLUMNS if all(name in feature for feature in features)]
        rows = [{k: v for k, v in feature.items() if k not in EXTRA_COLUMNS} for feature in features]
        batch = dict(self.collator(rows))
        for name in present:
            batch[name] = torch.tensor([feature[name] for feature in features], dtype=torch.long)
        return batch


@dataclass
class BufferView:
    """One micro-step's candidate buffer over all processes, in process order: [n] float64 tensors on the CPU.

    ``scores`` is NaN before selection starts; ``group`` is -1 without a group column; this process's rows
    are ``[start, stop)``.
    """

    scores: torch.Tensor
    index: torch.Tensor
    group: torch.Tensor
    losses: torch.Tensor
    tokens: torch.Tensor
    sizes: list[int]
    rank: int

    @property
    def start(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def stop(self) -> int:
        return self.start + self.sizes[self.rank]

    def slices(self) -> list[slice]:
        bounds = [0, *torch.tensor(self.sizes).cumsum(0).tolist()]
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@dataclass
class SelectionTotals:
    """Counts since the start of training (restored on resume): candidates seen and kept, overall and per group."""

    seen: int = 0
    kept: int = 0
    weight: float = 0.0
    group_seen: Counter = field(default_factory=Counter)
    group_kept: Counter = field(default_factory=Counter)
    group_weight: Counter = field(default_factory=Counter)

    def add(self, groups: list[str], weights: torch.Tensor) -> None:
        self.seen += len(groups)
        self.kept += int((weights > 0).sum())
        self.weight += float(weights.sum())
        for name, w in zip(groups, weights.tolist(), strict=True):
            self.group_seen[name] += 1
            self.group_kept[name] += int(w > 0)
            self.group_weight[name] += w

    def to_dict(self) -> dict:
        return {key: dict(value) if isinstance(value, Counter) else value for key, value in self.__dict__.items()}

    @classmethod
    def from_dict(cls, values: dict) -> SelectionTotals:
        return cls(**{k: Counter(v) if isinstance(v, dict) else v for k, v in values.items()})


class InfluenceTrainer(Trainer):
    """A `transformers.Trainer` that filters or reweights each batch by influence on ``target_dataset``.

    Switch an existing script by replacing ``Trainer`` / ``TrainingArguments`` with ``InfluenceTrainer`` /
    `InfluenceTrainingArguments` and passing ``target_dataset`` (formatted like ``train_dataset``: the data
    collator must turn its rows into ``input_ids``, ``attention_mask`` and ``labels``).

    >>> trainer = InfluenceTrainer(                                      # doctest: +SKIP
    ...     model=model, args=InfluenceTrainingArguments("out", selection="filter", buffer_multiplier=4),
    ...     train_dataset=pool, target_dataset=target, data_collator=CausalCollator(tokenizer))
    >>> trainer.train()                                                  # doctest: +SKIP
    >>> trainer.selection_summary()["kept_fraction"]                     # doctest: +SKIP
    0.25
    """

    def __init__(
        self,
        model=None,
        args: InfluenceTrainingArguments | None = None,
        train_dataset=None,
        target_dataset=None,
        data_collator: Callable | None = None,
        processing_class=None,
        **kwargs,
    ):
        if not isinstance(args, InfluenceTrainingArguments):
            raise ConfigError(
                f"`args` must be `InfluenceTrainingArguments`, got {type(args).__name__}; it carries the "
                "selection settings (`selection`, `keep_ratio`, `buffer_multiplier`, ...)."
            )
        if data_collator is None:
            data_collator = _default_collator(processing_class)
        self.group_names: list[str] = []
        train_dataset = self._with_extra_columns(train_dataset, args)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            data_collator=_ExtraColumnsCollator(data_collator),
            processing_class=processing_class,
            **kwargs,
        )
        self.target_dataset = self._check_target(target_dataset)
        self._check_supported()
        self._use_namespaced_wandb()
        self.engine: Influence | None = None
        self.sizing_table = None
        self.totals = SelectionTotals()
        self.selection_history: list[dict] = []
        self.target_loss_history: list[tuple[int, float]] = []
        self._generators = self._make_generators()
        self._window: list[tuple[BufferView, torch.Tensor]] = []
        self._scheduled_step: int | None = None
        self._resume_folder: str | None = None
        self._resumed = False
        self._target_batches: list[dict] | None = None
        self._last_table_step = 0

    # ------------------------------------------------------------------ set-up and checks

    def _with_extra_columns(self, dataset, args: InfluenceTrainingArguments):
        """Add the row-index and group-id columns that let selections be traced and counted."""
        if dataset is None:
            raise EmptyInputError("`train_dataset` is required.")
        if not isinstance(dataset, datasets.Dataset):
            raise NotImplementedError(
                f"`train_dataset` must be a map-style `datasets.Dataset` (got {type(dataset).__name__}): the "
                "trainer indexes rows to trace selections. Convert with `datasets.Dataset.from_list`."
            )
        _require_rows(dataset, "train_dataset")
        groups = [-1] * len(dataset)
        if args.group_column and args.group_column in dataset.column_names:
            values = [str(v) for v in dataset[args.group_column]]
            self.group_names = sorted(set(values))
            lookup = {name: i for i, name in enumerate(self.group_names)}
            groups = [lookup[v] for v in values]
        dataset = dataset.remove_columns([c for c in EXTRA_COLUMNS if c in dataset.column_names])
        return dataset.add_column(INDEX_COLUMN, list(range(len(dataset)))).add_column(GROUP_ID_COLUMN, groups)

    def _check_target(self, target):
        """Check the target set before training: present when selecting, rows with input_ids and labelled tokens."""
        needs_target = self.args.selection != "off" or self.args.score_baseline
        if target is None:
            if needs_target:
                raise ConfigError(f"`target_dataset` is required with `selection`={self.args.selection!r}.")
            return None
        if not isinstance(target, datasets.Dataset):
            target = datasets.Dataset.from_list(list(target))
        _require_rows(target, "target_dataset")
        if "num_loss_tokens" in target.column_names:
            target = target.filter(lambda row: row["num_loss_tokens"] > 0)
        elif "labels" in target.column_names:
            target = target.filter(lambda row: any(label != -100 for label in row["labels"][1:]))
        if len(target) == 0:
            raise EmptyInputError(
                "No row of `target_dataset` has a labelled token (every label is -100 after truncation); "
                "check `max_length` and the prompt/completion fields."
            )
        if len(target) < self.args.world_size:
            raise EmptyInputError(
                f"`target_dataset` has {len(target)} rows for {self.args.world_size} processes; every process "
                "needs at least one target row."
            )
        return self._remove_unused_columns(target, description="target")

    def _check_supported(self) -> None:
        if self.args.selection == "off" and not self.args.score_baseline:
            return
        unsupported = {
            "DeepSpeed": self.is_deepspeed_enabled,
            "torch.nn.DataParallel (n_gpu > 1; use `accelerate launch` for DDP)": self.args.n_gpu > 1,
            "label smoothing": self.args.label_smoothing_factor > 0,
            "a custom `compute_loss_func`": self.compute_loss_func is not None,
        }
        for name, active in unsupported.items():
            if active:
                raise NotImplementedError(
                    f"InfluenceTrainer does not support {name} with `selection`={self.args.selection!r}: the "
                    "trainer computes its own weighted per-example loss. Use `selection`='off' for this setup."
                )
        checkpoint_kwargs = self.args.activation_checkpointing_kwargs
        reentrant = isinstance(checkpoint_kwargs, dict) and checkpoint_kwargs.get("use_reentrant", False)
        if self.args.activation_checkpointing and reentrant:
            raise NotImplementedError(
                "Reentrant activation checkpointing runs the forward pass without autograd, so the tracked layers' "
                "gradients cannot be observed. Pass `activation_checkpointing_kwargs={'use_reentrant': False}`."
            )

    def _use_namespaced_wandb(self) -> None:
        """Swap the stock W&B callback for one that keeps the `influence/` and `select/` keys as they are."""
        for callback in list(self.callback_handler.callbacks):
            if type(callback) is WandbCallback:
                self.callback_handler.remove_callback(callback)
                self.callback_handler.add_callback(NamespacedWandbCallback())

    def _make_generators(self) -> list[torch.Generator]:
        """One selection RNG per process; every process holds all of them, so all compute the same selection."""
        base = self.args.seed * 1_000_003 + 17
        return [torch.Generator().manual_seed(base + rank) for rank in range(max(self.args.world_size, 1))]

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *EXTRA_COLUMNS]))

    @property
    def buffer_size(self) -> int:
        """Candidates per process and micro-step: ``buffer_multiplier`` × the per-device batch (1× when off)."""
        multiplier = 1 if self.args.selection == "off" else self.args.buffer_multiplier
        return self._train_batch_size * multiplier

    def get_train_dataloader(self):
        """The training loader, yielding whole candidate buffers."""
        if self.train_dataset is None:
            raise EmptyInputError("`train_dataset` is required.")
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self.buffer_size,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    # ------------------------------------------------------------------ one step

    def training_step(self, model, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """Score the buffer, weight its examples, and back-propagate the weighted loss (see the module docstring)."""
        self._maybe_resume()
        extras = {name: inputs.pop(name) for name in EXTRA_COLUMNS if name in inputs}
        if self.args.selection == "off" and not self.args.score_baseline:
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._record_plain(extras)
            return loss

        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        self._run_schedule(model, inputs)
        if self.engine is None:  # warm-up: plain training on this process's first rows
            view = self._gather_view(inputs, extras, scores=None, losses=None)
            weights = self._warmup_weights(view)
            loss = self._train_on(
                model, inputs, weights[view.start : view.stop], _normaliser(view, weights), losses=None
            )
        else:
            scores, losses = self._score_pass(model, inputs)
            view = self._gather_view(inputs, extras, scores=scores, losses=losses.detach())
            weights = self._select(view)
            reuse = losses if self.args.training_pass == "retained" else None
            loss = self._train_on(
                model, inputs, weights[view.start : view.stop], _normaliser(view, weights), losses=reuse
            )
        self._record(view, weights)
        return loss

    def _score_pass(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One observed forward over the buffer and the input-gradient backward that scores it: ([B] scores, losses).

        With ``training_pass="retained"`` the graph is kept for the training backward. With "recompute" the
        forward bypasses the DDP wrapper, so that the gradient synchronisation belongs to the later pass.
        """
        retain = self.args.training_pass == "retained"
        forward = model if retain else self.accelerator.unwrap_model(model)
        mask = _attention_mask(inputs)
        accumulate = self.args.curvature != "ekfac"
        with self.engine.observe(mask, inputs["labels"], accumulate_curvature=accumulate) as observation:
            with self.compute_loss_context_manager():
                logits = forward(**_model_inputs(inputs)).logits
            losses = per_example_loss(logits, inputs["labels"], reduction=self.args.loss_reduction)
            if not observation.outputs:
                raise NotImplementedError(
                    "No tracked layer recorded a differentiable output in the training forward pass. Reentrant "
                    "activation checkpointing does this: enable it with `use_reentrant=False`."
                )
            torch.autograd.grad(losses.sum(), observation.outputs, retain_graph=retain, allow_unused=True)
        return observation.scores.detach().to(torch.float64).cpu(), losses

    def _train_on(self, model, inputs: dict, weights: torch.Tensor, normaliser: float, *, losses) -> torch.Tensor:
        """Back-propagate Σ w_i loss_i / Σ_all-processes w_i n_i (× processes, / accumulation steps).

        ``losses`` from the scoring pass reuse its graph; ``None`` runs a fresh forward over the rows with
        w > 0 (one zero-weight row if there are none, so that this process still joins the gradient all-reduce).
        """
        weights = weights.to(self.args.device)
        if losses is None:
            rows = torch.nonzero(weights > 0).flatten()
            rows = rows if rows.numel() else torch.zeros(1, dtype=torch.long, device=weights.device)
            inputs, weights = {k: v[rows] for k, v in inputs.items()}, weights[rows]
            with self.compute_loss_context_manager():
                logits = model(**_model_inputs(inputs)).logits
            losses = per_example_loss(logits, inputs["labels"], reduction=self.args.loss_reduction)

        scale = self.accelerator.num_processes / (normaliser * self.current_gradient_accumulation_steps)
        loss = (weights.to(losses.dtype) * losses).sum() * scale
        self.accelerator.backward(loss)
        return loss.detach()

    # ------------------------------------------------------------------ gathering and selection

    def _gather_view(self, inputs: dict, extras: dict, *, scores, losses) -> BufferView:
        """All-gather this process's [score, index, group, loss, tokens] rows into one `BufferView`."""
        n = inputs["input_ids"].shape[0]
        nan = torch.full((n,), math.nan, dtype=torch.float64)
        columns = [
            nan if scores is None else scores,
            extras.get(INDEX_COLUMN, torch.full((n,), -1)).to(torch.float64).cpu(),
            extras.get(GROUP_ID_COLUMN, torch.full((n,), -1)).to(torch.float64).cpu(),
            nan if losses is None else losses.to(torch.float64).cpu(),
            _label_tokens(inputs["labels"], self.args.loss_reduction).to(torch.float64).cpu(),
        ]
        local = torch.stack(columns, dim=1)
        rows, sizes = self._gather_rows(local)
        return BufferView(*rows.T, sizes=sizes, rank=self.accelerator.process_index)

    def _gather_rows(self, local: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Concatenate every process's [n_p, k] rows in process order (n_p may differ)."""
        if self.accelerator.num_processes == 1:
            return local, [local.shape[0]]
        device = self.args.device
        sizes = self.accelerator.gather(torch.tensor([local.shape[0]], device=device)).tolist()
        padded = torch.zeros(max(sizes), local.shape[1], dtype=local.dtype, device=device)
        padded[: local.shape[0]] = local.to(device)
        gathered = self.accelerator.gather(padded.unsqueeze(0)).cpu()
        return torch.cat([gathered[p, :size] for p, size in enumerate(sizes)]), sizes

    def _select(self, view: BufferView) -> torch.Tensor:
        """[n] weights over the gathered buffer, identical on every process."""
        if self.args.global_selection:
            weights = self._weights_for(view.scores, self._generators[0])
        else:
            parts = [view.scores[part] for part in view.slices()]
            weights = torch.cat([self._weights_for(s, g) for s, g in zip(parts, self._generators, strict=True)])
        return weights

    def _weights_for(self, scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.args.selection == "reweight":
            return select.reweight(scores, tau=self.args.tau)
        if self.args.selection == "off":
            return torch.ones_like(scores)
        k = select.keep_count(scores.numel(), self.args.keep_ratio)
        if self.args.selection_method == "boltzmann":
            chosen = select.select_boltzmann(scores, k, tau=self.args.tau, generator=generator)
        else:
            chosen = select.select_top_k(scores, k)
        return select.selection_mask(scores.numel(), chosen)

    def _warmup_weights(self, view: BufferView) -> torch.Tensor:
        """Before selection: every row for `reweight`/`off`, each process's first keep_ratio share for `filter`."""
        weights = torch.zeros(view.index.numel(), dtype=torch.float64)
        for part in view.slices():
            size = part.stop - part.start
            keep = select.keep_count(size, self.args.keep_ratio) if self.args.selection == "filter" else size
            weights[part.start : part.start + keep] = 1.0
        return weights

    # ------------------------------------------------------------------ engine schedule

    def _run_schedule(self, model, inputs: dict) -> None:
        """At the first micro-step of each optimizer step: first fit, curvature refresh, target refresh."""
        step = self.state.global_step
        if step == self._scheduled_step or step < self.args.selection_warmup_steps:
            return
        self._scheduled_step = step
        if self.engine is None:
            self._start_engine(model, inputs)
            return
        since = step - self.args.selection_warmup_steps
        if since % self.args.curvature_refresh_steps == 0:
            self._refresh_curvature(inputs)
        if since % self.args.target_refresh_steps == 0:
            self._refresh_target()

    def _refresh_curvature(self, inputs: dict) -> None:
        """New curvature from the observed passes since the last refresh; EK-FAC refits on the current buffer.

        EK-FAC's eigenvalue correction needs the new eigenbases first, so it cannot be accumulated from the
        training passes: its refresh costs one extra forward+backward over the buffer.
        """
        self.engine.stop_seed_check()  # its last value stays in `engine.seed_check` and the logs
        if self.args.curvature == "ekfac":
            self.engine.fit([_engine_batch(inputs)])
        else:
            self.engine.refresh_curvature()

    def _start_engine(self, model, inputs: dict) -> None:
        """Build the engine on the unwrapped model; restore it from a checkpoint or fit it and set the target."""
        engine = Influence(self.accelerator.unwrap_model(model), self.args.influence_config())
        # The seed check measures the first curvature only: following every refresh would double the engine's
        # per-step sketching. Held, its twin scores but no longer accumulates; it is dropped at the first refresh.
        engine.hold_seed_check()
        state = self._resume_folder and Path(self._resume_folder, STATE_FOLDER, ENGINE_FOLDER)
        if state and state.is_dir():
            self.engine = engine.load(state)
            self._load_pending(Path(self._resume_folder, STATE_FOLDER))
            return
        fit_batches = self._fit_batches(inputs)
        engine.fit(fit_batches)
        self.engine = engine
        self._refresh_target()
        self._log_sizing()

    def _fit_batches(self, inputs: dict) -> list[dict]:
        """This process's share of the first fit: the current buffer, or ``curvature_fit_examples`` seeded rows."""
        if self.args.curvature_fit_examples == 0:
            return [_engine_batch(inputs)]
        order = torch.randperm(len(self.train_dataset), generator=torch.Generator().manual_seed(self.args.seed))
        return self._collate_share(self.train_dataset, order[: self.args.curvature_fit_examples].tolist())

    def _collate_share(self, dataset, rows: list[int]) -> list[dict]:
        """This process's rows (p, p + P, p + 2P, ... of ``rows`` for process p of P), collated in batches.

        Every process gets the same number of batches of at most ``buffer_size`` rows, so that sharded models
        (FSDP) run the same number of forward passes on every process.
        """
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = torch.tensor(rows[rank::world], dtype=torch.long)
        count = max(1, math.ceil(math.ceil(len(rows) / world) / self.buffer_size))
        batches = []
        for chunk in mine.tensor_split(count):
            if chunk.numel():
                batch = self.data_collator([dataset[i] for i in chunk.tolist()])
                batches.append({k: v for k, v in batch.items() if k not in EXTRA_COLUMNS})
        return batches

    def target_batches(self) -> list[dict]:
        """This process's share of the target set, collated (see `_collate_share`)."""
        if self._target_batches is None:
            self._target_batches = self._collate_share(self.target_dataset, list(range(len(self.target_dataset))))
        return self._target_batches

    def _refresh_target(self) -> None:
        self.engine.set_target(self.target_batches())
        if self.args.log_target_loss:
            self.target_loss_history.append((self.state.global_step, self.target_loss()))

    @torch.no_grad()
    def target_loss(self) -> float:
        """Mean token loss on the target set (all processes; call it on every process together)."""
        model = self.accelerator.unwrap_model(self.model_wrapped)
        was_training = model.training
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        for batch in self.target_batches():
            batch = self._prepare_inputs(batch)
            with self.compute_loss_context_manager():
                logits = model(**_model_inputs(batch)).logits
            sums[0] += per_example_loss(logits, batch["labels"]).sum()
            sums[1] += _label_tokens(batch["labels"], "sum").sum()
        model.train(was_training)
        sums = self.accelerator.reduce(sums, reduction="sum") if self.accelerator.num_processes > 1 else sums
        return float(sums[0] / sums[1].clamp(min=1))

    def _log_sizing(self) -> None:
        """Log the sizing table once: text on the main process, a W&B table, and totals in the run summary."""
        self.sizing_table = self.engine.sizing()
        logger.info("Influence sketch sizes (fixed for the rest of training):\n%s", self.sizing_table)
        if self.accelerator.is_main_process and self._wandb_on():
            rows = [list(row.values()) for row in self.sizing_table.to_dicts()]
            columns = list(self.sizing_table.to_dicts()[0])
            log_table("influence/sizing", columns, rows, step=self.state.global_step)
            totals = self.sizing_table.totals()
            log_table("influence/sizing_totals", list(totals), [list(totals.values())], step=self.state.global_step)

    # ------------------------------------------------------------------ records and logs

    def _record_plain(self, extras: dict) -> None:
        """Counts for a plain (`selection="off"`) step: every row is kept with weight 1."""
        n = next(iter(extras.values())).numel() if extras else 0
        local = torch.stack([extras.get(name, torch.full((n,), -1)).to(torch.float64).cpu() for name in EXTRA_COLUMNS])
        rows, sizes = self._gather_rows(local.T)
        nan = torch.full((rows.shape[0],), math.nan, dtype=torch.float64)
        view = BufferView(nan, rows[:, 0], rows[:, 1], nan, nan, sizes=sizes, rank=self.accelerator.process_index)
        self._record(view, torch.ones(rows.shape[0], dtype=torch.float64))

    def _record(self, view: BufferView, weights: torch.Tensor) -> None:
        self.totals.add(self._group_labels(view.group), weights)
        self._window.append((view, weights))
        if self.args.record_selections:
            self.selection_history.append(
                {
                    "step": self.state.global_step,
                    "index": view.index.long().tolist(),
                    "score": [None if math.isnan(s) else s for s in view.scores.tolist()],
                    "weight": weights.tolist(),
                }
            )

    def _group_labels(self, group_ids: torch.Tensor) -> list[str]:
        return [self.group_names[g] if g >= 0 else "" for g in group_ids.long().tolist()]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the influence and selection metrics of the steps since the last training log, then log."""
        if self._window and "loss" in logs:
            logs.update(self._window_metrics())
        super().log(logs, start_time)

    def _window_metrics(self) -> dict[str, float]:
        """Averages over the micro-steps since the last log (identical on every process), plus W&B media."""
        views, weights = zip(*self._window, strict=True)
        self._window.clear()
        scores = torch.cat([v.scores for v in views])
        weights = torch.cat(weights)
        index = torch.cat([v.index for v in views])
        groups = self._group_labels(torch.cat([v.group for v in views]))
        metrics = selection_metrics(
            scores,
            weights,
            groups=groups if self.group_names else None,
            group_names=self.group_names,
            losses=torch.cat([v.losses for v in views]),
            tokens=torch.cat([v.tokens for v in views]),
        )
        metrics["select/examples_seen"] = float(self.totals.seen)
        metrics["select/examples_kept"] = float(self.totals.kept)
        if self.engine is not None:
            dampings = [curv.damping for curv in self.engine.curvature.values()]
            metrics["influence/damping"] = sum(dampings) / len(dampings)
        if self.target_loss_history:
            metrics["influence/target_loss"] = self.target_loss_history[-1][1]
        leakage = getattr(self.engine, "leakage_report", None)
        if leakage is not None:
            metrics["influence/leakage"] = float(leakage.total)
        check = getattr(self.engine, "seed_check", None)
        if check is not None:
            metrics["influence/seed_spearman"] = check.spearman
            metrics["influence/seed_spread"] = check.spread
        if self.accelerator.is_main_process and self._wandb_on() and torch.isfinite(scores).any():
            self._log_media(scores, weights, index, groups)
        return metrics

    def _log_media(self, scores: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, groups: list[str]) -> None:
        """The score histogram every log, and every ``table_log_steps`` the highest- and lowest-scored candidates."""
        step = self.state.global_step
        log_histogram("influence/score_hist", scores[torch.isfinite(scores)], step=step)
        if step - self._last_table_step < self.args.table_log_steps:
            return
        self._last_table_step = step
        order = torch.argsort(torch.nan_to_num(scores, nan=-math.inf), descending=True)
        n = min(self.args.table_rows, order.numel())
        picks = [("highest", i) for i in order[:n].tolist()] + [("lowest", i) for i in order.flip(0)[:n].tolist()]
        rows = [
            [step, end, float(scores[i]), float(weights[i]), groups[i], int(index[i]), self._snippet(int(index[i]))]
            for end, i in picks
        ]
        columns = ["step", "end", "score", "weight", "group", "row", "snippet"]
        log_table("influence/candidates", columns, rows, step=step)

    def _snippet(self, row: int, chars: int = 200) -> str:
        ids = self.train_dataset[row]["input_ids"]
        decode = getattr(self.processing_class, "decode", None)
        text = decode(ids, skip_special_tokens=True) if decode else " ".join(map(str, ids))
        return text[:chars]

    def _wandb_on(self) -> bool:
        return "wandb" in (self.args.report_to or [])

    def selection_summary(self) -> dict:
        """What training saw and kept so far: counts, kept fraction, and per group seen / kept / weight."""
        totals = self.totals
        return {
            "examples_seen": totals.seen,
            "examples_kept": totals.kept,
            "kept_fraction": totals.kept / totals.seen if totals.seen else math.nan,
            "weight_total": totals.weight,
            "groups": {
                name: {
                    "seen": totals.group_seen[name],
                    "kept": totals.group_kept[name],
                    "weight": totals.group_weight[name],
                }
                for name in sorted(totals.group_seen)
            },
        }

    # ------------------------------------------------------------------ checkpoints

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """`Trainer.train`; a resumed run also restores the selection RNG, counts, engine state and pending factors."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True
        self._resume_folder = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        self._resumed = False
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        checkpoint = Path(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self._save_selection_state(checkpoint / STATE_FOLDER)

    def _save_selection_state(self, folder: Path) -> None:
        """Engine state and selection state (main process) and this process's pending curvature sums."""
        folder.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            if self.engine is not None:
                self.engine.save(folder / ENGINE_FOLDER)
            state = {
                "totals": self.totals.to_dict(),
                "target_loss_history": self.target_loss_history,
                "last_table_step": self._last_table_step,
            }
            (folder / "selection_state.json").write_text(json.dumps(state, indent=2))
            generators = {f"generator_{i}": g.get_state() for i, g in enumerate(self._generators)}
            save_file(generators, str(folder / "selection_rng.safetensors"))
        if self.engine is not None:
            pending = {}
            for name, sums in self.engine.pending.items():
                for key, tensor in vars(sums).items():
                    pending[f"{name}::{key}"] = tensor.detach().cpu().contiguous()
            save_file(pending, str(folder / f"pending_factors_rank{self.accelerator.process_index}.safetensors"))

    def _maybe_resume(self) -> None:
        """Once, at the first training step of a resumed run: restore counts and selection RNGs."""
        if self._resumed:
            return
        self._resumed = True
        folder = self._resume_folder and Path(self._resume_folder, STATE_FOLDER)
        if not folder:
            return
        if not (folder / "selection_state.json").is_file():
            logger.warning(
                f"{self._resume_folder} holds no influence selection state (not written by InfluenceTrainer?); "
                "selection restarts from a fresh RNG and a new fit."
            )
            return
        state = json.loads((folder / "selection_state.json").read_text())
        self.totals = SelectionTotals.from_dict(state["totals"])
        self.target_loss_history = [tuple(item) for item in state["target_loss_history"]]
        self._last_table_step = state["last_table_step"]
        generators = load_file(str(folder / "selection_rng.safetensors"))
        if len(generators) != len(self._generators):
            raise ConfigError(
                f"The checkpoint {self._resume_folder} was written by {len(generators)} processes and this run has "
                f"{len(self._generators)}; resume with the same number of processes."
            )
        for i, generator in enumerate(self._generators):
            generator.set_state(generators[f"generator_{i}"])

    def _load_pending(self, folder: Path) -> None:
        path = folder / f"pending_factors_rank{self.accelerator.process_index}.safetensors"
        if not path.is_file():
            return
        tensors = load_file(str(path), device=str(self.engine.device))
        names = {key.split("::")[0] for key in tensors}
        self.engine.pending = {
            name: FactorSums(**{key: tensors[f"{name}::{key}"] for key in FactorSums.__dataclass_fields__})
            for name in names
        }


def _require_rows(dataset: datasets.Dataset, argument: str) -> None:
    if len(dataset) == 0:
        raise EmptyInputError(f"`{argument}` holds no rows.")
    if "input_ids" not in dataset.column_names:
        raise MissingColumnError(
            f"`{argument}` has no `input_ids` column (columns: {sorted(dataset.column_names)}). Tokenize it like the "
            "training data, e.g. `dataset.map(hfinfluence.data.format_prompt_completion(tokenizer), batched=True)` "
            "or `format_text(tokenizer, text_field=...)`."
        )


def _default_collator(processing_class) -> Callable:
    if processing_class is None or getattr(processing_class, "pad_token_id", None) is None:
        raise DataFormatError(
            "Pass `data_collator` (e.g. `hfinfluence.data.CausalCollator(tokenizer)`) or a `processing_class` "
            "tokenizer with a pad token."
        )
    return CausalCollator(processing_class)


def _model_inputs(inputs: Mapping) -> dict:
    return {k: v for k, v in inputs.items() if k not in MODEL_INPUT_SKIP}


def _engine_batch(inputs: Mapping) -> dict:
    return {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "labels")}


def _attention_mask(inputs: Mapping) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    return torch.ones_like(inputs["input_ids"]) if mask is None else mask


def _label_tokens(labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """[batch] loss normaliser per example: labelled tokens after the causal shift (``sum``), or 1 (``mean``)."""
    if reduction == "mean":
        return torch.ones(labels.shape[0], dtype=torch.long, device=labels.device)
    return (labels[:, 1:] != -100).sum(dim=1)


def _normaliser(view: BufferView, weights: torch.Tensor) -> float:
    """Σ w_i n_i over every process's buffer: the weighted count of labelled tokens (or of examples)."""
    return max(float((weights * view.tokens).sum()), 1.0)
