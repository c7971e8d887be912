"""Kernel fraction of target gradients against a brute-force projection, on constructed rank-deficient fits."""

from __future__ import annotations

import torch
from conftest import make_batch
from test_capture import reference_gradients
from test_influence import reference_factors

from hfinfluence import Influence, InfluenceConfig
from hfinfluence.leakage import KERNEL_RTOL, kernel_energy, kernel_parts


def range_projector(factor: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(factor)
    keep = vectors[:, values > KERNEL_RTOL * values.max()]
    return keep @ keep.T


def test_kernel_energy_of_a_constructed_gradient():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 6, generator=generator, dtype=torch.float64)
    e = torch.randn(3, 5, 4, generator=generator, dtype=torch.float64)
    null_a = torch.linalg.qr(torch.randn(6, 2, generator=generator, dtype=torch.float64)).Q
    null_e = torch.linalg.qr(torch.randn(4, 1, generator=generator, dtype=torch.float64)).Q
    grads = torch.einsum("bte,bta->bea", e, a)
    inside = (torch.eye(4) - null_e @ null_e.T) @ grads @ (torch.eye(6) - null_a @ null_a.T)
    expected = ((grads - inside) ** 2).sum(dim=(1, 2))
    torch.testing.assert_close(kernel_energy(kernel_parts(a, e, null_a, null_e)), expected)


def test_leakage_of_targets_outside_a_rank_deficient_fit(llama):
    fit = make_batch(1, 6, seed=3, prompt=1)  # 6 tokens: every 16-wide factor is rank-deficient
    outside = make_batch(3, 12, seed=4)
    engine = Influence(llama, InfluenceConfig(sketch="none", damping=1e-3)).fit([fit]).set_target([outside])
    factors = reference_factors(llama, fit, engine.tracked)
    target = {n: g.mean(0) for n, g in reference_gradients(llama, outside, engine.tracked).items()}
    for name, (a, e) in factors.items():
        grad = target[name]
        inside = range_projector(e) @ grad @ range_projector(a)
        expected = float(torch.linalg.norm(grad - inside) / torch.linalg.norm(grad))
        assert abs(engine.leakage_report.layers[name] - expected) < 1e-6, name
    assert engine.leakage_report.total > 0.3
    assert engine.sizing()[0].leakage == engine.leakage_report.layers[engine.sizing()[0].module]

    same = Influence(llama, InfluenceConfig(sketch="none", damping=1e-3)).fit([fit]).set_target([fit])
    assert same.leakage_report.total < 1e-6  # the fit data's own gradient lies in the curvature's range
    assert same.leakage_report.examples.max() < 1e-6
