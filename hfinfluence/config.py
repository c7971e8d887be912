"""`InfluenceConfig`: every setting of the influence engine, validated on construction."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .sizing import rule_rows

SKETCH_FAMILIES = ("gaussian", "rademacher", "countsketch", "none")
CURVATURES = ("kfac", "ekfac", "identity")
LOSS_REDUCTIONS = ("sum", "mean")


@dataclass
class InfluenceConfig:
    """Settings of `Influence`.

    Args:
        modules: glob patterns (``fnmatch``) over module names selecting the layers to track. ``None``
            tracks every trainable ``nn.Linear``, GPT-2 ``Conv1D`` and peft LoRA A/B layer inside the
            repeated decoder blocks (any module below an ``nn.ModuleList``); embeddings and the LM head
            are left out.
        sketch: random-projection family for both Kronecker sides, or ``"none"`` for exact per-layer
            gradients (small models, checking).
        sketch_dims: ``"auto"`` (effective-dimension rule), one int for both sides, or ``(m_A, m_E)``.
            Sizes are capped at the layer's input/output width.
        epsilon: target relative accuracy of the sketched scores; the rule takes
            ``m = ceil(sizing_constant * (d_eff + ln(1 / delta)) / epsilon**2)`` per side.
        sizing_constant: the constant ``c`` of the rule above.
        delta: failure probability δ of the rule's bound (0 < δ ≤ 1). Its ln(1/δ) term gives every sketched
            side at least ``ceil(c · ln(1/δ) / ε²)`` rows (24 at the defaults); ``delta=1`` drops the term.
        damping: ridge λ added to the Kronecker product. ``"auto"`` = ``damping_factor`` × the mean
            eigenvalue of A ⊗ E, per layer. A float is used as is for every layer (0 allowed).
        damping_factor: multiplier of the mean eigenvalue used by ``damping="auto"``.
        sketch_budget: with ``sketch_dims="auto"`` and ``damping="auto"``, the most rows a sketch side may
            have (default 64): a layer whose rule asks for more gets the smallest larger λ at which the rule
            fits (λ and m chosen together). ``None`` keeps every λ at the ``damping_factor`` default, which
            for most LM layers leaves them unsketched.
        curvature: ``"kfac"`` (empirical Fisher, Kronecker-factored), ``"ekfac"`` (K-FAC eigenbases with
            eigenvalues refitted per entry, one more pass over the fit data) or ``"identity"`` (gradient dot
            product).
        seed: seeds every sketch; with the module name it fixes each layer's matrices everywhere.
        loss_reduction: per-example loss is the ``"sum"`` (default) or ``"mean"`` of its labelled token losses.
        factor_dtype: accumulation dtype of factors and sketched gradients (``"float32"`` or ``"float64"``).
        exact_factor_limit: widths up to this are sized from their exact factors; wider ones from a
            pilot Gaussian sketch of this size.
        seed_check: after each change of target or curvature, score this many candidates also through a
            second sketch with another seed and report how much the two agree (`Influence.seed_check`); 0
            turns it off. It costs a second set of sketched factors and one more projection per pass.
        allow_shared: track modules that are tied to another or called several times per pass (their
            calls are summed as extra tokens) instead of refusing them.
    """

    modules: list[str] | None = None
    sketch: str = "gaussian"
    sketch_dims: Any = "auto"
    epsilon: float = 0.5
    sizing_constant: float = 2.0
    delta: float = 0.05
    damping: Any = "auto"
    damping_factor: float = 0.1
    sketch_budget: int | None = 64
    curvature: str = "kfac"
    seed: int = 0
    loss_reduction: str = "sum"
    factor_dtype: str = "float32"
    exact_factor_limit: int = 4096
    seed_check: int = 64
    allow_shared: bool = False

    def __post_init__(self):
        if isinstance(self.modules, str):
            self.modules = [self.modules]
        if self.sketch not in SKETCH_FAMILIES:
            raise ConfigError(f"`sketch` must be one of {SKETCH_FAMILIES}, got {self.sketch!r}.")
        if self.curvature not in CURVATURES:
            raise ConfigError(f"`curvature` must be one of {CURVATURES}, got {self.curvature!r}.")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigError(f"`loss_reduction` must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}.")
        if self.factor_dtype not in ("float32", "float64"):
            raise ConfigError(f"`factor_dtype` must be 'float32' or 'float64', got {self.factor_dtype!r}.")
        self.sketch_dims = _parse_sketch_dims(self.sketch_dims)
        if isinstance(self.damping, str):
            if self.damping != "auto":
                raise ConfigError(f"`damping` must be 'auto' or a float >= 0, got {self.damping!r}.")
        elif not (isinstance(self.damping, (int, float)) and self.damping >= 0):
            raise ConfigError(f"`damping` must be 'auto' or a float >= 0, got {self.damping!r}.")
        else:
            self.damping = float(self.damping)
        if not self.epsilon > 0:
            raise ConfigError(f"`epsilon` must be > 0, got {self.epsilon!r}.")
        if self.sketch_budget is not None and not (isinstance(self.sketch_budget, int) and self.sketch_budget >= 1):
            raise ConfigError(f"`sketch_budget` must be None or an int >= 1, got {self.sketch_budget!r}.")
        if isinstance(self.delta, bool) or not (isinstance(self.delta, (int, float)) and 0 < self.delta <= 1):
            raise ConfigError(f"`delta` must be in (0, 1], got {self.delta!r}.")
        self.delta = float(self.delta)
        if isinstance(self.seed_check, bool) or not (isinstance(self.seed_check, int) and self.seed_check >= 0):
            raise ConfigError(f"`seed_check` must be an int >= 0 (0 = off), got {self.seed_check!r}.")
        if not self.sizing_constant > 0:
            raise ConfigError(f"`sizing_constant` must be > 0, got {self.sizing_constant!r}.")
        if self.budgeted:
            lowest = rule_rows(0.0, epsilon=self.epsilon, constant=self.sizing_constant, delta=self.delta)
            if self.sketch_budget < lowest:
                raise ConfigError(
                    f"`sketch_budget` {self.sketch_budget} is below the sizing rule's smallest sketch, "
                    f"ceil(c · ln(1/δ) / ε²) = {lowest} rows (c={self.sizing_constant:g}, δ={self.delta:g}, "
                    f"ε={self.epsilon:g}); raise `sketch_budget` to at least {lowest}, or raise `epsilon` or `delta`."
                )

    @property
    def budgeted(self) -> bool:
        """Whether ``sketch_budget`` applies: a budget with a random sketch, auto sizes and auto damping."""
        return (
            self.sketch_budget is not None
            and self.sketch != "none"
            and self.sketch_dims == "auto"
            and self.damping == "auto"
        )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if isinstance(out["sketch_dims"], tuple):
            out["sketch_dims"] = list(out["sketch_dims"])
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> InfluenceConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"Unknown `InfluenceConfig` fields {unknown}; known fields: {sorted(known)}.")
        return cls(**values)


def _parse_sketch_dims(value):
    if value == "auto":
        return value
    if isinstance(value, bool):
        raise ConfigError(f"`sketch_dims` must be 'auto', an int or (m_A, m_E), got {value!r}.")
    if isinstance(value, int):
        value = (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        if min(value) < 1:
            raise ConfigError(f"`sketch_dims` must be positive, got {value!r}.")
        return tuple(value)
    raise ConfigError(f"`sketch_dims` must be 'auto', an int or (m_A, m_E), got {value!r}.")
