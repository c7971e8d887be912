"""Scores against brute-force Kronecker maths, the exactness theorem, invariances, sizing, persistence."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ATOL, RTOL, build_llama, make_batch, split_batch
from test_capture import reference_gradients

from hfinfluence import ConfigMismatchError, Influence, InfluenceConfig
from hfinfluence.sketch import make_module_sketch

FIT = make_batch(16, 14, seed=10)
TARGET = make_batch(5, 12, seed=20)
CANDIDATES = make_batch(6, 12, seed=30)


def reference_factors(model, batch, tracked):
    """A = token mean of a aᵀ, E = per-example mean of Σ_t e eᵀ, from plain hooks and retain_grad."""
    inputs, outputs, handles = {}, {}, []
    for name, info in tracked.items():

        def hook(module, args, output, name=name):
            inputs[name] = args[0]
            output.retain_grad()
            outputs[name] = output

        handles.append(info.module.register_forward_hook(hook))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    loss.backward()
    for handle in handles:
        handle.remove()
    real = batch["attention_mask"].bool()
    examples = (batch["labels"][:, 1:] != -100).any(1).sum()
    factors = {}
    for name in tracked:
        a, e = inputs[name].detach()[real], outputs[name].grad[real]
        factors[name] = (a.T @ a / real.sum(), e.T @ e / examples)
    model.zero_grad(set_to_none=True)
    return factors


def brute_force_scores(model, tracked, damping):
    factors = reference_factors(model, FIT, tracked)
    target = {n: g.mean(0) for n, g in reference_gradients(model, TARGET, tracked).items()}
    candidates = reference_gradients(model, CANDIDATES, tracked)
    scores = torch.zeros(CANDIDATES["input_ids"].shape[0], dtype=torch.float64)
    for name, (a, e) in factors.items():
        curvature = torch.kron(a, e) + damping * torch.eye(a.shape[0] * e.shape[0], dtype=torch.float64)
        vec_target = target[name].T.reshape(-1)  # column-stacking vec, matching kron(A, E)
        vec_candidates = candidates[name].transpose(1, 2).reshape(len(scores), -1)
        scores += vec_candidates @ torch.linalg.solve(curvature, vec_target)
    return scores


def fitted(model, **config):
    engine = Influence(model, InfluenceConfig(**config))
    engine.fit(split_batch(FIT, 4)).set_target(split_batch(TARGET, 2))
    return engine


def test_exact_scores_equal_brute_force_kronecker(llama):
    engine = fitted(llama, sketch="none", damping=1e-3)
    torch.testing.assert_close(
        engine.score(CANDIDATES), brute_force_scores(llama, engine.tracked, 1e-3), rtol=1e-6, atol=1e-8
    )


def test_auto_damping_is_a_tenth_of_the_mean_kronecker_eigenvalue(llama):
    engine = fitted(llama, sketch="none")
    factors = reference_factors(llama, FIT, engine.tracked)
    for row in engine.sizing():
        a, e = factors[row.module]
        mean_eigenvalue = torch.linalg.eigvalsh(torch.kron(a, e)).mean()
        assert row.damping == pytest.approx(0.1 * float(mean_eigenvalue), rel=1e-8)


def test_square_sketches_are_exact_without_damping(llama):
    exact = fitted(llama, sketch="none", damping=0.0).score(CANDIDATES)
    for family in ("gaussian", "rademacher"):
        square = fitted(llama, sketch=family, sketch_dims=(24, 24), damping=0.0)  # capped: square everywhere
        assert all(lay.sketch_a is not None for lay in square.layers.values())  # really sketched
        torch.testing.assert_close(square.score(CANDIDATES), exact, rtol=1e-5, atol=1e-6)
    small = fitted(llama, sketch="gaussian", sketch_dims=(3, 3), damping=0.0).score(CANDIDATES)
    assert (small - exact).abs().max() > 1e-2 * exact.abs().max()


def test_scores_do_not_depend_on_batch_size_or_padding(llama):
    engine = fitted(llama, sketch="gaussian", sketch_dims=(6, 8))
    whole = engine.score(CANDIDATES)
    singles = torch.cat([engine.score(b) for b in split_batch(CANDIDATES, 1)])
    padded = engine.score(make_batch(6, 12, seed=30, pad_to=25))
    torch.testing.assert_close(singles, whole, rtol=RTOL, atol=ATOL)
    # the tiny Llama's own logits move by ~2e-8 when 13 pad columns are appended (attention kernels pick
    # other reduction orders), so padding is checked at that model-level noise, not at float64 round-off
    torch.testing.assert_close(padded, whole, rtol=1e-5, atol=1e-6)


def test_self_scores_are_the_diagonal_of_pairwise(llama):
    engine = fitted(llama, sketch="gaussian", sketch_dims=(6, 8))
    matrix = engine.pairwise(split_batch(CANDIDATES, 4), split_batch(CANDIDATES, 5))
    assert matrix.shape == (6, 6)
    torch.testing.assert_close(matrix, matrix.T, rtol=1e-6, atol=1e-8)
    # the target direction is the mean target gradient, so scoring equals averaging pairwise columns
    against_target = engine.pairwise([CANDIDATES], split_batch(TARGET, 2)).mean(dim=1)
    torch.testing.assert_close(against_target, engine.score(CANDIDATES), rtol=1e-6, atol=1e-8)


def test_sizing_effective_dims_equal_brute_force_eigenvalues(llama):
    engine = fitted(llama, sketch="none")
    factors = reference_factors(llama, FIT, engine.tracked)
    for row in engine.sizing():
        a, e = factors[row.module]
        lam = row.damping
        sigma = torch.linalg.eigvalsh(torch.kron(a, e)).clamp(min=0)
        assert row.effective_dim == pytest.approx(float((sigma / (sigma + lam)).sum()), rel=1e-6)
        alpha, gamma = torch.linalg.eigvalsh(a).clamp(min=0), torch.linalg.eigvalsh(e).clamp(min=0)
        d_a = float((alpha / (alpha + lam / gamma.max())).sum())
        d_e = float((gamma / (gamma + lam / alpha.max())).sum())
        assert (row.effective_dim_a, row.effective_dim_e) == (
            pytest.approx(d_a, rel=1e-6),
            pytest.approx(d_e, rel=1e-6),
        )


def test_auto_sizes_follow_the_rule_and_shrink_with_epsilon():
    model = build_llama(hidden=32, intermediate=48)
    loose = fitted(model, epsilon=4.0, damping_factor=1.0).sizing()
    tight = fitted(model, epsilon=1.0, damping_factor=1.0).sizing()
    for lo, hi in zip(loose, tight, strict=True):
        log_term = math.log(1 / InfluenceConfig.delta)  # the rule's ln 1/δ, at the default δ
        expected = min(lo.d_in, max(1, math.ceil(2.0 * (lo.effective_dim_a + log_term) / 16.0)))
        assert lo.sketch_dim_a == expected
        assert lo.sketch_dim_a <= hi.sketch_dim_a and lo.sketch_dim_e <= hi.sketch_dim_e
    assert sum(r.sketch_dim_a * r.sketch_dim_e for r in loose) < sum(r.d_in * r.d_out for r in loose)


def test_sketch_is_identical_in_another_process():
    here = make_module_sketch("rademacher", 5, 9, seed=7, module_name="model.layers.0.mlp.up_proj", side="A")
    code = (
        "from hfinfluence.sketch import make_module_sketch;"
        "p = make_module_sketch('rademacher', 5, 9, seed=7, module_name='model.layers.0.mlp.up_proj', side='A');"
        "print(repr(p.flatten().tolist()))"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert torch.tensor(eval(there)).view(5, 9).equal(here)
    other = make_module_sketch("rademacher", 5, 9, seed=7, module_name="model.layers.1.mlp.up_proj", side="A")
    assert not other.equal(here)


@pytest.mark.parametrize("family", ["gaussian", "rademacher", "countsketch"])
def test_sketches_are_normalised(family):
    total = (
        sum(
            make_module_sketch(family, 8, 6, seed=s, module_name="m", side="A", dtype=torch.float64).T
            @ make_module_sketch(family, 8, 6, seed=s, module_name="m", side="A", dtype=torch.float64)
            for s in range(3000)
        )
        / 3000
    )
    torch.testing.assert_close(total, torch.eye(6, dtype=torch.float64), rtol=0, atol=0.06)


def test_save_load_round_trip_and_refusal(llama, tmp_path):
    engine = fitted(llama, sketch="countsketch", sketch_dims=(5, 5))
    engine.save(tmp_path / "state")
    restored = Influence(llama, InfluenceConfig(sketch="countsketch", sketch_dims=(5, 5))).load(tmp_path / "state")
    assert list(restored.layers) == list(engine.layers) == list(engine.tracked)  # model order, not file order
    torch.testing.assert_close(restored.score(CANDIDATES), engine.score(CANDIDATES), rtol=RTOL, atol=ATOL)
    with pytest.raises(ConfigMismatchError, match="saved:.*\n.*current:"):
        Influence(llama, InfluenceConfig(sketch="countsketch", sketch_dims=(6, 5))).load(tmp_path / "state")


def test_observed_training_pass_scores_and_refits_like_the_engine(llama):
    from hfinfluence.losses import per_example_loss

    engine = fitted(llama, sketch="gaussian", sketch_dims=(6, 8))
    expected = engine.score(CANDIDATES)
    with engine.observe(CANDIDATES["attention_mask"], CANDIDATES["labels"], accumulate_curvature=True) as obs:
        logits = llama(input_ids=CANDIDATES["input_ids"], attention_mask=CANDIDATES["attention_mask"]).logits
        losses = per_example_loss(logits, CANDIDATES["labels"])
        torch.autograd.grad(losses.sum(), obs.outputs, retain_graph=True)
    torch.testing.assert_close(obs.scores, expected, rtol=RTOL, atol=ATOL)
    (0.5 * losses.sum()).backward()  # a later training backward is not observed
    torch.testing.assert_close(obs.scores, expected, rtol=RTOL, atol=ATOL)

    reference = Influence(llama, InfluenceConfig(sketch="gaussian", sketch_dims=(6, 8)))
    reference.fit(split_batch(FIT, 4))
    reference.fit([CANDIDATES])  # a refit reuses the sketches and sees only the new data
    assert engine.refresh_curvature() and not engine.refresh_curvature()
    for name, curv in engine.curvature.items():
        torch.testing.assert_close(curv.gradient_covariance, reference.curvature[name].gradient_covariance)


def test_two_processes_fit_on_shards_like_one_process_on_all(llama, tmp_path):
    script = Path(__file__).with_name("dist_engine.py")
    torchrun = Path(sys.executable).with_name("torchrun")
    with socket.socket() as probe:  # a free loopback port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parent)}
    command = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", port]
    subprocess.run([*command, str(script), str(tmp_path / "dist.pt")], check=True, env=env, timeout=300)

    result = torch.load(tmp_path / "dist.pt")
    assert result["world"] == 2
    single = Influence(llama, InfluenceConfig(sketch="gaussian", sketch_dims=(6, 8)))
    single.fit([FIT]).set_target([TARGET])
    for name, factor in result["factors"].items():
        torch.testing.assert_close(factor, single.curvature[name].gradient_covariance, rtol=1e-10, atol=1e-12)
    expected = single.score(CANDIDATES)
    for scores in result["scores"]:  # both ranks score identically with the global curvature and target
        torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-10)


def test_ekfac_equals_explicit_eigenvalue_correction(llama, tmp_path):
    damping = 1e-3
    engine = fitted(llama, sketch="none", curvature="ekfac", damping=damping)
    factors = reference_factors(llama, FIT, engine.tracked)
    train = reference_gradients(llama, FIT, engine.tracked)
    target = {n: g.mean(0) for n, g in reference_gradients(llama, TARGET, engine.tracked).items()}
    candidates = reference_gradients(llama, CANDIDATES, engine.tracked)
    expected = torch.zeros(CANDIDATES["input_ids"].shape[0], dtype=torch.float64)
    for name, (a, e) in factors.items():
        # explicit: eigenbasis Q = U_A ⊗ U_E of the K-FAC factors, diagonal refitted to E_i[(Qᵀ vec G_i)²]
        basis = torch.kron(torch.linalg.eigh(a).eigenvectors, torch.linalg.eigh(e).eigenvectors)
        coords = train[name].transpose(1, 2).reshape(len(train[name]), -1) @ basis
        curvature = basis @ torch.diag((coords**2).mean(0)) @ basis.T + damping * torch.eye(len(basis))
        vec_target = target[name].T.reshape(-1)
        vec_candidates = candidates[name].transpose(1, 2).reshape(len(expected), -1)
        expected += vec_candidates @ torch.linalg.solve(curvature, vec_target)
    torch.testing.assert_close(engine.score(CANDIDATES), expected, rtol=1e-6, atol=1e-8)
    kfac = fitted(llama, sketch="none", curvature="kfac", damping=damping).score(CANDIDATES)
    assert (kfac - expected).abs().max() > 1e-3 * expected.abs().max()  # the correction changes the scores

    engine.save(tmp_path / "ekfac")
    config = InfluenceConfig(sketch="none", curvature="ekfac", damping=damping)
    restored = Influence(llama, config).load(tmp_path / "ekfac")
    torch.testing.assert_close(restored.score(CANDIDATES), expected, rtol=1e-6, atol=1e-8)
