"""The memory plan matches the tensors the engine really holds."""

from __future__ import annotations

from test_influence import FIT, split_batch

from hfinfluence import Influence, InfluenceConfig


def test_memory_plan_before_and_after_fit(llama):
    engine = Influence(llama, InfluenceConfig(sketch_dims=(4, 5)))
    before = engine.memory_plan(batch_size=4, tokens=14, queries=3)
    assert before.sizes_known
    engine.fit(split_batch(FIT, 4))
    after = engine.memory_plan(batch_size=4, tokens=14, queries=3)
    kept = [*engine.curvature.values(), *engine.shadow.curvature.values()]  # the seed check's twin too
    held = sum(c.eigvecs_a.numel() + c.eigvecs_e.numel() for c in kept) * 8
    held += sum(c.scale.numel() for c in kept) * 8
    held += sum(c.activation_covariance.numel() + c.gradient_covariance.numel() for c in kept) * 8
    assert after.eigenbases == held
    widths = sum(i.d_in**2 + i.d_out**2 for i in engine.tracked.values())
    assert after.first_fit_factors == widths * 8  # float64 model: exact factors in float64
    assert after.per_example_gradients == len(engine.tracked) * 20 * (3 + 4) * 8
    assert "score block" in str(after)

    auto = Influence(llama, InfluenceConfig()).memory_plan()
    assert not auto.sizes_known and "upper bounds" in str(auto)
