"""The effective-dimension rule for sketch sizes, the damping default and the sizing table.

Effective dimension of a PSD matrix with eigenvalues σ at ridge λ (Hu et al., arXiv 2602.10449):

    d_λ = Σ_i σ_i / (σ_i + λ)

For a Kronecker factor pair the rule sizes each side separately at the rescaled ridge
(ALGORITHMS.md §2): m_A from d_{λ/‖E‖}(A), m_E from d_{λ/‖A‖}(E), each ``ceil(c · d / ε²)`` capped at the
layer's width. In full the rule is ``ceil(c · (d + ln 1/δ) / ε²)`` with the bound's failure probability δ: the
ln 1/δ term of m = O(ε⁻²(d_λ + log 1/δ)) keeps enough rows on a side whose effective dimension is tiny, where
the variance of a handful of random rows would dominate. The eigenvalues of A ⊗ E are the products α_i γ_j, so
d_λ(A ⊗ E) is exact without any d_in·d_out matrix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .errors import ConfigError


def effective_dim(eigenvalues: torch.Tensor, damping: float) -> float:
    """d_λ = Σ σ / (σ + λ); with λ = 0 it is the numerical rank."""
    values = eigenvalues.to(torch.float64).clamp(min=0)
    if damping <= 0:
        return float((values > values.max() * 1e-10).sum()) if values.numel() else 0.0
    return float((values / (values + damping)).sum())


def kronecker_effective_dim(alpha: torch.Tensor, gamma: torch.Tensor, damping: float) -> float:
    """d_λ(A ⊗ E) from the factors' eigenvalues α [d_A] and γ [d_E]."""
    return effective_dim(torch.outer(gamma.to(torch.float64), alpha.to(torch.float64)).flatten(), damping)


def factor_effective_dims(alpha: torch.Tensor, gamma: torch.Tensor, damping: float) -> tuple[float, float]:
    """(d_{λ/‖E‖}(A), d_{λ/‖A‖}(E)): each factor's effective dimension at the ridge rescaled by the other's norm."""
    norm_a, norm_e = float(alpha.max()), float(gamma.max())
    if norm_a <= 0 or norm_e <= 0:
        return 0.0, 0.0
    return effective_dim(alpha, damping / norm_e), effective_dim(gamma, damping / norm_a)


def auto_damping(alpha: torch.Tensor, gamma: torch.Tensor, *, factor: float, dim_a: int, dim_e: int) -> float:
    """``factor`` × the mean eigenvalue of A ⊗ E = factor · tr(A) tr(E) / (d_A d_E).

    Traces are divided by the true layer widths, so the value is also right when the eigenvalues
    come from a pilot sketch of a wide layer (the sketch preserves the trace in expectation).
    """
    return factor * float(alpha.sum()) * float(gamma.sum()) / (dim_a * dim_e)


def rule_rows(effective: float, *, epsilon: float, constant: float, delta: float = 1.0) -> int:
    """Uncapped rows the rule asks for: ceil(c · (d_eff + ln 1/δ) / ε²), at least 1 (δ = 1 drops the log term)."""
    return max(1, math.ceil(constant * (effective + math.log(1.0 / delta)) / epsilon**2))


def rule_sketch_dim(effective: float, *, epsilon: float, constant: float, width: int, delta: float = 1.0) -> int:
    """`rule_rows` capped at ``width``."""
    return int(min(width, rule_rows(effective, epsilon=epsilon, constant=constant, delta=delta)))


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def damping_for_budget(
    alpha: torch.Tensor,
    gamma: torch.Tensor,
    *,
    budget: int,
    widths: tuple[int, int],
    floor: float,
    epsilon: float,
    constant: float,
    delta: float = 1.0,
) -> float:
    """The smallest λ ≥ ``floor`` at which the rule fits each side of the layer into ``budget`` rows.

    λ and m are chosen together (ALGORITHMS.md §4): the effective dimensions fall as λ grows, so a bisection
    in log λ finds where ceil(c · d / ε²) ≤ budget on both sides. A side no wider than the budget needs no
    sketch and never constrains λ. A budget below the rule's floor (its rows at d = 0) cannot be met by any λ
    and raises `ConfigError`.
    """
    lowest = rule_rows(0.0, epsilon=epsilon, constant=constant, delta=delta)
    if lowest > budget and max(widths) > budget:
        raise ConfigError(
            f"sketch_budget={budget} is below the rule's smallest sketch, ceil(c · ln(1/δ) / ε²) = {lowest} rows "
            f"(c={constant:g}, δ={delta:g}, ε={epsilon:g}); raise `sketch_budget` to at least {lowest}, or raise "
            "`epsilon` or `delta`."
        )

    def fits(damping: float) -> bool:
        effective = factor_effective_dims(alpha, gamma, damping)
        for d, width in zip(effective, widths, strict=True):
            if width > budget and rule_rows(d, epsilon=epsilon, constant=constant, delta=delta) > budget:
                return False
        return True

    floor = max(floor, 1e-30)
    if fits(floor):
        return floor
    low, high = floor, floor * 10
    while not fits(high):
        low, high = high, high * 10
    for _ in range(40):
        middle = math.sqrt(low * high)
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


@dataclass
class SizingRow:
    module: str
    d_in: int
    d_out: int
    effective_dim_a: float
    effective_dim_e: float
    effective_dim: float
    sketch_dim_a: int
    sketch_dim_e: int
    damping: float
    saturation_a: float
    saturation_e: float
    leakage: float = float("nan")


class SizingTable(list):
    """Rows of `SizingRow`, one per tracked module; ``str()`` gives an aligned text table followed by the
    ``notes`` (whole-target diagnostics: leakage, seed check)."""

    notes: list[str]

    def __init__(self, *args):
        super().__init__(*args)
        self.notes = []

    columns = (
        "module",
        "d_in",
        "d_out",
        "d_eff(A)",
        "d_eff(E)",
        "d_eff(A⊗E)",
        "m_A",
        "m_E",
        "damping",
        "sat_A",
        "sat_E",
        "leak",
    )

    def _cells(self, row: SizingRow) -> list[str]:
        return [
            row.module,
            str(row.d_in),
            str(row.d_out),
            f"{row.effective_dim_a:.1f}",
            f"{row.effective_dim_e:.1f}",
            f"{row.effective_dim:.1f}",
            str(row.sketch_dim_a),
            str(row.sketch_dim_e),
            f"{row.damping:.3g}",
            _ratio(row.saturation_a),
            _ratio(row.saturation_e),
            _ratio(row.leakage),
        ]

    def totals(self) -> dict:
        return {
            "modules": len(self),
            "sketched_params": sum(r.sketch_dim_a * r.sketch_dim_e for r in self),
            "full_params": sum(r.d_in * r.d_out for r in self),
        }

    def __str__(self) -> str:
        cells = [list(self.columns)] + [self._cells(r) for r in self]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        lines = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            for row in cells
        ]
        t = self.totals()
        lines.append(
            f"{t['modules']} modules; sketched gradient size {t['sketched_params']:,} "
            f"of {t['full_params']:,} parameters"
        )
        lines += self.notes
        return "\n".join(lines)

    def to_markdown(self) -> str:
        header = "| " + " | ".join(self.columns) + " |\n|" + "---|" * len(self.columns) + "\n"
        return header + "\n".join("| " + " | ".join(self._cells(r)) + " |" for r in self) + "\n"

    def to_dicts(self) -> list[dict]:
        return [asdict(r) for r in self]
