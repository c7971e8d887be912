"""The seed check: scores through a second, independently seeded sketch, compared with the engine's."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import ATOL, RTOL
from test_influence import CANDIDATES, FIT, TARGET, split_batch

from hfinfluence import Influence, InfluenceConfig
from hfinfluence.leakage import SeedCheck
from hfinfluence.losses import per_example_loss


def engine_for(model, **config) -> Influence:
    return Influence(model, InfluenceConfig(**config)).fit(split_batch(FIT, 4)).set_target(split_batch(TARGET, 2))


def test_seed_check_statistics():
    scores = torch.tensor([3.0, -1.0, 2.0, 0.5, 7.0])
    same = SeedCheck.from_scores(scores, scores.clone())
    assert (same.examples, same.spread) == (5, 0.0) and same.spearman == pytest.approx(1.0, abs=1e-12)
    reversed_ranks = SeedCheck.from_scores(scores, -scores)
    assert reversed_ranks.spearman == pytest.approx(-1.0)
    assert reversed_ranks.spread == pytest.approx(float((2 * scores).std() / scores.std()))
    assert (
        SeedCheck.from_scores(scores[:1], scores[:1]).spearman
        != SeedCheck.from_scores(scores[:1], scores[:1]).spearman
    )


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_twin_scores_equal_an_engine_built_with_the_next_seed(llama, curvature):
    settings = {"sketch": "gaussian", "sketch_dims": (5, 7), "damping": 1e-3, "curvature": curvature}
    engine = engine_for(llama, **settings, seed_check=64)
    other = engine_for(llama, **settings, seed=1, seed_check=0)
    scores, theirs = engine.score(CANDIDATES), other.score(CANDIDATES)
    assert not torch.allclose(scores, theirs, rtol=1e-3)  # really another sketch
    expected = SeedCheck.from_scores(scores, theirs)
    assert engine.seed_check.examples == CANDIDATES["input_ids"].shape[0]
    assert engine.seed_check.spearman == pytest.approx(expected.spearman)
    assert engine.seed_check.spread == pytest.approx(expected.spread, rel=1e-6)
    assert other.seed_check is None and other.shadow is None


def test_square_sketches_agree_across_seeds(llama):
    engine = engine_for(llama, sketch="gaussian", sketch_dims=(24, 24), damping=0.0)  # square: exact for any seed
    engine.score(CANDIDATES)
    assert engine.seed_check.spearman == pytest.approx(1.0) and engine.seed_check.spread < 1e-5
    assert "two sketch seeds over 6 candidates" in str(engine.sizing())


def test_tiny_sketch_warns_and_the_check_stops_after_its_probe(llama, caplog):
    engine = engine_for(llama, sketch="gaussian", sketch_dims=(1, 1), damping=1e-3, seed_check=4)
    with caplog.at_level(logging.WARNING, logger="hfinfluence"):
        engine.score(CANDIDATES)
    assert engine.seed_check.examples == 4 and engine.seed_check.worrying
    assert "depend on the sketch seed" in caplog.text and "sketch_budget" in caplog.text
    first = engine.seed_check
    engine.score(CANDIDATES)  # the probe is full: nothing more is compared
    assert engine.seed_check == first


def test_check_restarts_when_target_or_curvature_change_and_follows_refreshes(llama):
    settings = {"sketch": "gaussian", "sketch_dims": (6, 8), "damping": 1e-3}
    engine = engine_for(llama, **settings)
    engine.score(CANDIDATES)
    assert engine.seed_check is not None
    engine.set_target(split_batch(TARGET, 2))
    assert engine.seed_check is None

    with engine.observe(CANDIDATES["attention_mask"], CANDIDATES["labels"], accumulate_curvature=True) as obs:
        logits = llama(input_ids=CANDIDATES["input_ids"], attention_mask=CANDIDATES["attention_mask"]).logits
        torch.autograd.grad(per_example_loss(logits, CANDIDATES["labels"]).sum(), obs.outputs)
    observed = engine.seed_check
    assert observed.examples == 6
    assert engine.refresh_curvature() and engine.seed_check is None

    # the twin refreshed from the observed pass like an engine of the next seed refitted on the same rows
    other = Influence(llama, InfluenceConfig(**settings, seed=1, seed_check=0))
    other.fit(split_batch(FIT, 4)).fit([CANDIDATES])
    for name, curv in engine.shadow.curvature.items():
        torch.testing.assert_close(curv.gradient_covariance, other.curvature[name].gradient_covariance)
        torch.testing.assert_close(curv.activation_covariance, other.curvature[name].activation_covariance)


def test_seed_check_survives_save_and_load(llama, tmp_path):
    settings = {"sketch": "countsketch", "sketch_dims": (5, 5)}
    engine = engine_for(llama, **settings)
    engine.save(tmp_path / "state")
    restored = Influence(llama, InfluenceConfig(**settings)).load(tmp_path / "state")
    torch.testing.assert_close(restored.score(CANDIDATES), engine.score(CANDIDATES), rtol=RTOL, atol=ATOL)
    assert restored.seed_check.spearman == pytest.approx(engine.seed_check.spearman)
    assert restored.seed_check.spread == pytest.approx(engine.seed_check.spread, rel=1e-6)


def test_exact_scores_have_no_twin(llama):
    engine = engine_for(llama, sketch="none", damping=1e-3)
    engine.score(CANDIDATES)
    assert engine.shadow is None and engine.seed_check is None


def test_each_diagnostic_warns_once_per_engine(llama, caplog):
    engine = engine_for(llama, sketch="gaussian", sketch_dims=(1, 1), damping=1e-3, seed_check=4)
    with caplog.at_level(logging.WARNING, logger="hfinfluence"):
        for _ in range(3):
            engine.set_target(split_batch(TARGET, 2)).score(CANDIDATES)
            assert engine.seed_check.worrying
    assert caplog.text.count("depend on the sketch seed") == 1


def test_a_held_check_scores_without_accumulating_and_ends_at_the_refresh(llama):
    engine = engine_for(llama, sketch="gaussian", sketch_dims=(6, 8), damping=1e-3)
    engine.hold_seed_check()
    with engine.observe(CANDIDATES["attention_mask"], CANDIDATES["labels"], accumulate_curvature=True) as obs:
        logits = llama(input_ids=CANDIDATES["input_ids"], attention_mask=CANDIDATES["attention_mask"]).logits
        torch.autograd.grad(per_example_loss(logits, CANDIDATES["labels"]).sum(), obs.outputs)
    measured = engine.seed_check
    assert measured.examples == 6 and engine.pending and not engine.shadow.pending
    assert engine.refresh_curvature() and engine.shadow is None and engine.seed_check == measured
