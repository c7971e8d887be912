"""Kronecker-factored curvature in sketched space: accumulation, eigenbases, preconditioning.

For a tracked layer with sketched activations ã_t = P_A a_t and output-gradients ẽ_t = P_E e_t
(ALGORITHMS.md §2, George et al. 2018 for K-FAC, Grosse et al. 2023 for its use in influence):

    Ã = (1 / #tokens)   Σ_t ã_t ã_tᵀ           [m_A, m_A]
    Ẽ = (1 / #examples) Σ_t ẽ_t ẽ_tᵀ           [m_E, m_E]

so that Ã ⊗ Ẽ approximates the empirical Fisher E_i[vec(G_i) vec(G_i)ᵀ] of the per-example losses
(cross-token terms dropped, as in K-FAC). The ridge sits on the product:

    (Ã ⊗ Ẽ + λI)⁻¹ vec(S) = vec(U_E [(U_Eᵀ S U_A) ⊘ (γ αᵀ + λ)] U_Aᵀ)

with Ã = U_A diag(α) U_Aᵀ and Ẽ = U_E diag(γ) U_Eᵀ computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import NonFiniteError

#: relative size below which an eigenvalue product counts as zero when the ridge is 0 (pseudo-inverse)
PINV_RTOL = 1e-14


@dataclass
class FactorSums:
    """Running sums of one layer's Kronecker factors and their normalisers."""

    activation_sum: torch.Tensor
    gradient_sum: torch.Tensor
    tokens: torch.Tensor
    examples: torch.Tensor

    @classmethod
    def zeros(cls, dim_a: int, dim_e: int, *, dtype, device) -> FactorSums:
        def zero(*shape):
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(zero(dim_a, dim_a), zero(dim_e, dim_e), zero(()), zero(()))

    def add(self, a: torch.Tensor, e: torch.Tensor) -> None:
        """Add a batch: ``a`` [batch, tokens, dim_a] and ``e`` [batch, tokens, dim_e], padding already zeroed."""
        a2, e2 = a.reshape(-1, a.shape[-1]), e.reshape(-1, e.shape[-1])
        self.activation_sum += a2.T @ a2
        self.gradient_sum += e2.T @ e2

    def add_counts(self, tokens, examples) -> None:
        self.tokens += tokens
        self.examples += examples

    def all_reduce_(self) -> None:
        """Sum over processes when torch.distributed is initialised; a no-op otherwise."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for tensor in (self.activation_sum, self.gradient_sum, self.tokens, self.examples):
                dist.all_reduce(tensor)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised (activation_covariance, gradient_covariance), divided in place to spare memory.

        Call once, after the last `add` (and `all_reduce_`): the sums become the factors.
        """
        self.activation_sum /= self.tokens.clamp(min=1)
        self.gradient_sum /= self.examples.clamp(min=1)
        return self.activation_sum, self.gradient_sum


def check_finite(tensor: torch.Tensor, *, what: str, module: str) -> None:
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(
            f"The {what} of module {module} has {bad} non-finite entries (NaN/inf). The model produced "
            "non-finite activations or gradients on some batch: check the inputs, lower the learning rate, "
            "or use float32 instead of float16."
        )


def eigendecompose(
    factor: torch.Tensor, *, module: str, what: str, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition computed in float64; returns (eigenvalues ≥ 0 [m] in float64,
    eigenvectors [m, m] stored in ``dtype``)."""
    check_finite(factor, what=what, module=module)
    sym = factor.to(torch.float64)
    sym = (sym + sym.T) / 2
    values, vectors = torch.linalg.eigh(sym)
    del sym
    return values.clamp(min=0), vectors.to(dtype)


def eigenvalues(factor: torch.Tensor, *, module: str, what: str) -> torch.Tensor:
    """Eigenvalues (≥ 0, float64, ascending) of a symmetric factor."""
    check_finite(factor, what=what, module=module)
    sym = factor.to(torch.float64)
    return torch.linalg.eigvalsh((sym + sym.T) / 2).clamp(min=0)


def inverse_scale(alpha: torch.Tensor, gamma: torch.Tensor, damping: float) -> torch.Tensor:
    """[m_E, m_A] multipliers 1 / (γ_j α_i + λ); with λ = 0, the pseudo-inverse (0 on the null space)."""
    return inverse_eigenvalues(torch.outer(gamma, alpha), damping)


def inverse_eigenvalues(products: torch.Tensor, damping: float) -> torch.Tensor:
    """1 / (σ + λ) entrywise; with λ = 0, the pseudo-inverse (0 where σ ≤ PINV_RTOL · max σ)."""
    denominator = products + damping
    if damping > 0:
        return 1.0 / denominator
    cutoff = PINV_RTOL * products.max().clamp(min=torch.finfo(products.dtype).tiny)
    return torch.where(denominator > cutoff, 1.0 / denominator.clamp(min=cutoff), torch.zeros_like(denominator))


def rotated_squares(gradients: torch.Tensor, eigvecs_a: torch.Tensor, eigvecs_e: torch.Tensor) -> torch.Tensor:
    """Σ_i (U_Eᵀ S_i U_A)² over a batch of sketched gradients [batch, m_E, m_A] → [m_E, m_A].

    Averaged over examples these are the eigenvalue-corrected entries Λ of EK-FAC (George et al. 2018,
    "Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis", eq. 9).
    """
    dtype = gradients.dtype
    rotated = eigvecs_e.to(dtype).T @ gradients @ eigvecs_a.to(dtype)
    return (rotated**2).sum(dim=0)


def precondition(
    gradient: torch.Tensor,
    eigvecs_a: torch.Tensor,
    eigvecs_e: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Apply (Ã ⊗ Ẽ + λI)⁻¹ to sketched gradients ``gradient`` [..., m_E, m_A] through the two eigenbases."""
    dtype = gradient.dtype
    u_a, u_e = eigvecs_a.to(dtype), eigvecs_e.to(dtype)
    rotated = u_e.T @ gradient @ u_a
    return u_e @ (rotated * scale.to(dtype)) @ u_a.T
