"""The influence engine: fit curvature, set a target, score candidates.

    score(z) = g_targetᵀ (F + λI)⁻¹ g_z

with g_z the gradient of candidate z's loss, g_target the mean gradient of the target examples'
losses, F the Kronecker-factored empirical Fisher of the fitted data, all restricted to the tracked
layers (block-diagonal over layers) and computed in each layer's Kronecker sketch P_A ⊗ P_E.

Sign: a positive score means one gradient step on z lowers the target loss (to first order, in the
curvature's metric); a negative score means it raises it. Units: loss² per unit of curvature; scores
are comparable across candidates of one run, not across runs with different damping or models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .capture import GradientCapture, TrackedModule, find_tracked_modules
from .config import InfluenceConfig
from .curvature import (
    FactorSums,
    check_finite,
    eigendecompose,
    inverse_eigenvalues,
    inverse_scale,
    precondition,
    rotated_squares,
)
from .errors import ConfigMismatchError, EmptyInputError, NotFittedError
from .leakage import (
    LEAKAGE_WARNING,
    LeakageReport,
    SeedCheck,
    gradient_energy,
    kernel_energy,
    kernel_parts,
    null_basis,
)
from .logs import get_logger
from .losses import labelled_examples, per_example_loss
from .memory import MemoryPlan, plan_memory
from .sizing import (
    SizingRow,
    SizingTable,
    auto_damping,
    damping_for_budget,
    factor_effective_dims,
    kronecker_effective_dim,
    rule_sketch_dim,
)
from .sketch import make_module_sketch

logger = get_logger(__name__)

STATE_FILE, CONFIG_FILE = "influence.safetensors", "influence_config.json"


@dataclass
class LayerSketch:
    """A layer's fixed sketch pair and its sizing. ``None`` sketches mean the identity (no compression)."""

    info: TrackedModule
    sketch_a: torch.Tensor | None
    sketch_e: torch.Tensor | None
    sketch_dim_a: int
    sketch_dim_e: int
    effective_dim_a: float = float("nan")
    effective_dim_e: float = float("nan")
    effective_dim: float = float("nan")
    pilot_a: torch.Tensor | None = None
    pilot_e: torch.Tensor | None = None
    null_a: torch.Tensor | None = None
    null_e: torch.Tensor | None = None


@dataclass
class LayerCurvature:
    """Sketched factors of one layer and what preconditioning needs."""

    activation_covariance: torch.Tensor
    gradient_covariance: torch.Tensor
    damping: float
    eigvals_a: torch.Tensor
    eigvecs_a: torch.Tensor
    eigvals_e: torch.Tensor
    eigvecs_e: torch.Tensor
    scale: torch.Tensor
    corrected: torch.Tensor | None = None


@dataclass
class Observation:
    """What `Influence.observe` gathered from a pass the caller ran: per-example scores [batch]."""

    capture: GradientCapture
    scores: torch.Tensor | None = None

    @property
    def outputs(self) -> list[torch.Tensor]:
        """Outputs of the tracked layers in this pass; differentiate the summed per-example loss w.r.t. them."""
        return self.capture.outputs


class Influence:
    """Influence scores of candidates on a target for a causal LM.

    >>> from hfinfluence import Influence, InfluenceConfig            # doctest: +SKIP
    >>> engine = Influence(model, InfluenceConfig(sketch_dims="auto"))
    >>> engine.fit(train_batches)              # curvature + sketch sizes
    >>> engine.set_target(target_batches)      # mean target gradient, preconditioned
    >>> engine.score(candidate_batch)          # Tensor[batch], positive = helps the target
    """

    def __init__(self, model: nn.Module, config: InfluenceConfig | None = None):
        self.model = model
        self.config = config or InfluenceConfig()
        self.tracked = find_tracked_modules(model, self.config.modules, allow_shared=self.config.allow_shared)
        model_dtype = next(model.parameters()).dtype
        wide = self.config.factor_dtype == "float64" or model_dtype == torch.float64
        self.dtype = torch.float64 if wide else torch.float32
        self.layers: dict[str, LayerSketch] = {}
        self.curvature: dict[str, LayerCurvature] = {}
        self.target: dict[str, torch.Tensor] | None = None
        self.target_gradient: dict[str, torch.Tensor] | None = None
        self.target_examples = 0
        self.leakage_report: LeakageReport | None = None
        self.pending: dict[str, FactorSums] = {}
        self.damping_override: dict[str, float] = {}  # per-layer λ chosen with the sketch size (sketch_budget)
        # the seed check: a twin engine whose sketches have another seed, fed from the same passes
        self.shadow: Influence | None = None
        self.seed_check: SeedCheck | None = None
        self._probes: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._warned: set[str] = set()  # each kind of diagnostic warning is logged once per engine
        self._twin_follows = True  # observed passes feed the twin's factors (see `hold_seed_check`)

    # ------------------------------------------------------------------ passes

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prepare(self, batch: Mapping) -> dict[str, torch.Tensor]:
        if "input_ids" not in batch:
            raise EmptyInputError(f"A batch needs `input_ids` (got keys {sorted(batch)}); use an HF data collator.")
        input_ids = torch.as_tensor(batch["input_ids"], device=self.device)
        if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] < 2:
            raise EmptyInputError(f"`input_ids` must be [batch ≥ 1, tokens ≥ 2], got shape {tuple(input_ids.shape)}.")
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else torch.as_tensor(mask, device=self.device)
        labels = batch.get("labels")
        if labels is None:
            labels = input_ids.masked_fill(mask == 0, -100)
        else:
            labels = torch.as_tensor(labels, device=self.device).masked_fill(mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def _sketch(self, layer: LayerSketch, a: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, tokens, d] activations and output-gradients → their sketches [batch, tokens, m]."""
        a, e = a.to(self.dtype), e.to(self.dtype)
        if layer.sketch_a is not None:
            a = a @ layer.sketch_a.to(device=a.device, dtype=self.dtype).T
        if layer.sketch_e is not None:
            e = e @ layer.sketch_e.to(device=e.device, dtype=self.dtype).T
        return a, e

    def _run(self, batch: Mapping, callback) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """One forward+backward over ``batch`` with ``callback(info, a, e)`` fired per tracked layer."""
        inputs = self._prepare(batch)
        valid = labelled_examples(inputs["labels"])
        if not valid.any():
            raise EmptyInputError(
                "Every label in this batch is -100 (or padding), so no example has a loss. Check the label "
                "masking of the collator, or that completions survive truncation to `max_length`."
            )
        capture = GradientCapture(self.tracked, callback, allow_shared=self.config.allow_shared)
        with _eval_mode(self.model), torch.enable_grad(), capture:
            capture.set_token_mask(inputs["attention_mask"])
            logits = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            losses = per_example_loss(logits, inputs["labels"], reduction=self.config.loss_reduction)
            if not capture.outputs:
                raise RuntimeError(
                    "No tracked layer produced a differentiable output. Is the model under torch.no_grad, or "
                    "using reentrant gradient checkpointing? Disable it for scoring."
                )
            torch.autograd.grad(losses.sum(), capture.outputs, allow_unused=True)
            calls = dict(capture.calls)
        inputs["valid"] = valid
        inputs["losses"] = losses.detach()
        return inputs, calls

    def _batches(self, batches: Iterable[Mapping], what: str, desc: str):
        count = 0
        for batch in tqdm(batches, desc=desc, disable=not _show_progress(), leave=False):
            count += 1
            yield batch
        if count == 0:
            raise EmptyInputError(f"`{what}` is empty: pass at least one batch (a dict from an HF data collator).")

    # ------------------------------------------------------------------ curvature

    def fit(self, batches: Iterable[Mapping]) -> Influence:
        """Accumulate the curvature over ``batches``; on the first call also size and build the sketches.

        The first call accumulates each layer's factors exactly (or in a pilot sketch for layers wider
        than ``exact_factor_limit``), applies the effective-dimension rule, and projects the factors into
        the chosen sketches. Later calls (refreshes) reuse those sketches and accumulate in sketched space.
        Factors are summed across processes when torch.distributed is initialised.
        """
        if self.config.curvature == "ekfac":
            batches = list(batches)  # a second pass refits the eigenvalues in the new eigenbases
        first = not self.layers
        if first and self.config.seed_check and self.config.sketch != "none":
            self.shadow = self._new_twin()
        bases = self._sizing_bases() if first else None
        sums = {name: self._zero_sums(name, bases) for name in self.tracked}
        twin = {} if first or self.shadow is None else {name: self.shadow._zero_sums(name, None) for name in sums}

        def accumulate(info, a, e):
            if info.name in twin:
                twin[info.name].add(*self._sketch(self.shadow.layers[info.name], a, e))
            if first:
                a, e = _project(a.to(self.dtype), bases[info.name][0]), _project(e.to(self.dtype), bases[info.name][1])
            else:
                a, e = self._sketch(self.layers[info.name], a, e)
            sums[info.name].add(a, e)

        for batch in self._batches(batches, "batches", "fit curvature"):
            inputs, calls = self._run(batch, accumulate)
            tokens, examples = inputs["attention_mask"].sum(), int(inputs["valid"].sum())
            for name, s in [*sums.items(), *twin.items()]:
                s.add_counts(tokens * max(calls.get(name, 0), 1), examples)

        for name in list(sums):
            s = sums.pop(name)  # free each layer's sums as soon as it is decomposed
            s.all_reduce_()
            activation, gradient = s.factors()
            if first:
                self.curvature[name] = self._resolve_layer(self.tracked[name], activation, gradient, bases[name])
            else:
                self.curvature[name] = self._decompose(name, activation, gradient)
                if name in twin:
                    twin[name].all_reduce_()
                    damping = self.curvature[name].damping
                    self.shadow.curvature[name] = self.shadow._decompose(
                        name, *twin.pop(name).factors(), damping=damping
                    )
        if self.config.curvature == "ekfac":
            self._fit_eigenvalue_correction(batches)
        if self.target_gradient is not None:
            self._precondition_target()
        self._restart_seed_check()
        return self

    def _fit_eigenvalue_correction(self, batches: list[Mapping]) -> None:
        """EK-FAC: Λ = mean over examples of (U_Eᵀ S_i U_A)², replacing the products γ_j α_i (ALGORITHMS.md §2)."""
        engines = self._with_twin()
        sums = [
            {
                n: torch.zeros(lay.sketch_dim_e, lay.sketch_dim_a, dtype=self.dtype, device=self.device)
                for n, lay in engine.layers.items()
            }
            for engine in engines
        ]

        def accumulate(info, a, e):
            for engine, totals in zip(engines, sums, strict=True):
                pa, pe = self._sketch(engine.layers[info.name], a, e)
                curv = engine.curvature[info.name]
                grads = torch.einsum("bte,bta->bea", pe, pa)
                totals[info.name] += rotated_squares(grads, curv.eigvecs_a, curv.eigvecs_e)

        examples = torch.zeros((), dtype=self.dtype, device=self.device)
        for batch in self._batches(batches, "batches", "eigenvalue correction"):
            inputs, _ = self._run(batch, accumulate)
            examples += inputs["valid"].sum()
        _all_reduce([*(t for totals in sums for t in totals.values()), examples])
        for name, total in sums[0].items():
            self.curvature[name] = self._corrected(name, self.curvature[name], total / examples)
            if self.shadow is not None:
                curv, damping = self.shadow.curvature[name], self.curvature[name].damping
                self.shadow.curvature[name] = self.shadow._corrected(name, curv, sums[1][name] / examples, damping)

    def _corrected(self, name: str, curv: LayerCurvature, corrected: torch.Tensor, damping=None) -> LayerCurvature:
        check_finite(corrected, what="corrected eigenvalues", module=name)
        info = self.tracked[name]
        damping = self.config.damping if damping is None else damping
        if damping == "auto":  # the mean eigenvalue in full space: the corrected entries sum to tr(F)
            damping = self.config.damping_factor * float(corrected.sum()) / (info.d_in * info.d_out)
        scale = inverse_eigenvalues(corrected.to(torch.float64), damping).to(self.dtype)
        return dataclasses.replace(curv, damping=damping, scale=scale, corrected=corrected)

    def _sizing_bases(self) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per layer, the space factors are first accumulated in: identity, or a pilot sketch if too wide."""
        limit, bases = self.config.exact_factor_limit, {}
        for name, info in self.tracked.items():
            sides = []
            for side, width in (("pilot-A", info.d_in), ("pilot-E", info.d_out)):
                pilot = None
                if self.config.sketch != "none" and width > limit:
                    pilot = self._module_sketch(name, side, limit, width, family="gaussian")
                sides.append(pilot)
            bases[name] = tuple(sides)
        return bases

    def _zero_sums(self, name: str, bases) -> FactorSums:
        info = self.tracked[name]
        if bases is None:
            dim_a, dim_e = self.layers[name].sketch_dim_a, self.layers[name].sketch_dim_e
        else:
            pilot_a, pilot_e = bases[name]
            dim_a = info.d_in if pilot_a is None else pilot_a.shape[0]
            dim_e = info.d_out if pilot_e is None else pilot_e.shape[0]
        return FactorSums.zeros(dim_a, dim_e, dtype=self.dtype, device=self.device)

    def _damping(self, name: str, activation: torch.Tensor, gradient: torch.Tensor) -> float:
        if self.config.damping != "auto":
            return self.config.damping
        if name in self.damping_override:
            return self.damping_override[name]
        info = self.tracked[name]
        return auto_damping(
            torch.diagonal(activation),
            torch.diagonal(gradient),
            factor=self.config.damping_factor,
            dim_a=info.d_in,
            dim_e=info.d_out,
        )

    def _resolve_layer(self, info: TrackedModule, activation, gradient, bases) -> LayerCurvature:
        """Choose (m_A, m_E) for one layer, build its sketches, and decompose the factors in sketched space."""
        name, config = info.name, self.config
        eig_a = eigendecompose(activation, module=name, what="activation covariance", dtype=self.dtype)
        eig_e = eigendecompose(gradient, module=name, what="gradient covariance", dtype=self.dtype)
        damping = self._damping(name, activation, gradient)
        if config.budgeted:
            damping = damping_for_budget(
                eig_a[0],
                eig_e[0],
                budget=config.sketch_budget,
                widths=(info.d_in, info.d_out),
                floor=damping,
                epsilon=config.epsilon,
                constant=config.sizing_constant,
                delta=config.delta,
            )
            self.damping_override[name] = damping
        eff_a, eff_e = factor_effective_dims(eig_a[0], eig_e[0], damping)

        sides, twin_sides = [], {}
        for side, factor, eig, effective, width, pilot in (
            ("A", activation, eig_a, eff_a, info.d_in, bases[0]),
            ("E", gradient, eig_e, eff_e, info.d_out, bases[1]),
        ):
            cap = width if pilot is None else pilot.shape[0]
            if config.sketch == "none":
                sides.append((None, width, factor, eig))
                continue
            if config.sketch_dims == "auto":
                m = rule_sketch_dim(
                    effective, epsilon=config.epsilon, constant=config.sizing_constant, width=cap, delta=config.delta
                )
                if m >= cap:  # the cap binds: keep the (pilot) space as it is, nothing to compress
                    sides.append((pilot, cap, factor, eig))
                    continue
            else:
                m = min(config.sketch_dims[0 if side == "A" else 1], cap)
            inner = self._module_sketch(name, side, m, cap)
            full = inner if pilot is None else inner @ pilot
            sides.append((full, m, inner @ factor @ inner.T, None))
            if self.shadow is not None:  # the twin sketches the same (pilot-space) factor with its own seed
                inner = self.shadow._module_sketch(name, side, m, cap)
                full = inner if pilot is None else inner @ pilot
                twin_sides[side] = (full, m, inner @ factor @ inner.T, None)

        (sketch_a, m_a, activation, known_a), (sketch_e, m_e, gradient, known_e) = sides

        self.layers[name] = LayerSketch(
            info,
            sketch_a,
            sketch_e,
            m_a,
            m_e,
            eff_a,
            eff_e,
            kronecker_effective_dim(eig_a[0], eig_e[0], damping),
            pilot_a=bases[0],
            pilot_e=bases[1],
            null_a=null_basis(*eig_a),
            null_e=null_basis(*eig_e),
        )
        curv = self._decompose(name, activation, gradient, known=(known_a, known_e))
        if self.shadow is not None:
            (twin_a, _, twin_act, twin_known_a), (twin_e, _, twin_grad, twin_known_e) = (
                twin_sides.get(side, same) for side, same in zip("AE", sides, strict=True)
            )
            self.shadow.layers[name] = LayerSketch(info, twin_a, twin_e, m_a, m_e)
            self.shadow.curvature[name] = self.shadow._decompose(
                name, twin_act, twin_grad, known=(twin_known_a, twin_known_e), damping=curv.damping
            )
        return curv

    def _decompose(
        self, name: str, activation: torch.Tensor, gradient: torch.Tensor, known=(None, None), damping=None
    ) -> LayerCurvature:
        """Eigenbases and inverse scale of one layer's sketched factors (``known`` reuses decompositions;
        ``damping`` replaces the configured λ, as the seed check's twin takes the engine's)."""
        damping = self._damping(name, activation, gradient) if damping is None else damping
        if self.config.curvature == "identity":
            m_a, m_e = activation.shape[0], gradient.shape[0]
            eye_a = torch.eye(m_a, dtype=torch.float64, device=activation.device)
            eye_e = torch.eye(m_e, dtype=torch.float64, device=activation.device)
            ones = torch.ones(m_e, m_a, dtype=torch.float64, device=activation.device)
            return LayerCurvature(activation, gradient, damping, ones[0], eye_a, ones[:, 0], eye_e, ones)
        alpha, u_a = known[0] or eigendecompose(
            activation, module=name, what="activation covariance", dtype=self.dtype
        )
        gamma, u_e = known[1] or eigendecompose(gradient, module=name, what="gradient covariance", dtype=self.dtype)
        scale = inverse_scale(alpha, gamma, damping).to(self.dtype)
        return LayerCurvature(activation, gradient, damping, alpha, u_a, gamma, u_e, scale)

    def _require_curvature(self) -> None:
        if self.curvature:
            return
        if self.config.curvature == "identity" and self.config.sketch_dims != "auto":
            self._build_without_factors()
            return
        raise NotFittedError(
            "Call `fit(batches)` first: the curvature and the effective-dimension sizing come from it "
            "(only `curvature='identity'` with explicit `sketch_dims` or `sketch='none'` can skip it)."
        )

    def _build_without_factors(self) -> None:
        """Identity curvature with fixed sizes: sketches only, no data needed."""
        exact = self.config.sketch == "none"
        for name, info in self.tracked.items():
            sides = []
            for index, (side, width) in enumerate((("A", info.d_in), ("E", info.d_out))):
                m = width if exact else min(self.config.sketch_dims[index], width)
                sketch = None if exact else self._module_sketch(name, side, m, width)
                sides.append((sketch, m))
            (sketch_a, m_a), (sketch_e, m_e) = sides
            self.layers[name] = LayerSketch(info, sketch_a, sketch_e, m_a, m_e)
            zeros_a = torch.zeros(m_a, m_a, dtype=self.dtype, device=self.device)
            zeros_e = torch.zeros(m_e, m_e, dtype=self.dtype, device=self.device)
            self.curvature[name] = self._decompose(name, zeros_a, zeros_e)

    def _module_sketch(self, name: str, side: str, m: int, width: int, family: str | None = None) -> torch.Tensor:
        family = family or self.config.sketch
        sketch = make_module_sketch(
            family, m, width, seed=self.config.seed, module_name=name, side=side, dtype=self.dtype
        )
        return sketch.to(self.device)

    # ------------------------------------------------------------------ gradients and scores

    def sketch_gradients(self, batch: Mapping, *, candidates: bool = False) -> dict[str, torch.Tensor]:
        """Per-example sketched layer gradients S_i = Σ_t (P_E e_t)(P_A a_t)ᵀ, [batch, m_E, m_A] per layer.

        With ``sketch="none"`` these are the exact per-example gradients (Conv1D's transposed to [d_out, d_in]).
        ``candidates=True`` marks the rows as candidates for the current target, so the seed check can use
        them as `score` would (for callers that store gradients and score them later).
        """
        self._require_curvature()
        out: dict[str, torch.Tensor] = {}
        probing, scores = candidates and self.target is not None and self._probing(), {}

        def collect(info, a, e):
            pa, pe = self._sketch(self.layers[info.name], a, e)
            grad = torch.einsum("bte,bta->bea", pe, pa)
            out[info.name] = out[info.name] + grad if info.name in out else grad
            if probing:
                self._score_layer(scores, info.name, a, e, True, sketched=(pa, pe))

        inputs, _ = self._run(batch, collect)
        if probing:
            self._add_probes(scores["engine"], scores["twin"], inputs["valid"])
        return out

    def set_target(self, batches: Iterable[Mapping]) -> Influence:
        """Average the target examples' sketched gradients and precondition the mean, (F + λI)⁻¹ g_target.

        Examples without any labelled token are left out of the mean. Sums are combined across processes.
        """
        self._require_curvature()
        sums = {
            name: torch.zeros(lay.sketch_dim_e, lay.sketch_dim_a, dtype=self.dtype, device=self.device)
            for name, lay in self.layers.items()
        }

        twin = {} if self.shadow is None else {name: torch.zeros_like(total) for name, total in sums.items()}
        kernel = {name: [None, None, None] for name in self.layers}
        energies: list[torch.Tensor] = []

        def accumulate(info, a, e):
            layer = self.layers[info.name]
            pa, pe = self._sketch(layer, a, e)
            sums[info.name] += torch.einsum("bte,bta->ea", pe, pa)
            if twin:
                pa, pe = self._sketch(self.shadow.layers[info.name], a, e)
                twin[info.name] += torch.einsum("bte,bta->ea", pe, pa)
            self._accumulate_kernel(layer, a, e, kernel[info.name], energies)

        examples = torch.zeros((), dtype=self.dtype, device=self.device)
        for batch in self._batches(batches, "target batches", "target gradient"):
            energies.append(torch.zeros(2, batch["input_ids"].shape[0], dtype=self.dtype, device=self.device))
            inputs, _ = self._run(batch, accumulate)
            energies[-1] = energies[-1][:, inputs["valid"]]
            examples += inputs["valid"].sum()
        _all_reduce([*sums.values(), *twin.values(), examples])
        self.target_examples = int(examples)
        self.target_gradient = {name: s / examples for name, s in sums.items()}
        if twin:
            self.shadow.target_gradient = {name: s / examples for name, s in twin.items()}
        self.leakage_report = self._leakage_report(kernel, examples, torch.cat(energies, dim=1))
        self._precondition_target()
        self._restart_seed_check()
        return self

    def _accumulate_kernel(self, layer: LayerSketch, a, e, kernel_sums: list, energies: list) -> None:
        """Add one pass's null-space products (summed over examples) and per-example energies [2, batch]."""
        a, e = _project(a.to(self.dtype), layer.pilot_a), _project(e.to(self.dtype), layer.pilot_e)
        parts = kernel_parts(a, e, layer.null_a, layer.null_e)
        for index, part in enumerate(parts):
            if part is not None:
                total = part.sum(dim=0)
                kernel_sums[index] = total if kernel_sums[index] is None else kernel_sums[index] + total
        energies[-1][0] += kernel_energy(parts) if any(p is not None for p in parts) else 0.0
        energies[-1][1] += gradient_energy(a, e)

    def _leakage_report(self, kernel: dict, examples: torch.Tensor, energies: torch.Tensor) -> LeakageReport:
        """Kernel fractions of the mean target gradient; the norm of the mean comes from its sketch."""
        layers, outside, inside = {}, 0.0, 0.0
        for name, parts in kernel.items():
            parts = [None if p is None else p.clone() for p in parts]
            _all_reduce([p for p in parts if p is not None])
            energy = kernel_energy([None if p is None else p / examples for p in parts])
            total = float((self.target_gradient[name] ** 2).sum())
            energy = min(float(energy), total)
            layers[name] = (energy / total) ** 0.5 if total > 0 else 0.0
            outside, inside = outside + energy, inside + total
        per_example = (energies[0].clamp(min=0) / energies[1].clamp(min=1e-300)).clamp(max=1).sqrt()
        report = LeakageReport(layers, (outside / inside) ** 0.5 if inside > 0 else 0.0, per_example.cpu())
        if report.total > LEAKAGE_WARNING:
            self._warn_once(
                "leakage",
                f"{report}. Sketched scores pick up noise from this part: raise `damping` or the sketch size, or "
                "fit the curvature on data that covers the target's inputs (e.g. add target-like rows to `fit`).",
            )
        return report

    def _precondition_target(self) -> None:
        if self.shadow is not None and self.shadow.target_gradient is not None:
            self.shadow._precondition_target()
        self.target = {}
        for name, gradient in self.target_gradient.items():
            curv = self.curvature[name]
            if self.config.curvature == "identity":
                self.target[name] = gradient
            else:
                self.target[name] = precondition(gradient, curv.eigvecs_a, curv.eigvecs_e, curv.scale)

    def score(self, batch: Mapping) -> torch.Tensor:
        """Scores [batch] of a batch of candidates: g_targetᵀ (F + λI)⁻¹ g_z, positive = lowers the target loss.

        Examples with no labelled token score 0.
        """
        if self.target is None:
            raise NotFittedError("Call `set_target(batches)` before `score`.")
        scores, probing = {}, self._probing()

        def accumulate(info, a, e):
            self._score_layer(scores, info.name, a, e, probing)

        inputs, _ = self._run(batch, accumulate)
        if probing:
            self._add_probes(scores["engine"], scores["twin"], inputs["valid"])
        return scores["engine"].detach().cpu()

    def _score_layer(self, scores: dict, name: str, a, e, probing: bool, sketched=None) -> None:
        """Add one layer's part of the scores (and of the seed check's twin scores when ``probing``).

        ``sketched`` = the engine's (P_A a, P_E e) when the caller has them already.
        """
        engines = (("engine", self), ("twin", self.shadow)) if probing else (("engine", self),)
        for key, engine in engines:
            pa, pe = sketched if key == "engine" and sketched is not None else self._sketch(engine.layers[name], a, e)
            part = ((pe @ engine.target[name]) * pa).sum(dim=(1, 2))
            scores[key] = part if key not in scores else scores[key] + part

    # ------------------------------------------------------------------ seed check

    def _restart_seed_check(self) -> None:
        """The target or the curvature changed: the next scored candidates are compared afresh."""
        self._probes = []
        if self.shadow is not None:
            self.seed_check = None

    def stop_seed_check(self) -> None:
        """Drop the seed check's twin and what it costs per pass; `seed_check` keeps the last measurement."""
        self.shadow, self._probes = None, []

    def hold_seed_check(self) -> None:
        """Keep the seed check to the current curvature: observed passes stop feeding the twin's factors (half
        of `observe`'s sketching), and the next `refresh_curvature` drops the twin, keeping `seed_check`."""
        self._twin_follows = False

    def _new_twin(self) -> Influence:
        """The seed check's twin: this config with the next seed, sharing the budget-tied λ per layer."""
        twin = Influence(self.model, dataclasses.replace(self.config, seed=self.config.seed + 1, seed_check=0))
        twin.damping_override = self.damping_override
        return twin

    def _with_twin(self, *, following: bool = False) -> list[Influence]:
        """This engine, and its twin when there is one (with ``following``: only while it follows refreshes)."""
        twin = self.shadow is not None and (self._twin_follows or not following)
        return [self, self.shadow] if twin else [self]

    def _probing(self) -> bool:
        return (
            self.shadow is not None
            and self.shadow.target is not None
            and sum(p[0].numel() for p in self._probes) < self.config.seed_check
        )

    def _add_probes(self, scores: torch.Tensor, twin: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep the labelled candidates' two scores; update `seed_check`, warning once when the probe is full."""
        self._probes.append((scores.detach()[valid].cpu(), twin.detach()[valid].cpu()))
        first, second = (torch.cat(parts)[: self.config.seed_check] for parts in zip(*self._probes, strict=True))
        self.seed_check = SeedCheck.from_scores(first, second)
        if self.seed_check.examples >= self.config.seed_check and self.seed_check.worrying:
            self._warn_once(
                "seed",
                f"Sketched scores depend on the sketch seed ({self.seed_check}). Raise `sketch_budget` or "
                "`sketch_dims` (or lower `epsilon`), or raise `damping`.",
            )

    def _warn_once(self, kind: str, message: str) -> None:
        """Log a diagnostic warning the first time it fires; later values stay in `leakage_report` / `seed_check`."""
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(message + " (warned once; later values are in `leakage_report` and `seed_check`)")

    def pairwise(self, train_batches: Iterable[Mapping], query_batches: Iterable[Mapping]) -> torch.Tensor:
        """Score matrix [n_train, n_query]: entry (i, j) = g_queryjᵀ (F + λI)⁻¹ g_traini.

        The preconditioned query gradients are held in memory (n_query × Σ m_E m_A values); train batches
        are streamed one at a time, so memory does not grow with the number of training examples.
        """
        self._require_curvature()
        queries: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}
        for batch in self._batches(query_batches, "query_batches", "query gradients"):
            for name, grad in self.sketch_gradients(batch).items():
                if self.config.curvature != "identity":
                    curv = self.curvature[name]
                    grad = precondition(grad, curv.eigvecs_a, curv.eigvecs_e, curv.scale)
                queries[name].append(grad)
        stacked = {name: torch.cat(parts) for name, parts in queries.items() if parts}

        rows = []
        for batch in self._batches(train_batches, "train_batches", "pairwise scores"):
            block = None
            for name, grad in self.sketch_gradients(batch).items():
                part = torch.einsum("bea,qea->bq", grad, stacked[name])
                block = part if block is None else block + part
            rows.append(block.cpu())
        return torch.cat(rows)

    @contextlib.contextmanager
    def observe(
        self,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        *,
        score: bool = True,
        accumulate_curvature: bool = False,
    ):
        """Hooks for a forward+backward the caller runs (e.g. a training step): scoring with no pass of its own.

        Inside the block, run the forward pass, then differentiate the *sum of per-example losses* (weight 1
        each) with respect to ``observation.outputs`` — e.g. ``torch.autograd.grad(losses.sum(),
        observation.outputs, retain_graph=True)``. Afterwards ``observation.scores`` holds the scores and, with
        ``accumulate_curvature``, the pass's sketched factors are added to the pending sums that
        `refresh_curvature` turns into new curvature. Backward passes after the block are not observed.

        Shapes: ``attention_mask`` and ``labels`` [batch, tokens], as given to the model.
        """
        self._require_curvature()
        if score and self.target is None:
            raise NotFittedError("Call `set_target(batches)` before observing a pass with `score=True`.")
        if accumulate_curvature and self.config.curvature == "ekfac":
            raise NotImplementedError(
                "EK-FAC's eigenvalue correction needs the new eigenbases before it can be accumulated, so it "
                "cannot be refreshed from observed passes; refresh it with `fit(batches)` instead."
            )

        probing = score and self._probing()
        scores: dict[str, torch.Tensor] = {}

        def callback(info, a, e):
            sketched = self._sketch(self.layers[info.name], a, e)  # once, for scoring and curvature alike
            if score:
                self._score_layer(scores, info.name, a, e, probing, sketched=sketched)
                observation.scores = scores["engine"]
            if accumulate_curvature:
                self._pending_sums(info.name).add(*sketched)
                for twin in self._with_twin(following=True)[1:]:
                    twin._pending_sums(info.name).add(*self._sketch(twin.layers[info.name], a, e))

        capture = GradientCapture(self.tracked, callback, allow_shared=self.config.allow_shared)
        observation = Observation(capture)
        with capture:
            capture.set_token_mask(attention_mask)
            yield observation
            calls = dict(capture.calls)
        if probing and "engine" in scores:
            self._add_probes(scores["engine"], scores["twin"], labelled_examples(labels).to(scores["engine"].device))
        if accumulate_curvature:
            tokens, examples = attention_mask.sum(), int(labelled_examples(labels).sum())
            for engine in self._with_twin(following=True):
                for name in self.layers:
                    engine._pending_sums(name).add_counts(tokens * max(calls.get(name, 0), 1), examples)

    def _pending_sums(self, name: str) -> FactorSums:
        if name not in self.pending:
            layer = self.layers[name]
            self.pending[name] = FactorSums.zeros(
                layer.sketch_dim_a, layer.sketch_dim_e, dtype=self.dtype, device=self.device
            )
        return self.pending[name]

    def refresh_curvature(self) -> bool:
        """Replace the curvature by the factors accumulated through `observe` since the last refresh.

        Sums are combined across processes first (every process must call this together). Returns False,
        leaving the curvature as it was, when nothing was accumulated.
        """
        if not self.pending:
            return False
        if self.shadow is not None and set(self.shadow.pending) != set(self.pending):
            self.stop_seed_check()  # held (`hold_seed_check`), or resumed from sums saved without the twin's
        for name, sums in self.pending.items():
            sums.all_reduce_()
            self.curvature[name] = self._decompose(name, *sums.factors())
            if self.shadow is not None:
                twin = self.shadow.pending.pop(name)
                twin.all_reduce_()
                damping = self.curvature[name].damping
                self.shadow.curvature[name] = self.shadow._decompose(name, *twin.factors(), damping=damping)
        self.pending = {}
        if self.target_gradient is not None:
            self._precondition_target()
        self._restart_seed_check()
        return True

    # ------------------------------------------------------------------ sizing

    def sizing(self) -> SizingTable:
        """Per-layer sizing: widths, effective dimensions, chosen sketch sizes, damping and saturation.

        ``sat_A`` = d_{λ/‖Ẽ‖}(Ã) / m_A (and ``sat_E`` likewise) measured on the sketched factors: near 1 means
        the sketch is saturated and m should grow; ≲ 0.2 is comfortable (Hu et al., arXiv 2602.10449). A side
        left unsketched (m = width, the rule's cap binds or ``sketch="none"``) shows no saturation.
        """
        self._require_curvature()
        table = SizingTable()
        for name, layer in self.layers.items():
            curv = self.curvature[name]
            sat_a, sat_e = float("nan"), float("nan")
            if self.config.curvature != "identity" and curv.eigvals_a.numel():
                eff_a, eff_e = factor_effective_dims(curv.eigvals_a, curv.eigvals_e, curv.damping)
                if layer.sketch_a is not None:
                    sat_a = eff_a / layer.sketch_dim_a
                if layer.sketch_e is not None:
                    sat_e = eff_e / layer.sketch_dim_e
            table.append(
                SizingRow(
                    name,
                    layer.info.d_in,
                    layer.info.d_out,
                    layer.effective_dim_a,
                    layer.effective_dim_e,
                    layer.effective_dim,
                    layer.sketch_dim_a,
                    layer.sketch_dim_e,
                    curv.damping,
                    sat_a,
                    sat_e,
                    self.leakage_report.layers.get(name, float("nan")) if self.leakage_report else float("nan"),
                )
            )
        if self.leakage_report is not None:
            table.notes.append(str(self.leakage_report))
        if self.seed_check is not None:
            table.notes.append(str(self.seed_check))
        return table

    def memory_plan(self, *, batch_size: int = 8, tokens: int = 512, queries: int = 0) -> MemoryPlan:
        """Bytes each stage needs for batches of ``batch_size`` × ``tokens`` and ``queries`` pairwise queries.

        Works before `fit`: fixed ``sketch_dims`` are exact then, ``"auto"`` sizes are bounded by the layer widths.
        """
        widths = [(i.d_in, i.d_out) for i in self.tracked.values()]
        limit = self.config.exact_factor_limit if self.config.sketch != "none" else None
        pilots = [tuple(w if limit is None else min(w, limit) for w in pair) for pair in widths]
        if self.layers:
            dims = [(lay.sketch_dim_a, lay.sketch_dim_e) for lay in self.layers.values()]
        elif self.config.sketch == "none" or self.config.sketch_dims == "auto":
            dims = pilots
        else:
            dims = [(min(self.config.sketch_dims[0], a), min(self.config.sketch_dims[1], e)) for a, e in widths]
        factor_bytes = torch.finfo(self.dtype).bits // 8
        known = bool(self.layers) or self.config.sketch_dims != "auto" or self.config.sketch == "none"
        checked = (
            self.shadow is not None if self.layers else bool(self.config.seed_check) and self.config.sketch != "none"
        )
        return plan_memory(
            widths,
            dims,
            pilots,
            batch_size=batch_size,
            tokens=tokens,
            queries=queries,
            factor_bytes=factor_bytes,
            sizes_known=known,
            copies=2 if checked else 1,
        )

    # ------------------------------------------------------------------ persistence

    def _signature(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "modules": {n: [i.d_in, i.d_out] for n, i in self.tracked.items()},
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write sketches, factors, sizing and target to ``directory`` atomically (safetensors + JSON config)."""
        self._require_curvature()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, meta = {}, {}
        for name, layer in self.layers.items():
            curv = self.curvature[name]
            tensors[f"{name}::activation_covariance"] = curv.activation_covariance
            tensors[f"{name}::gradient_covariance"] = curv.gradient_covariance
            optional = ("sketch_a", "sketch_e", "pilot_a", "pilot_e", "null_a", "null_e")
            for key, value in ((k, getattr(layer, k)) for k in optional):
                if value is not None:
                    tensors[f"{name}::{key}"] = value
            if curv.corrected is not None:
                tensors[f"{name}::corrected"] = curv.corrected
            if self.target_gradient is not None:
                tensors[f"{name}::target_gradient"] = self.target_gradient[name]
            if self.shadow is not None:  # the seed check's twin: its sketches, factors and target
                twin, twin_curv = self.shadow.layers[name], self.shadow.curvature[name]
                state = {
                    "sketch_a": twin.sketch_a,
                    "sketch_e": twin.sketch_e,
                    "activation_covariance": twin_curv.activation_covariance,
                    "gradient_covariance": twin_curv.gradient_covariance,
                    "corrected": twin_curv.corrected,
                    "target_gradient": (self.shadow.target_gradient or {}).get(name),
                }
                own = _shareable(layer, curv)  # a side the twin shares (left unsketched) is stored once
                state = {k: v for k, v in state.items() if v is not None and v is not own.get(k)}
                tensors.update({f"check::{name}::{k}": v for k, v in state.items()})
            meta[name] = {
                "sketch_dim_a": layer.sketch_dim_a,
                "sketch_dim_e": layer.sketch_dim_e,
                "effective_dim_a": layer.effective_dim_a,
                "effective_dim_e": layer.effective_dim_e,
                "effective_dim": layer.effective_dim,
                "damping_override": self.damping_override.get(name),
            }
        payload = {**self._signature(), "layers": meta, "target_examples": self.target_examples}
        tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".tmp-"))
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / STATE_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True))
            for file in (STATE_FILE, CONFIG_FILE):
                os.replace(tmp / file, directory / file)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory

    def load(self, directory: str | os.PathLike) -> Influence:
        """Restore state saved by `save`; refuses state made with a different config or different layers."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists() or not (directory / STATE_FILE).exists():
            raise FileNotFoundError(
                f"No saved influence state in {directory} (expected {CONFIG_FILE} and {STATE_FILE})."
            )
        payload = json.loads((directory / CONFIG_FILE).read_text())
        mine = self._signature()
        if payload["config"] != mine["config"] or payload["modules"] != mine["modules"]:
            raise ConfigMismatchError(
                f"State in {directory} was made with a different setup.\n"
                f"saved:   {json.dumps({k: payload[k] for k in mine}, sort_keys=True)}\n"
                f"current: {json.dumps(mine, sort_keys=True)}\n"
                "Load it with the saved config, or fit again into another folder."
            )
        tensors = load_file(str(directory / STATE_FILE), device=str(self.device))
        self.layers, self.curvature = {}, {}
        self.damping_override = {
            n: m["damping_override"] for n, m in payload["layers"].items() if m.get("damping_override") is not None
        }
        for name in (n for n in self.tracked if n in payload["layers"]):  # model order, as `fit` builds them
            meta = payload["layers"][name]
            stored = {
                k: tensors.get(f"{name}::{k}")
                for k in ("sketch_a", "sketch_e", "pilot_a", "pilot_e", "null_a", "null_e")
            }
            self.layers[name] = LayerSketch(
                self.tracked[name],
                stored.pop("sketch_a"),
                stored.pop("sketch_e"),
                meta["sketch_dim_a"],
                meta["sketch_dim_e"],
                meta["effective_dim_a"],
                meta["effective_dim_e"],
                meta["effective_dim"],
                **stored,
            )
            self.curvature[name] = self._decompose(
                name, tensors[f"{name}::activation_covariance"], tensors[f"{name}::gradient_covariance"]
            )
            if f"{name}::corrected" in tensors:
                self.curvature[name] = self._corrected(name, self.curvature[name], tensors[f"{name}::corrected"])
        self._load_shadow(tensors)
        if f"{next(iter(payload['layers']))}::target_gradient" in tensors:
            self.target_gradient = {name: tensors[f"{name}::target_gradient"] for name in payload["layers"]}
            self.target_examples = payload["target_examples"]
            self._precondition_target()
        self._restart_seed_check()
        return self

    def _load_shadow(self, tensors: dict[str, torch.Tensor]) -> None:
        """Rebuild the seed check's twin from saved state (absent when it was off or nothing was sketched)."""
        self.shadow = None
        if not any(key.startswith("check::") for key in tensors):
            return
        self.shadow = self._new_twin()
        for name, layer in self.layers.items():
            shared = _shareable(layer, self.curvature[name])  # stored once when the twin shares them
            saved = {k[len(f"check::{name}::") :]: v for k, v in tensors.items() if k.startswith(f"check::{name}::")}
            saved = {**{k: v for k, v in shared.items() if v is not None}, **saved}
            self.shadow.layers[name] = LayerSketch(
                layer.info, saved.get("sketch_a"), saved.get("sketch_e"), layer.sketch_dim_a, layer.sketch_dim_e
            )
            damping = self.curvature[name].damping
            curv = self.shadow._decompose(
                name, saved["activation_covariance"], saved["gradient_covariance"], damping=damping
            )
            if "corrected" in saved:
                curv = self.shadow._corrected(name, curv, saved["corrected"], damping)
            self.shadow.curvature[name] = curv
        first = next(iter(self.layers))
        if f"check::{first}::target_gradient" in tensors:
            self.shadow.target_gradient = {name: tensors[f"check::{name}::target_gradient"] for name in self.layers}


def _shareable(layer: LayerSketch, curv: LayerCurvature) -> dict[str, torch.Tensor | None]:
    """The per-layer tensors the seed check's twin holds too, by the names its saved state uses."""
    return {
        "sketch_a": layer.sketch_a,
        "sketch_e": layer.sketch_e,
        "activation_covariance": curv.activation_covariance,
        "gradient_covariance": curv.gradient_covariance,
        "corrected": curv.corrected,
    }


def _all_reduce(tensors: list[torch.Tensor]) -> None:
    """Sum in place across processes when torch.distributed is initialised; a no-op otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in tensors:
            dist.all_reduce(tensor)


def _project(x: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    return x if basis is None else x @ basis.T


def _show_progress() -> bool:
    main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    return main and os.environ.get("HFINFLUENCE_PROGRESS", "1") != "0"


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Dropout off while scoring, the caller's mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
