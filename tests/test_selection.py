"""Selection and reweighting maths."""

from __future__ import annotations

import pytest
import torch

from hfinfluence import ConfigError
from hfinfluence.selection import (
    keep_count,
    reweight,
    select_boltzmann,
    select_min_score,
    select_top_k,
    select_with_quotas,
)

SCORES = torch.tensor([0.5, 3.0, -1.0, 3.0, 2.0, 0.0])


def test_top_k_orders_and_breaks_ties_by_index():
    assert select_top_k(SCORES, 3).tolist() == [1, 3, 4]


def test_min_score():
    assert select_min_score(SCORES, 0.5).tolist() == [1, 3, 4, 0]


def test_keep_count_bounds():
    assert keep_count(8, 0.25) == 2 and keep_count(3, 0.01) == 1 and keep_count(5, 1.0) == 5
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ConfigError, match="`keep_ratio`"):
            keep_count(4, bad)


def test_boltzmann_is_seeded_and_follows_the_scores():
    draw = [select_boltzmann(SCORES, 2, tau=0.5, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert draw[0].equal(draw[1]) and len(set(draw[0].tolist())) == 2
    counts = torch.zeros(6)
    for seed in range(2000):
        counts[select_boltzmann(SCORES, 1, tau=0.5, generator=torch.Generator().manual_seed(seed))] += 1
    z = (SCORES - SCORES.mean()) / SCORES.std(unbiased=False)
    expected = torch.softmax(z.double() / 0.5, 0) * 2000
    assert torch.allclose(counts.double(), expected, atol=4 * expected.sqrt().max())


def test_quotas_keep_each_group():
    chosen = select_with_quotas(SCORES, ["a", "a", "a", "b", "b", "b"], 1 / 3)
    assert sorted(chosen.tolist()) == [1, 3]


def test_reweight_is_non_negative_with_mean_one():
    weights = reweight(SCORES, tau=1.0)
    assert (weights >= 0).all() and weights.mean().item() == pytest.approx(1.0)
    assert weights.argmax().item() in (1, 3)
    assert torch.allclose(reweight(SCORES, tau=1e6), torch.ones(6, dtype=torch.float64), atol=1e-5)
