"""Leakage: how much of a target gradient lies outside the range of the fitted curvature.

Write a target gradient as g′ = g′_∥ + g′_⊥ with g′_⊥ in ker(A ⊗ E) = (ker A ⊗ ·) + (· ⊗ ker E). Exact ridge
scores ignore g′_⊥ (every training gradient Σ_t e_t a_tᵀ lies in range(A) ⊗ range(E)), but a sketched score
picks up a zero-mean term from it whose spread grows as λ shrinks and falls like m^{-1/2}
(ALGORITHMS.md §3). For a layer gradient G [d_out, d_in] and null-space bases N_A [d_in, k_A], N_E [d_out, k_E]:

    ‖G_⊥‖² = ‖G N_A‖² + ‖N_Eᵀ G‖² − ‖N_Eᵀ G N_A‖²

which needs only the products with the (usually thin) null-space bases, never G itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: an eigenvalue at most this fraction of the factor's largest counts as null
KERNEL_RTOL = 1e-6
#: a target whose kernel fraction exceeds this triggers a warning
LEAKAGE_WARNING = 0.05


def null_basis(eigvals: torch.Tensor, eigvecs: torch.Tensor, *, rtol: float = KERNEL_RTOL) -> torch.Tensor | None:
    """Eigenvectors [d, k] whose eigenvalue is at most ``rtol`` × the largest, or None when there are none."""
    null = eigvals <= rtol * eigvals.max().clamp(min=torch.finfo(eigvals.dtype).tiny)
    return eigvecs[:, null].contiguous() if bool(null.any()) else None


def kernel_parts(
    a: torch.Tensor, e: torch.Tensor, null_a: torch.Tensor | None, null_e: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-example G_i N_A [b, d_out, k_A], N_Eᵀ G_i [b, k_E, d_in], N_Eᵀ G_i N_A [b, k_E, k_A] from tokens.

    ``a`` [b, t, d_in] and ``e`` [b, t, d_out] are the layer's inputs and output-gradients.
    """
    a_null = None if null_a is None else a @ null_a.to(a.dtype)
    e_null = None if null_e is None else e @ null_e.to(e.dtype)
    grad_null_a = None if a_null is None else torch.einsum("bte,btk->bek", e, a_null)
    null_e_grad = None if e_null is None else torch.einsum("btk,bta->bka", e_null, a)
    both = None if a_null is None or e_null is None else torch.einsum("btk,btl->bkl", e_null, a_null)
    return grad_null_a, null_e_grad, both


def kernel_energy(parts) -> torch.Tensor | float:
    """‖G_⊥‖² from `kernel_parts` (summed over all but the leading dimension when batched)."""
    total = 0.0
    for sign, part in zip((1.0, 1.0, -1.0), parts, strict=True):
        if part is not None:
            total = total + sign * (part**2).flatten(start_dim=part.dim() - 2).sum(dim=-1)
    return total


def gradient_energy(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Per-example ‖G_i‖² = Σ_{t,s} (e_t·e_s)(a_t·a_s) [b], exact and without forming G_i."""
    return ((e @ e.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum(dim=(1, 2))


@dataclass
class LeakageReport:
    """Kernel fractions ‖g_⊥‖ / ‖g‖ of the mean target gradient (per layer and overall) and of each example."""

    layers: dict[str, float]
    total: float
    examples: torch.Tensor = field(repr=False)

    def worst_layers(self, count: int = 3) -> list[tuple[str, float]]:
        return sorted(self.layers.items(), key=lambda item: -item[1])[:count]

    def __str__(self) -> str:
        worst = ", ".join(f"{name} {value:.1%}" for name, value in self.worst_layers())
        examples = self.examples
        spread = f"median {examples.median():.1%}, max {examples.max():.1%}" if examples.numel() else "none"
        return (
            f"target gradient outside the curvature's range: {self.total:.1%} overall "
            f"(largest: {worst}); per target example: {spread}"
        )


#: two sketch seeds ranking the probe candidates below this Spearman correlation trigger a warning
SEED_SPEARMAN_WARNING = 0.9


def _ranks(x: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(x)
    ranks[x.argsort()] = torch.arange(x.numel(), dtype=x.dtype, device=x.device)
    return ranks


@dataclass
class SeedCheck:
    """The same candidates scored against the same target through the engine's sketch and through a second,
    independently seeded sketch of the same sizes and damping (ALGORITHMS.md §3).

    ``spearman`` is the rank correlation of the two score vectors; ``spread`` is the standard deviation of
    their difference over the standard deviation of the engine's scores (0 = seed-independent). Both come
    from ``examples`` candidates: the first ones scored after the target or the curvature last changed.
    """

    examples: int
    spearman: float
    spread: float

    @classmethod
    def from_scores(cls, first: torch.Tensor, second: torch.Tensor) -> SeedCheck:
        first, second = first.double(), second.double()
        if first.numel() < 2:
            return cls(int(first.numel()), float("nan"), float("nan"))
        rank_a, rank_b = _ranks(first), _ranks(second)
        rank_a, rank_b = rank_a - rank_a.mean(), rank_b - rank_b.mean()
        denominator = float(rank_a.norm() * rank_b.norm())
        spearman = min(1.0, max(-1.0, float(rank_a @ rank_b) / denominator)) if denominator > 0 else float("nan")
        scale = float(first.std())
        spread = float((first - second).std()) / scale if scale > 0 else float("nan")
        return cls(int(first.numel()), spearman, spread)

    @property
    def worrying(self) -> bool:
        return self.spearman < SEED_SPEARMAN_WARNING

    def __str__(self) -> str:
        return (
            f"two sketch seeds over {self.examples} candidates: Spearman {self.spearman:.3f}, score difference "
            f"{self.spread:.1%} of the scores' spread"
        )
