"""The sketched score error ε₉₅ (ALGORITHMS.md §8) on a constructed Kronecker curvature, through the engine's
own sketch, eigendecomposition and preconditioning."""

from __future__ import annotations

import torch

from hfinfluence.curvature import eigendecompose, inverse_scale, precondition
from hfinfluence.sketch import make_module_sketch

D_IN, D_OUT, TOKENS, DAMPING = 48, 40, 5, 1e-2


def spectrum_factor(width: int, top: float, seed: int) -> torch.Tensor:
    """A PSD factor with eigenvalues 10^top … 10^(top−3) in a random basis."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
    return (basis * torch.logspace(top, top - 3, width, dtype=torch.float64)) @ basis.T


def draw_gradients(count: int, activation, gradient, seed: int) -> torch.Tensor:
    """Per-example layer gradients Σ_t e_t a_tᵀ with a ~ N(0, A), e ~ N(0, E): [count, d_out, d_in]."""
    generator = torch.Generator().manual_seed(seed)
    root_a, root_e = torch.linalg.cholesky(activation), torch.linalg.cholesky(gradient)
    a = torch.randn(count, TOKENS, D_IN, generator=generator, dtype=torch.float64) @ root_a.T
    e = torch.randn(count, TOKENS, D_OUT, generator=generator, dtype=torch.float64) @ root_e.T
    return torch.einsum("bte,bta->bea", e, a)


def eps95(m: int, seed: int, activation, gradient, candidates, targets) -> float:
    alpha, u_a = eigendecompose(activation, module="layer", what="A")
    gamma, u_e = eigendecompose(gradient, module="layer", what="E")
    rotate = lambda g: u_e.T @ g @ u_a  # noqa: E731
    exact = torch.einsum("cea,tea->ct", rotate(candidates), rotate(targets) * inverse_scale(alpha, gamma, DAMPING))
    pinv = inverse_scale(alpha, gamma, 0.0)
    phi_c = (rotate(candidates) ** 2 * pinv).sum(dim=(1, 2))
    phi_t = (rotate(targets) ** 2 * pinv).sum(dim=(1, 2))

    sketch_a = make_module_sketch("gaussian", m, D_IN, seed=seed, module_name="layer", side="A", dtype=torch.float64)
    sketch_e = make_module_sketch("gaussian", m, D_OUT, seed=seed, module_name="layer", side="E", dtype=torch.float64)
    s_alpha, s_u_a = eigendecompose(sketch_a @ activation @ sketch_a.T, module="layer", what="sketched A")
    s_gamma, s_u_e = eigendecompose(sketch_e @ gradient @ sketch_e.T, module="layer", what="sketched E")
    project = lambda g: sketch_e @ g @ sketch_a.T  # noqa: E731
    query = precondition(project(targets), s_u_a, s_u_e, inverse_scale(s_alpha, s_gamma, DAMPING))
    sketched = torch.einsum("cea,tea->ct", project(candidates), query)
    normalised = (sketched - exact).abs() / torch.outer(phi_c, phi_t).sqrt()
    return float(torch.quantile(normalised.flatten(), 0.95))


def test_eps95_shrinks_as_the_sketch_grows():
    activation, gradient = spectrum_factor(D_IN, 0.0, 1), spectrum_factor(D_OUT, 1.0, 2)
    candidates = draw_gradients(40, activation, gradient, 3)
    targets = draw_gradients(10, activation, gradient, 4)
    sizes = (4, 8, 16, 32, 40)  # m_A = m_E = m; 40 is square on the E side
    errors = [sum(eps95(m, s, activation, gradient, candidates, targets) for s in range(3)) / 3 for m in sizes]
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.5 * errors[0]
