"""The effective-dimension rule and the budget-tied damping on constructed spectra."""

from __future__ import annotations

import math

import pytest
import torch

from hfinfluence import Influence, InfluenceConfig
from hfinfluence.errors import ConfigError
from hfinfluence.sizing import damping_for_budget, effective_dim, factor_effective_dims, rule_sketch_dim

ALPHA = torch.logspace(0, -4, 64, dtype=torch.float64)
GAMMA = torch.logspace(1, -3, 48, dtype=torch.float64)


def rule(d: float, epsilon: float = 0.5, width: int = 10**6) -> int:
    return rule_sketch_dim(d, epsilon=epsilon, constant=2.0, width=width)


def test_effective_dimension_limits():
    assert effective_dim(ALPHA, 0.0) == 64
    assert effective_dim(ALPHA, 1e-12) == pytest.approx(64, rel=1e-6)
    assert effective_dim(ALPHA, 1e12) == pytest.approx(float(ALPHA.sum()) / 1e12)


def test_rule_is_monotone_in_epsilon_and_damping():
    dampings = [1e-6, 1e-4, 1e-2, 1.0]
    for epsilon in (0.25, 0.5, 1.0):
        sizes = [rule(factor_effective_dims(ALPHA, GAMMA, lam)[0], epsilon) for lam in dampings]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    for lam in dampings:
        d_a = factor_effective_dims(ALPHA, GAMMA, lam)[0]
        sizes = [rule(d_a, eps) for eps in (0.25, 0.5, 1.0, 2.0)]
        assert sizes == sorted(sizes, reverse=True)
    assert rule(1e9, width=50) == 50 and rule(0.0) == 1


@pytest.mark.parametrize("budget", [4, 16, 40])
def test_budget_damping_is_the_smallest_that_fits(budget):
    floor = 1e-8
    lam = damping_for_budget(ALPHA, GAMMA, budget=budget, widths=(64, 48), floor=floor, epsilon=0.5, constant=2.0)
    sizes = [rule(d) for d in factor_effective_dims(ALPHA, GAMMA, lam)]
    assert lam > floor and max(sizes) <= budget
    smaller = [rule(d) for d in factor_effective_dims(ALPHA, GAMMA, lam * 0.99)]
    assert max(smaller) > budget  # within 1 % of the smallest damping that fits


def test_budget_keeps_the_floor_when_it_already_fits():
    lam = damping_for_budget(ALPHA, GAMMA, budget=64, widths=(64, 48), floor=1e-3, epsilon=0.5, constant=2.0)
    assert lam == 1e-3  # both sides are no wider than the budget: nothing to sketch


def test_engine_budget_sizes_every_layer_within_budget(llama):
    from test_influence import FIT, split_batch

    plain = Influence(llama, InfluenceConfig(epsilon=1.0)).fit(split_batch(FIT, 4)).sizing()
    budgeted = Influence(llama, InfluenceConfig(epsilon=1.0, sketch_budget=6)).fit(split_batch(FIT, 4)).sizing()
    for before, after in zip(plain, budgeted, strict=True):
        assert after.sketch_dim_a <= 6 and after.sketch_dim_e <= 6
        assert after.damping >= before.damping
        floor_term = math.log(1 / InfluenceConfig.delta)
        assert after.sketch_dim_a == min(after.d_in, math.ceil(2.0 * (after.effective_dim_a + floor_term)))


def test_log_term_sets_a_floor_and_delta_one_drops_it():
    assert rule_sketch_dim(0.0, epsilon=0.5, constant=2.0, width=10**6, delta=0.05) == math.ceil(8 * math.log(20))
    assert rule_sketch_dim(3.0, epsilon=0.5, constant=2.0, width=10**6, delta=1.0) == rule(3.0) == 24
    sizes = [rule_sketch_dim(2.0, epsilon=0.5, constant=2.0, width=10**6, delta=d) for d in (0.001, 0.01, 0.1, 1.0)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_budget_below_the_rule_floor_is_refused_with_the_minimum():
    with pytest.raises(ConfigError, match=r"sketch_budget=16 .* 24 rows"):
        damping_for_budget(ALPHA, GAMMA, budget=16, widths=(64, 48), floor=1e-8, epsilon=0.5, constant=2.0, delta=0.05)
    # the same budget is fine when no side is wider than it, or once the log term is dropped
    assert damping_for_budget(
        ALPHA, GAMMA, budget=64, widths=(64, 48), floor=1e-3, epsilon=0.5, constant=2.0, delta=0.05
    )
    assert damping_for_budget(ALPHA, GAMMA, budget=16, widths=(64, 48), floor=1e-8, epsilon=0.5, constant=2.0) > 1e-8


def test_config_refuses_a_budget_below_the_rule_floor_before_any_work():
    with pytest.raises(ConfigError, match=r"`sketch_budget` 16 .* 24 rows"):
        InfluenceConfig(sketch_budget=16)
    InfluenceConfig(sketch_budget=16, delta=1.0)  # without the log term any budget can be met
    InfluenceConfig(sketch_budget=4, sketch="none")  # no sketch: the budget plays no part


@pytest.mark.parametrize("delta", [0.0, -0.1, 1.5, True])
def test_delta_is_validated(delta):
    with pytest.raises(ConfigError, match="delta"):
        InfluenceConfig(delta=delta)


def test_exact_scores_keep_the_plain_damping(llama):
    from test_influence import FIT, split_batch

    exact = Influence(llama, InfluenceConfig(sketch="none", sketch_budget=4)).fit(split_batch(FIT, 4)).sizing()
    plain = Influence(llama, InfluenceConfig(sketch="none", sketch_budget=None)).fit(split_batch(FIT, 4)).sizing()
    assert [r.damping for r in exact] == [r.damping for r in plain]  # no sketch, so no budget to fit
