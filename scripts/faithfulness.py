"""How faithful are sketched K-FAC influence scores? A study on a real LM prefix.

The bundled SmolLM2-135M is cut to its first ``--blocks`` decoder blocks (real weights; the final norm and the
tied LM head are kept, so it is a real, if weak, language model) and the linear layers of the blocks named in
``--track`` are tracked. One forward+backward per example captures each tracked layer's inputs a_t and
output-gradients e_t (the engine's `GradientCapture`, padding zeroed, loss summed over completion tokens).
Everything after that is linear algebra on the stored tokens:

- exact K-FAC factors A, E fitted on the candidates with the engine's normalisation, their full eigenbases,
  and exact scores B_λ(g, g′) = Σ_layers ⟨R_g ⊘ (γαᵀ + λ), R_g′⟩ with R = U_Eᵀ G U_A = Σ_t (U_Eᵀe_t)(U_Aᵀa_t)ᵀ
  built from rotated tokens, a few examples at a time;
- sketched scores for every (family, m_A, m_E, seed, λ) with the engine's own sketch matrices
  (`make_module_sketch`, the same seeds and module names as `Influence`), the factors Ã = P_A A P_Aᵀ,
  Ẽ = P_E E P_Eᵀ, and the engine's eigendecomposition and preconditioner;
- per configuration: ε₉₅ and Spearman correlation against exact scores at the same λ (ALGORITHMS.md §8), the
  ratio m / d_λ, and, across λ, how the exact ranking itself moves; EK-FAC and plain gradient products too.

A check at the end fits the engine itself (``sketch="none"`` and the default ``"auto"`` Gaussian sketch) on the
same candidates and compares its sizes and pairwise scores with this script's.

    python scripts/faithfulness.py                       # the full study, writes docs/faithfulness/
    python scripts/faithfulness.py --plot-only           # redraw plots and tables from the saved JSON

Data paths default to ``../shared/data`` relative to the repository root.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from hfinfluence import Influence, InfluenceConfig
from hfinfluence.capture import GradientCapture, find_tracked_modules
from hfinfluence.curvature import eigendecompose, inverse_eigenvalues, inverse_scale, precondition
from hfinfluence.data import CausalCollator, format_prompt_completion, load_dataset_any
from hfinfluence.losses import labelled_examples
from hfinfluence.models import load_model_and_tokenizer
from hfinfluence.sizing import (
    auto_damping,
    damping_for_budget,
    effective_dim,
    factor_effective_dims,
    kronecker_effective_dim,
    rule_sketch_dim,
)
from hfinfluence.sketch import make_module_sketch

DATA = "../shared/data"
FAMILIES = ("gaussian", "rademacher", "countsketch")
PEER_FACTOR = 0.1  # λ = 0.1 × mean eigenvalue of A ⊗ E: the peers' default and the engine's damping="auto"
PEER = f"kfac@{PEER_FACTOR:g}"
CHUNK = 16  # candidates per block of the exact and sketched passes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--pool", default=f"{DATA}/pool_small.jsonl", help="candidate jsonl (prompt/completion)")
    data.add_argument(
        "--targets",
        nargs="+",
        default=[f"{DATA}/targets/{name}.jsonl" for name in ("code", "gsm8k", "sciq", "sentiment")],
        help="target jsonl files; --targets-per-file rows are drawn from each",
    )
    data.add_argument("--candidates", type=int, default=200, help="candidates drawn from the pool (seeded)")
    data.add_argument("--targets-per-file", type=int, default=5)
    data.add_argument("--max-length", type=int, default=64, help="tokens per row (prompt cut on the left)")
    data.add_argument("--batch-size", type=int, default=8)
    data.add_argument("--seed", type=int, default=0, help="seed of the row samples")

    model = parser.add_argument_group("model")
    model.add_argument("--blocks", type=int, default=4, help="decoder blocks of SmolLM2-135M kept")
    model.add_argument("--track", default="1", help="comma-separated indices of the blocks whose linears are tracked")

    grid = parser.add_argument_group("grid")
    grid.add_argument("--families", default=",".join(FAMILIES))
    grid.add_argument("--sizes", default="4,8,16,32,64,128,256", help="equal-sides sketch sizes m_A = m_E")
    grid.add_argument("--seeds", type=int, default=3, help="sketch seeds 0 … seeds-1")
    grid.add_argument("--epsilons", default="0.25,0.5,1,2,4", help="ε values of the rule's sizes")
    grid.add_argument("--budgets", default="32,64,96,128,256", help="sketch_budget values (at the default ε)")
    grid.add_argument(
        "--grid-factors", default="0.01,0.1,1,10,100", help="damping factors the equal-sides grid is scored at"
    )
    grid.add_argument(
        "--damping-factors", default="0.001,0.01,0.1,1,10,100,1000", help="damping factors of the exact sweep"
    )

    run = parser.add_argument_group("run")
    run.add_argument("--output", default="docs/faithfulness", help="folder for results.json and the plots")
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--check-batches", type=int, default=2, help="candidate batches of the engine check (0: skip)")
    run.add_argument("--check-budget", type=int, default=32, help="sketch_budget of the engine check's sketched fit")
    run.add_argument("--plot-only", action="store_true", help="redraw from <output>/results.json")
    run.add_argument("--data-stats", action="store_true", help="print token counts of the sampled rows and stop")
    return parser.parse_args(argv)


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


# ---------------------------------------------------------------------------------------------- model and data


def load_prefix_model(blocks: int):
    """SmolLM2-135M with only its first ``blocks`` decoder blocks (real weights), and its tokenizer."""
    model, tokenizer = load_model_and_tokenizer()
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    return model.eval(), tokenizer


def tracked_patterns(blocks: list[int]) -> list[str]:
    return [f"model.layers.{b}.{part}.*_proj" for b in blocks for part in ("self_attn", "mlp")]


def sample_rows(path: str, count: int, seed: int) -> list[dict]:
    dataset = load_dataset_any(path)
    indices = random.Random(seed).sample(range(len(dataset)), min(count, len(dataset)))
    return [dataset[i] for i in indices]


def make_batches(rows: list[dict], tokenizer, *, max_length: int, batch_size: int) -> list[dict]:
    formatter = format_prompt_completion(tokenizer, max_length=max_length)
    formatted = [row for row in map(formatter, rows) if row["num_loss_tokens"] > 0]
    collate = CausalCollator(tokenizer)
    return [collate(formatted[i : i + batch_size]) for i in range(0, len(formatted), batch_size)]


# ---------------------------------------------------------------------------------------------- capture


@dataclass
class Captured:
    """Per tracked layer, every example's tokens: a [n, T, d_in] and e [n, T, d_out], float32, padding zero.

    ``tokens`` (attention-mask tokens) and ``valid`` (examples with a labelled token) give the engine's
    normalisers of A and E. After `rotate` the tokens are expressed in the factors' eigenbases.
    """

    a: dict[str, torch.Tensor]
    e: dict[str, torch.Tensor]
    valid: torch.Tensor
    tokens: int
    losses: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.valid.numel())

    def subset(self, rows: slice, names: list[str], tokens: int) -> Captured:
        """Views of some examples and layers (``tokens``: their attention-mask token count)."""
        a = {n: self.a[n][rows] for n in names}
        return Captured(a, {n: self.e[n][rows] for n in names}, self.valid[rows], tokens, self.losses[rows])


def summed_losses(model, batch: dict) -> torch.Tensor:
    """Per-example loss summed over labelled tokens, as `per_example_loss(..., reduction="sum")`.

    The LM head is applied only where a label is, which gives the same losses and gradients at a fraction of the
    cost of the 49k-word head on every position.
    """
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    where = labels != -100
    logits = model.lm_head(hidden[:, :-1][where])
    token_loss = F.cross_entropy(logits.float(), labels[where], reduction="none")
    return token_loss.new_zeros(labels.shape[0]).index_add(0, where.nonzero()[:, 0], token_loss)


def _store(a_store, e_store, rows: slice, info, a, e) -> None:
    width = a.shape[1]
    a_store[info.name][rows, :width] = a.float()
    e_store[info.name][rows, :width] = e.float()


def capture_tokens(model, tracked: dict, batches: list[dict], *, length: int) -> Captured:
    """One observed forward+backward per batch (`GradientCapture`: padding zeroed in a and e)."""
    n = sum(int(b["input_ids"].shape[0]) for b in batches)
    a_store = {name: torch.zeros(n, length, info.d_in) for name, info in tracked.items()}
    e_store = {name: torch.zeros(n, length, info.d_out) for name, info in tracked.items()}
    valid, losses, tokens, start = [], [], 0, 0
    for batch in batches:
        size = int(batch["input_ids"].shape[0])
        capture = GradientCapture(tracked, partial(_store, a_store, e_store, slice(start, start + size)))
        with torch.enable_grad(), capture:
            capture.set_token_mask(batch["attention_mask"])
            loss = summed_losses(model, batch)
            torch.autograd.grad(loss.sum(), capture.outputs)
        valid.append(labelled_examples(batch["labels"]))
        losses.append(loss.detach())
        tokens += int(batch["attention_mask"].sum())
        start += size
    return Captured(a_store, e_store, torch.cat(valid), tokens, torch.cat(losses))


# ---------------------------------------------------------------------------------------------- curvature


@dataclass
class Basis:
    """One layer's exact K-FAC factors in eigen-form: A = U_A diag(α) U_Aᵀ, E = U_E diag(γ) U_Eᵀ (float64)."""

    alpha: torch.Tensor
    u_a: torch.Tensor
    gamma: torch.Tensor
    u_e: torch.Tensor

    @property
    def widths(self) -> tuple[int, int]:
        return self.alpha.numel(), self.gamma.numel()

    def peer_damping(self, factor: float = PEER_FACTOR) -> float:
        d_in, d_out = self.widths
        return auto_damping(self.alpha, self.gamma, factor=factor, dim_a=d_in, dim_e=d_out)


def _covariance(tokens: torch.Tensor) -> torch.Tensor:
    flat = tokens.reshape(-1, tokens.shape[-1])
    total = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64)
    for start in range(0, flat.shape[0], 4096):
        part = flat[start : start + 4096].double()
        total += part.T @ part
    return total


def fit_bases(cap: Captured) -> dict[str, Basis]:
    """A = Σ_t a aᵀ / #tokens, E = Σ_t e eᵀ / #examples (as `FactorSums.factors`), eigendecomposed in float64."""
    examples = int(cap.valid.sum())
    bases = {}
    for name in cap.a:
        alpha, u_a = eigendecompose(_covariance(cap.a[name]) / cap.tokens, module=name, what="A")
        gamma, u_e = eigendecompose(_covariance(cap.e[name]) / examples, module=name, what="E")
        bases[name] = Basis(alpha, u_a, gamma, u_e)
    return bases


def rotate(cap: Captured, bases: dict[str, Basis], *, in_place: bool) -> Captured:
    """Tokens in the factors' eigenbases, a ← U_Aᵀ a and e ← U_Eᵀ e (float32), in place or as a copy."""
    out = cap if in_place else Captured({}, {}, cap.valid, cap.tokens, cap.losses)
    for name, basis in bases.items():
        for stores, source, vectors in ((out.a, cap.a, basis.u_a), (out.e, cap.e, basis.u_e)):
            target = source[name] if in_place else torch.empty_like(source[name])
            vectors = vectors.float()
            for start in range(0, target.shape[0], CHUNK):
                target[start : start + CHUNK] = source[name][start : start + CHUNK] @ vectors
            stores[name] = target
    return out


# ---------------------------------------------------------------------------------------------- exact scores


@dataclass
class Scored:
    """Per-layer scores [n_candidates, n_targets] and the quadratic forms gᵀWg of each candidate and target."""

    layers: dict[str, torch.Tensor]
    quad_candidates: torch.Tensor
    quad_targets: torch.Tensor

    @property
    def scores(self) -> torch.Tensor:
        return sum(self.layers.values())


def kfac_weights(bases: dict[str, Basis], dampings: dict[str, float]) -> dict[str, torch.Tensor]:
    """Per layer 1 / (γ_j α_i + λ) [d_out, d_in]; λ = 0 gives the pseudo-inverse."""
    return {name: inverse_scale(b.alpha, b.gamma, dampings[name]) for name, b in bases.items()}


def rotated_gradients(cap: Captured, name: str, rows: slice) -> torch.Tensor:
    """R_i = Σ_t (U_Eᵀe_t)(U_Aᵀa_t)ᵀ = U_Eᵀ G_i U_A for the examples ``rows``, flattened: [b, d_out·d_in], float64."""
    return torch.einsum("bte,bta->bea", cap.e[name][rows], cap.a[name][rows]).flatten(1).double()


def _groups(keys: list[str], size: int) -> list[list[str]]:
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def exact_layer(cand: Captured, targ: Captured, name: str, weights: torch.Tensor):
    """One layer's exact scores [S, n_c, n_t] for S stacked weight vectors ``weights`` [S, D], quadratic forms
    [n_c, S] and [n_t, S], and the mean of R² over valid candidates [D] (EK-FAC's corrected eigenvalues Λ).

    Candidates stream in blocks of CHUNK; weighted targets are built for a few weight sets at a time so the
    stacked matrix stays under ~0.8 GB.
    """
    n_c, n_t = cand.count, targ.count
    targets = rotated_gradients(targ, name, slice(None))
    scores = torch.zeros(weights.shape[0], n_c, n_t, dtype=torch.float64)
    quad_c = torch.zeros(n_c, weights.shape[0], dtype=torch.float64)
    total = torch.zeros(targets.shape[1], dtype=torch.float64)
    per_group = max(1, int(8e8 // (n_t * targets.shape[1] * 8)))
    for group in _groups(list(range(weights.shape[0])), per_group):
        stacked = (weights[group, None, :] * targets[None]).flatten(0, 1)
        for start in range(0, n_c, CHUNK):
            rows = slice(start, start + CHUNK)
            grads = rotated_gradients(cand, name, rows)
            part = grads @ stacked.T
            scores[group, rows] = part.reshape(grads.shape[0], len(group), n_t).transpose(0, 1)
            if group[0] == 0:
                squared = grads**2
                quad_c[rows] = squared @ weights.T
                total += squared[cand.valid[rows]].sum(0)
    return scores, quad_c, (targets**2) @ weights.T, total / int(cand.valid.sum())


def exact_scores(cand: Captured, targ: Captured, weight_sets: dict[str, dict[str, torch.Tensor]]):
    """Exact scores Σ_layers ⟨R_c ⊙ W, R_t⟩ for every weight set W, and per layer EK-FAC's Λ = mean over valid
    candidates of R² [d_out, d_in] (George et al. 2018, eq. 9, in the exact eigenbases).
    """
    keys = list(weight_sets)
    out = {key: Scored({}, 0.0, 0.0) for key in keys}
    corrected = {}
    for name in cand.a:
        weights = torch.stack([weight_sets[key][name].flatten() for key in keys])
        scores, quad_c, quad_t, mean_squares = exact_layer(cand, targ, name, weights)
        for index, key in enumerate(keys):
            out[key].layers[name] = scores[index]
            out[key].quad_candidates = out[key].quad_candidates + quad_c[:, index]
            out[key].quad_targets = out[key].quad_targets + quad_t[:, index]
        corrected[name] = mean_squares.reshape(weight_sets[keys[0]][name].shape)
    return out, corrected


# ---------------------------------------------------------------------------------------------- sketched scores


@dataclass
class LayerSketch:
    """One layer's sketch in the rotated basis: tokens map by P U (None = side left unsketched).

    ``eig_a`` / ``eig_e`` are the eigenpairs of Ã = P A Pᵀ and Ẽ; an unsketched side keeps (α, None): its
    tokens are already in the eigenbasis.
    """

    proj_a: torch.Tensor | None
    proj_e: torch.Tensor | None
    eig_a: tuple[torch.Tensor, torch.Tensor | None]
    eig_e: tuple[torch.Tensor, torch.Tensor | None]


def sketch_side(family: str, m: int | None, values, vectors, *, seed: int, name: str, side: str):
    """(P U [m, d] float32 or None, eigenpairs of P A Pᵀ) for one side; P is the engine's matrix for this layer."""
    if m is None:
        return None, (values, None)
    sketch = make_module_sketch(family, m, values.numel(), seed=seed, module_name=name, side=side, dtype=torch.float64)
    rotated = sketch @ vectors
    factor = (rotated * values) @ rotated.T
    return rotated.float(), eigendecompose(factor, module=name, what=f"sketched {side}")


def build_sketch(family: str, seed: int, name: str, basis: Basis, sizes: tuple) -> LayerSketch:
    proj_a, eig_a = sketch_side(family, sizes[0], basis.alpha, basis.u_a, seed=seed, name=name, side="A")
    proj_e, eig_e = sketch_side(family, sizes[1], basis.gamma, basis.u_e, seed=seed, name=name, side="E")
    return LayerSketch(proj_a, proj_e, eig_a, eig_e)


def sketched_gradients(cap: Captured, name: str, rows: slice, layer: LayerSketch) -> torch.Tensor:
    """S_i = Σ_t (P_E e_t)(P_A a_t)ᵀ for the examples ``rows``: [b, m_E, m_A], float64."""
    a, e = cap.a[name][rows], cap.e[name][rows]
    a = a if layer.proj_a is None else a @ layer.proj_a.T
    e = e if layer.proj_e is None else e @ layer.proj_e.T
    return torch.einsum("bte,bta->bea", e, a).double()


def apply_inverse(grads: torch.Tensor, layer: LayerSketch, damping: float) -> torch.Tensor:
    """(Ã ⊗ Ẽ + λI)⁻¹ on [b, m_E, m_A]: the engine's `precondition`, minus the rotation of an unsketched side."""
    (alpha, u_a), (gamma, u_e) = layer.eig_a, layer.eig_e
    scale = inverse_scale(alpha, gamma, damping)
    if u_a is not None and u_e is not None:
        return precondition(grads, u_a, u_e, scale)
    rotated = grads if u_e is None else u_e.T @ grads
    rotated = (rotated if u_a is None else rotated @ u_a) * scale
    rotated = rotated if u_e is None else u_e @ rotated
    return rotated if u_a is None else rotated @ u_a.T


def sketched_scores(cand, targ, bases, exact, family, seed, sizes, damping_sets: dict[str, dict[str, float]]):
    """Sketched scores [n_c, n_t] of one sketch (family, seed, per-layer sizes) at every set of per-layer λ.

    A layer left unsketched on both sides is its exact contribution, taken from ``exact``.
    """
    keys, n_c, n_t = list(damping_sets), cand.count, targ.count
    out = {key: torch.zeros(n_c, n_t, dtype=torch.float64) for key in keys}
    for name, basis in bases.items():
        if sizes[name] == (None, None):
            for key in keys:
                out[key] += exact[key].layers[name]
            continue
        layer = build_sketch(family, seed, name, basis, sizes[name])
        targets = sketched_gradients(targ, name, slice(None), layer)
        queries = torch.cat([apply_inverse(targets, layer, damping_sets[k][name]).flatten(1) for k in keys])
        for start in range(0, n_c, CHUNK):
            rows = slice(start, start + CHUNK)
            part = sketched_gradients(cand, name, rows, layer).flatten(1) @ queries.T
            for index, key in enumerate(keys):
                out[key][rows] += part[:, index * n_t : (index + 1) * n_t]
    return out


# ---------------------------------------------------------------------------------------------- sizes and λ


def layer_stats(basis: Basis, damping: float) -> dict:
    eff_a, eff_e = factor_effective_dims(basis.alpha, basis.gamma, damping)
    return {
        "d_in": basis.widths[0],
        "d_out": basis.widths[1],
        "damping": damping,
        "effective_dim_a": eff_a,
        "effective_dim_e": eff_e,
        "effective_dim": kronecker_effective_dim(basis.alpha, basis.gamma, damping),
        "rank_a": effective_dim(basis.alpha, 0.0),
        "rank_e": effective_dim(basis.gamma, 0.0),
    }


def rule_sizes(
    bases: dict[str, Basis], dampings: dict[str, float], *, epsilon: float, constant: float, delta: float
) -> dict:
    """The engine's auto sizes: ceil(c·(d + ln 1/δ)/ε²) per side; None where the width cap binds (left unsketched)."""
    sizes = {}
    for name, basis in bases.items():
        pair = []
        for effective, width in zip(
            factor_effective_dims(basis.alpha, basis.gamma, dampings[name]), basis.widths, strict=True
        ):
            m = rule_sketch_dim(effective, epsilon=epsilon, constant=constant, width=width, delta=delta)
            pair.append(None if m >= width else m)
        sizes[name] = tuple(pair)
    return sizes


def equal_sizes(bases: dict[str, Basis], m: int) -> dict:
    """Fixed ``sketch_dims=m`` as the engine builds it: min(m, width) rows per side, always a random sketch."""
    return {name: (min(m, b.widths[0]), min(m, b.widths[1])) for name, b in bases.items()}


def budget_dampings(bases, peer: dict[str, float], *, budget: int, epsilon: float, constant: float, delta: float):
    return {
        name: damping_for_budget(
            b.alpha,
            b.gamma,
            budget=budget,
            widths=b.widths,
            floor=peer[name],
            epsilon=epsilon,
            constant=constant,
            delta=delta,
        )
        for name, b in bases.items()
    }


def size_summary(bases, sizes: dict, dampings: dict[str, float]) -> dict:
    """Per-layer rows (m_A, m_E with the width for an unsketched side) and the m / d_λ ratios."""
    rows, ratios, factor_ratios = {}, [], []
    for name, basis in bases.items():
        m_a = sizes[name][0] or basis.widths[0]
        m_e = sizes[name][1] or basis.widths[1]
        stats = layer_stats(basis, dampings[name])
        ratio = m_a * m_e / stats["effective_dim"]
        factor_ratio = min(m_a / stats["effective_dim_a"], m_e / stats["effective_dim_e"])
        rows[name] = {
            **stats,
            "m_a": m_a,
            "m_e": m_e,
            "sketched_a": sizes[name][0] is not None,
            "sketched_e": sizes[name][1] is not None,
            "ratio": ratio,
            "factor_ratio": factor_ratio,
        }
        ratios.append(ratio)
        factor_ratios.append(factor_ratio)
    return {
        "layers": rows,
        "total": sum(r["m_a"] * r["m_e"] for r in rows.values()),
        "ratio_median": statistics.median(ratios),
        "factor_ratio_median": statistics.median(factor_ratios),
    }


# ---------------------------------------------------------------------------------------------- metrics


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(dim=0).argsort(dim=0).double()


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation along dim 0 (columns are separate series; scores have no ties)."""
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(0), ry - ry.mean(0)
    return (rx * ry).sum(0) / (rx.norm(dim=0) * ry.norm(dim=0))


def top_overlap(x: torch.Tensor, y: torch.Tensor, fraction: float = 0.1) -> float:
    """Mean over targets of |top-k(x) ∩ top-k(y)| / k, k = fraction of the candidates."""
    k = max(1, round(fraction * x.shape[0]))
    top_x, top_y = x.topk(k, dim=0).indices, y.topk(k, dim=0).indices
    hits = [len(set(top_x[:, j].tolist()) & set(top_y[:, j].tolist())) / k for j in range(x.shape[1])]
    return sum(hits) / len(hits)


def ranking_agreement(x: torch.Tensor, y: torch.Tensor) -> dict:
    per_target = spearman(x, y)
    return {
        "spearman_pooled": float(spearman(x.flatten(), y.flatten())),
        "spearman_per_target_mean": float(per_target.mean()),
        "spearman_per_target_min": float(per_target.min()),
        "top10_overlap": top_overlap(x, y),
    }


def faithfulness(sketched: torch.Tensor, exact: Scored, pinv: Scored) -> dict:
    """Errors of sketched scores [n_c, n_t] against exact ones at the same λ, and their rank agreement.

    - ``eps95``: 95th percentile of |B̃ − B| / √(φ₀(g) φ₀(g′)), φ₀(g) = gᵀF⁺g (ALGORITHMS.md §8);
    - ``eps95_lambda``: the same with φ_λ(g) = gᵀ(F + λI)⁻¹g, which ignores F's near-null directions;
    - ``eps95_scale``: the same with |B̃ − B| over the standard deviation of the target's exact scores.
    """
    error = (sketched - exact.scores).abs()
    phi0 = torch.outer(pinv.quad_candidates, pinv.quad_targets).clamp(min=1e-300).sqrt()
    phil = torch.outer(exact.quad_candidates, exact.quad_targets).clamp(min=1e-300).sqrt()
    spread = exact.scores.std(dim=0, keepdim=True)
    return {
        "eps95": float(torch.quantile((error / phi0).flatten(), 0.95)),
        "eps95_lambda": float(torch.quantile((error / phil).flatten(), 0.95)),
        "eps95_scale": float(torch.quantile((error / spread).flatten(), 0.95)),
        "relative_frobenius": float(error.norm() / exact.scores.norm()),
        **ranking_agreement(sketched, exact.scores),
    }


# ---------------------------------------------------------------------------------------------- the study


@dataclass
class SketchConfig:
    """One sketch to score: its sizes per layer and the damping sets (names) it is scored at."""

    kind: str  # "equal" (m_A = m_E = m), "rule" (auto sizes at ε), "budget" (auto sizes and λ under a budget)
    family: str
    seed: int
    sizes: dict
    dampings: list[str]
    m: int | None = None
    epsilon: float | None = None
    budget: int | None = None

    def label(self) -> dict:
        fields = ("kind", "family", "seed", "m", "epsilon", "budget")
        return {key: getattr(self, key) for key in fields}


def damping_sets(bases: dict[str, Basis], args) -> dict[str, dict[str, float]]:
    """Named per-layer λ: multiples of the mean eigenvalue, 0 (pseudo-inverse) and the budget-tied λ."""
    factors = sorted(set(floats(args.damping_factors)) | set(floats(args.grid_factors)) | {PEER_FACTOR})
    sets = {f"kfac@{f:g}": {n: b.peer_damping(f) for n, b in bases.items()} for f in factors}
    sets["kfac@0"] = {n: 0.0 for n in bases}
    default = InfluenceConfig()
    for budget in ints(args.budgets):
        sets[f"budget@{budget}"] = budget_dampings(
            bases,
            sets[PEER],
            budget=budget,
            epsilon=default.epsilon,
            constant=default.sizing_constant,
            delta=default.delta,
        )
        sets[f"budget@{budget},delta=1"] = budget_dampings(
            bases, sets[PEER], budget=budget, epsilon=default.epsilon, constant=default.sizing_constant, delta=1.0
        )
    return sets


def sketch_configs(bases: dict[str, Basis], sets: dict, args) -> list[SketchConfig]:
    default = InfluenceConfig()
    grid_sets = [f"kfac@{f:g}" for f in floats(args.grid_factors)]
    configs = []
    for family in args.families.split(","):
        for seed in range(args.seeds):
            for m in ints(args.sizes):
                configs.append(SketchConfig("equal", family, seed, equal_sizes(bases, m), grid_sets, m=m))
            for epsilon in floats(args.epsilons):
                sizes = rule_sizes(
                    bases, sets[PEER], epsilon=epsilon, constant=default.sizing_constant, delta=default.delta
                )
                configs.append(SketchConfig("rule", family, seed, sizes, [PEER], epsilon=epsilon))
            for budget in ints(args.budgets):
                key = f"budget@{budget}"
                sizes = rule_sizes(
                    bases, sets[key], epsilon=default.epsilon, constant=default.sizing_constant, delta=default.delta
                )
                configs.append(
                    SketchConfig("budget", family, seed, sizes, [key], epsilon=default.epsilon, budget=budget)
                )
                key = f"budget@{budget},delta=1"  # the rule without its ln 1/δ term, for comparison
                sizes = rule_sizes(
                    bases, sets[key], epsilon=default.epsilon, constant=default.sizing_constant, delta=1.0
                )
                configs.append(
                    SketchConfig("budget_delta1", family, seed, sizes, [key], epsilon=default.epsilon, budget=budget)
                )
    return configs


def run_exact(cand: Captured, targ: Captured, bases: dict[str, Basis], sets: dict) -> tuple[dict, dict]:
    """Exact K-FAC scores at every damping set, plain gradient products, and EK-FAC at its own default λ.

    EK-FAC's λ follows the engine: 0.1 × the mean corrected eigenvalue.
    """
    weights = {key: kfac_weights(bases, dampings) for key, dampings in sets.items()}
    weights["identity"] = {n: torch.ones(b.widths[1], b.widths[0], dtype=torch.float64) for n, b in bases.items()}
    exact, corrected = exact_scores(cand, targ, weights)
    ekfac_damping = {n: PEER_FACTOR * float(c.mean()) for n, c in corrected.items()}
    ekfac = {n: inverse_eigenvalues(c, ekfac_damping[n]) for n, c in corrected.items()}
    exact[f"ekfac@{PEER_FACTOR:g}"] = exact_scores(cand, targ, {"ekfac": ekfac})[0]["ekfac"]
    return exact, ekfac_damping


def compare_rankings(exact: dict[str, Scored], sets: dict, bases: dict[str, Basis]) -> dict:
    """How each damping set (and EK-FAC, plain gradients) ranks candidates relative to K-FAC at the peer λ."""
    default, reference = InfluenceConfig(), exact[PEER].scores
    rows = {}
    for key, scored in exact.items():
        row = ranking_agreement(scored.scores, reference)
        row["spearman_vs_identity"] = float(spearman(scored.scores, exact["identity"].scores).mean())
        bound = torch.outer(scored.quad_candidates, scored.quad_targets).clamp(min=1e-300).sqrt()
        row["cosine_median"] = float((scored.scores.abs() / bound).median())
        if key in sets and key != "kfac@0":
            dampings = sets[key]
            ratios = [dampings[n] / sets[PEER][n] for n in bases]
            delta = 1.0 if key.endswith(",delta=1") else default.delta
            sizes = rule_sizes(bases, dampings, epsilon=default.epsilon, constant=default.sizing_constant, delta=delta)
            summary = size_summary(bases, sizes, dampings)
            row.update(
                damping_ratio_median=statistics.median(ratios),
                damping_ratio_max=max(ratios),
                rule_total=summary["total"],
                effective_dim_median=statistics.median(r["effective_dim"] for r in summary["layers"].values()),
            )
        rows[key] = row
    phi0, phil = exact["kfac@0"].quad_candidates, exact[PEER].quad_candidates
    rows[PEER]["phi0_over_phi_lambda_median"] = float((phi0 / phil).median())
    return rows


def run_sketches(cand, targ, bases, sets, exact, configs, *, log) -> list[dict]:
    """Score every configuration; a seed > 0 is also compared with seed 0 of the same configuration."""
    records, first_seed = [], {}
    for index, config in enumerate(configs):
        started = time.perf_counter()
        chosen = {key: sets[key] for key in config.dampings}
        scores = sketched_scores(cand, targ, bases, exact, config.family, config.seed, config.sizes, chosen)
        for key, sketched in scores.items():
            summary = size_summary(bases, config.sizes, sets[key])
            records.append(
                {
                    **config.label(),
                    "damping_set": key,
                    "total": summary["total"],
                    "ratio_median": summary["ratio_median"],
                    "factor_ratio_median": summary["factor_ratio_median"],
                    **faithfulness(sketched, exact[key], exact["kfac@0"]),
                    "spearman_vs_peer": float(spearman(sketched, exact[PEER].scores).mean()),
                    "top10_vs_peer": top_overlap(sketched, exact[PEER].scores),
                    "spearman_vs_identity": float(spearman(sketched, exact["identity"].scores).mean()),
                    "norm_ratio": float(sketched.norm() / exact[key].scores.norm()),
                    **seed_agreement(first_seed, config, key, sketched),
                }
            )
        log(f"[{index + 1}/{len(configs)}] {config.label()} {time.perf_counter() - started:.1f} s")
    return records


def seed_agreement(first_seed: dict, config: SketchConfig, key: str, sketched: torch.Tensor) -> dict:
    """Two sketch seeds of one configuration: per-target Spearman and relative difference of their scores."""
    label = (*(v for k, v in config.label().items() if k != "seed"), key)
    if config.seed == 0:
        first_seed[label] = sketched
        return {}
    other = first_seed[label]
    return {
        "seed_spearman": float(spearman(sketched, other).mean()),
        "seed_relative_difference": float((sketched - other).norm() / other.norm()),
    }


def sizing_tables(bases: dict[str, Basis], sets: dict, args) -> dict:
    """Per-layer effective dimensions and auto sizes at each ε (peer λ) and each budget (default ε)."""
    default, tables = InfluenceConfig(), {}
    for epsilon in floats(args.epsilons):
        sizes = rule_sizes(bases, sets[PEER], epsilon=epsilon, constant=default.sizing_constant, delta=default.delta)
        tables[f"epsilon={epsilon:g}"] = size_summary(bases, sizes, sets[PEER])
    for budget in ints(args.budgets):
        key = f"budget@{budget}"
        sizes = rule_sizes(
            bases, sets[key], epsilon=default.epsilon, constant=default.sizing_constant, delta=default.delta
        )
        tables[f"budget={budget}"] = size_summary(bases, sizes, sets[key])
    return tables


# ---------------------------------------------------------------------------------------------- engine check


def engine_check(model, raw: tuple[Captured, Captured], batches: tuple[list, list], *, budget: int) -> dict:
    """Fit `Influence` itself on the check subset and compare with this script's computation on the same tokens.

    Two engine fits: ``sketch="none"`` (exact scores, effective dimensions) and the default auto Gaussian sketch
    with ``sketch_budget`` (sizes and λ chosen together by the engine, a real sketch on most sides).
    """
    os.environ["HFINFLUENCE_PROGRESS"] = "0"
    cand_raw, targ_raw = raw
    names = list(cand_raw.a)
    bases = fit_bases(cand_raw)
    cand, targ = rotate(cand_raw, bases, in_place=False), rotate(targ_raw, bases, in_place=False)
    peer = {n: b.peer_damping() for n, b in bases.items()}
    default = InfluenceConfig()
    dampings = budget_dampings(
        bases, peer, budget=budget, epsilon=default.epsilon, constant=default.sizing_constant, delta=default.delta
    )
    sizes = rule_sizes(bases, dampings, epsilon=default.epsilon, constant=default.sizing_constant, delta=default.delta)
    exact = exact_scores(cand, targ, {"peer": kfac_weights(bases, peer), "budget": kfac_weights(bases, dampings)})[0]
    ours = sketched_scores(cand, targ, bases, exact, "gaussian", 0, sizes, {"budget": dampings})["budget"]

    def compare(config: InfluenceConfig, reference: torch.Tensor) -> tuple[float, Influence]:
        engine = Influence(model, config).fit(batches[0])
        theirs = engine.pairwise(batches[0], batches[1]).double()
        return float((theirs - reference).abs().max() / reference.abs().max()), engine

    exact_error, engine = compare(
        InfluenceConfig(modules=names, sketch="none", sketch_budget=None), exact["peer"].scores
    )
    effective = {r.module: (r.effective_dim_a, r.effective_dim_e, r.damping) for r in engine.sizing()}
    ours_effective = {n: (*factor_effective_dims(b.alpha, b.gamma, peer[n]), peer[n]) for n, b in bases.items()}
    sketch_error, engine = compare(InfluenceConfig(modules=names, sketch_budget=budget), ours)
    chosen = {r.module: (r.sketch_dim_a, r.sketch_dim_e, r.damping) for r in engine.sizing()}
    ours_chosen = {n: (s[0] or bases[n].widths[0], s[1] or bases[n].widths[1], dampings[n]) for n, s in sizes.items()}
    return {
        "candidates": cand.count,
        "targets": targ.count,
        "layers": names,
        "sketch_budget": budget,
        "exact_max_relative_difference": exact_error,
        "sketched_max_relative_difference": sketch_error,
        "effective_dims_max_relative_difference": _max_relative(effective, ours_effective),
        "budget_sizes_equal": {n: v[:2] for n, v in chosen.items()} == {n: v[:2] for n, v in ours_chosen.items()},
        "budget_damping_max_relative_difference": _max_relative(
            {n: v[2:] for n, v in chosen.items()}, {n: v[2:] for n, v in ours_chosen.items()}
        ),
        "engine_sizing": str(engine.sizing()),
    }


def _max_relative(theirs: dict, ours: dict) -> float:
    return max(abs(t - o) / max(abs(o), 1e-300) for n in ours for t, o in zip(theirs[n], ours[n], strict=True))


# ---------------------------------------------------------------------------------------------- orchestration


def run_study(args) -> dict:
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    clock, timings = time.perf_counter(), {}

    def log(message: str) -> None:
        print(f"{time.perf_counter() - clock:7.1f} s  {message}", flush=True)

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - clock - sum(timings.values()), 1)
        log(f"{name} done")

    model, tokenizer = load_prefix_model(args.blocks)
    patterns = tracked_patterns(ints(args.track))
    tracked = find_tracked_modules(model, patterns)
    cand_rows = sample_rows(args.pool, args.candidates, args.seed)
    targ_rows = [row for path in args.targets for row in sample_rows(path, args.targets_per_file, args.seed)]
    cand_batches = make_batches(cand_rows, tokenizer, max_length=args.max_length, batch_size=args.batch_size)
    targ_batches = make_batches(targ_rows, tokenizer, max_length=args.max_length, batch_size=args.batch_size)
    lap("load")
    cand = capture_tokens(model, tracked, cand_batches, length=args.max_length)
    targ = capture_tokens(model, tracked, targ_batches, length=args.max_length)
    lap("capture")

    check = None
    if args.check_batches:
        check = run_engine_check(model, tracked, (cand, targ), (cand_batches, targ_batches), args)
        lap("engine check")

    bases = fit_bases(cand)
    rotate(cand, bases, in_place=True)
    rotate(targ, bases, in_place=True)
    sets = damping_sets(bases, args)
    lap("factors")
    exact, ekfac_damping = run_exact(cand, targ, bases, sets)
    rankings = compare_rankings(exact, sets, bases)
    lap("exact")
    records = run_sketches(cand, targ, bases, sets, exact, sketch_configs(bases, sets, args), log=log)
    lap("sketches")
    timings["total"] = round(time.perf_counter() - clock, 1)
    return {
        "meta": study_meta(args, tracked, cand, targ, cand_rows, targ_rows),
        "dampings": sets,
        "ekfac_damping": ekfac_damping,
        "sizing": sizing_tables(bases, sets, args),
        "rankings": rankings,
        "records": records,
        "engine_check": check,
        "timings": timings,
    }


def run_engine_check(model, tracked, captured: tuple[Captured, Captured], batches: tuple[list, list], args) -> dict:
    """The engine check on the first ``--check-batches`` candidate batches, one target batch, the first block."""
    block = ints(args.track)[0]
    names = [n for n in tracked if n.startswith(f"model.layers.{block}.")]
    cand_batches, targ_batches = batches[0][: args.check_batches], batches[1][:1]
    counts = [sum(len(b["input_ids"]) for b in bs) for bs in (cand_batches, targ_batches)]
    tokens = int(sum(b["attention_mask"].sum() for b in cand_batches))
    cand = captured[0].subset(slice(0, counts[0]), names, tokens)
    targ = captured[1].subset(slice(0, counts[1]), names, 0)
    return engine_check(model, (cand, targ), (cand_batches, targ_batches), budget=args.check_budget)


def study_meta(args, tracked, cand: Captured, targ: Captured, cand_rows, targ_rows) -> dict:
    sources = {}
    for row in cand_rows:
        sources[row["source"]] = sources.get(row["source"], 0) + 1
    return {
        "command": "python " + " ".join(sys.argv),
        "args": vars(args),
        "model": f"SmolLM2-135M-Instruct (bundled GGUF), first {args.blocks} decoder blocks",
        "tracked": {n: [i.d_in, i.d_out] for n, i in tracked.items()},
        "candidates": cand.count,
        "targets": targ.count,
        "target_ids": [row["id"] for row in targ_rows],
        "candidate_sources": sources,
        "fit_tokens": cand.tokens,
        "mean_candidate_loss": float(cand.losses.mean()),
        "peer_total": 64 * 64 * len(tracked),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }


# ---------------------------------------------------------------------------------------------- report


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def select(records: list[dict], **where) -> list[dict]:
    return [r for r in records if all(r.get(k) == v for k, v in where.items())]


def fitted_slope(records: list[dict], metric: str) -> tuple[float, float]:
    """Least-squares slope and intercept of log metric against log(m / d_λ) (points with a positive metric)."""
    points = [(math.log(r["ratio_median"]), math.log(r[metric])) for r in records if r[metric] > 0]
    if len(points) < 2:
        return float("nan"), float("nan")
    mx, my = statistics.mean(p[0] for p in points), statistics.mean(p[1] for p in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return slope, my - slope * mx


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def families_of(results: dict) -> list[str]:
    return list(dict.fromkeys(r["family"] for r in results["records"]))


def sizes_table(results: dict) -> str:
    layers = list(results["meta"]["tracked"])
    keys = list(results["sizing"])
    header = ["layer", "d_in × d_out"] + keys
    rows = []
    for name in layers:
        first = results["sizing"][keys[0]]["layers"][name]
        cells = [name.removeprefix("model.layers."), f"{first['d_in']} × {first['d_out']}"]
        for key in keys:
            row = results["sizing"][key]["layers"][name]
            m_a = row["m_a"] if row["sketched_a"] else f"({row['m_a']})"
            m_e = row["m_e"] if row["sketched_e"] else f"({row['m_e']})"
            cells.append(f"{m_a} × {m_e}")
        rows.append(cells)
    rows.append(
        ["**total**", f"{sum(a * b for a, b in results['meta']['tracked'].values()):,}"]
        + [f"{results['sizing'][k]['total']:,}" for k in keys]
    )
    return table(header, rows)


def effective_table(results: dict) -> str:
    key = next(k for k in results["sizing"] if k.startswith("epsilon"))  # every ε table is at the peer λ
    header = ["layer", "rank A", "rank E", "d_λ/‖E‖(A)", "d_λ/‖A‖(E)", "d_λ(A⊗E)", "λ (peer)"]
    rows = []
    for name, row in results["sizing"][key]["layers"].items():
        rows.append(
            [
                name.removeprefix("model.layers."),
                f"{row['rank_a']:.0f}",
                f"{row['rank_e']:.0f}",
                f"{row['effective_dim_a']:.1f}",
                f"{row['effective_dim_e']:.1f}",
                f"{row['effective_dim']:.1f}",
                f"{row['damping']:.3g}",
            ]
        )
    return table(header, rows)


METRICS = {
    "spearman_per_target_mean": "Spearman",
    "eps95_lambda": "ε₉₅(φ_λ)",
    "eps95_scale": "ε₉₅(spread)",
    "eps95": "ε₉₅(φ₀)",
}


def faithfulness_table(results: dict, kind: str, field: str, metrics=tuple(METRICS)[:3]) -> str:
    """Mean ± sd over seeds of the ``metrics`` per family, for one kind of config (equal sides at the peer λ)."""
    records = select(results["records"], kind=kind)
    if kind == "equal":
        records = select(records, damping_set=PEER)
    values = list(dict.fromkeys(r[field] for r in records))
    header = [field, "total m", "median m/d_λ"]
    header += [f"{family[:5]} {METRICS[m]}" for family in families_of(results) for m in metrics]
    rows = []
    for value in values:
        same = [r for r in records if r[field] == value]
        row = [value, f"{same[0]['total']:,}", f"{same[0]['ratio_median']:.3g}"]
        for family in families_of(results):
            fam = [r for r in same if r["family"] == family]
            row += [mean_sd([r[m] for r in fam]) for m in metrics]
        rows.append(row)
    return table(header, rows)


def damping_table(results: dict) -> str:
    header = ["curvature @ damping", "λ / λ_peer (median, max)", "median d_λ(A⊗E)", "rule total at ε=0.5"]
    header += ["Spearman vs peer: pooled", "per target (mean, min)", "top-10 % overlap", "Spearman vs plain gradients"]
    header += ["median abs(B) / √(φ_λ φ_λ′)"]
    rows = []
    for key, row in results["rankings"].items():
        sized = "damping_ratio_max" in row
        rows.append(
            [
                key,
                f"{row['damping_ratio_median']:.3g}, {row['damping_ratio_max']:.3g}" if sized else "-",
                f"{row['effective_dim_median']:,.0f}" if sized else "-",
                f"{row['rule_total']:,}" if sized else "-",
                f"{row['spearman_pooled']:.3f}",
                f"{row['spearman_per_target_mean']:.3f}, {row['spearman_per_target_min']:.3f}",
                f"{row['top10_overlap']:.2f}",
                f"{row['spearman_vs_identity']:.3f}",
                f"{row['cosine_median']:.2g}",
            ]
        )
    return table(header, rows)


def small_sketch_table(results: dict) -> str:
    """Equal sides at the peer λ: agreement with exact K-FAC and with plain gradient products (all families, seeds)."""
    header = ["m", "Spearman vs exact K-FAC", "Spearman vs plain gradients", "‖sketched‖ / ‖exact‖"]
    rows = []
    records = select(results["records"], kind="equal", damping_set=PEER)
    for m in dict.fromkeys(r["m"] for r in records):
        same = select(records, m=m)
        keys = ("spearman_per_target_mean", "spearman_vs_identity", "norm_ratio")
        rows.append([f"{m} × {m}"] + [f"{statistics.mean(r[k] for r in same):.3g}" for k in keys])
    return table(header, rows)


def seed_table(results: dict) -> str:
    """Whether two sketch seeds' disagreement tells how far a sketch is from exact (no exact scores needed)."""
    header = ["config", "Spearman vs exact", "Spearman seed s vs seed 0", "‖B̃_s − B̃_0‖ / ‖B̃_0‖"]
    rows = []
    for kind, field in (("equal", "m"), ("budget", "budget")):
        records = [r for r in select(results["records"], kind=kind) if "seed_spearman" in r]
        records = select(records, damping_set=PEER) if kind == "equal" else records
        for value in dict.fromkeys(r[field] for r in records):
            same = [r for r in records if r[field] == value]
            keys = ("spearman_per_target_mean", "seed_spearman", "seed_relative_difference")
            label = f"{value} × {value}, peer λ" if kind == "equal" else f"sketch_budget={value}"
            rows.append([label] + [f"{statistics.mean(r[k] for r in same):.3f}" for k in keys])
    return table(header, rows)


def end_to_end_table(results: dict) -> str:
    """Sketched scores against exact K-FAC at the peer λ: fixed m × m at the peer λ vs the budget-tied λ and m."""
    header = ["config", "total m"]
    header += [f"{f[:5]} Spearman vs own-λ exact / vs peer-λ exact" for f in families_of(results)]
    rows = []
    for kind, field in (("equal", "m"), ("budget", "budget")):
        records = select(results["records"], kind=kind)
        records = select(records, damping_set=PEER) if kind == "equal" else records
        for value in dict.fromkeys(r[field] for r in records):
            same = [r for r in records if r[field] == value]
            row = [
                f"{value} × {value}, peer λ" if kind == "equal" else f"sketch_budget={value}",
                f"{same[0]['total']:,}",
            ]
            for family in families_of(results):
                fam = [r for r in same if r["family"] == family]
                own = statistics.mean(r["spearman_per_target_mean"] for r in fam)
                peer = statistics.mean(r["spearman_vs_peer"] for r in fam)
                row.append(f"{own:.3f} / {peer:.3f}")
            rows.append(row)
    return table(header, rows)


def reference_size(results: dict, m: int = 64) -> int:
    """The equal-sides size closest to the peers' 64 among those run."""
    return min({r["m"] for r in select(results["records"], kind="equal")}, key=lambda size: abs(size - m))


def grid_damping_table(results: dict) -> str:
    """The fixed m × m sketch at each damping factor of the grid (mean over seeds)."""
    m = reference_size(results)
    header = ["damping", f"median m/d_λ (m = {m}²)"]
    header += [f"{f[:5]} Spearman own-λ / vs peer-λ exact; ε₉₅(φ_λ)" for f in families_of(results)]
    rows = []
    for key in dict.fromkeys(r["damping_set"] for r in select(results["records"], kind="equal")):
        same = select(results["records"], kind="equal", m=m, damping_set=key)
        row = [key, f"{same[0]['ratio_median']:.3g}"]
        for family in families_of(results):
            fam = [r for r in same if r["family"] == family]
            own, peer, eps = (
                statistics.mean(r[k] for r in fam)
                for k in ("spearman_per_target_mean", "spearman_vs_peer", "eps95_lambda")
            )
            row.append(f"{own:.3f} / {peer:.3f}; {eps:.3f}")
        rows.append(row)
    return table(header, rows)


def slopes_table(results: dict) -> str:
    metrics = ("eps95", "eps95_lambda", "eps95_scale", "one_minus_rho")
    header = ["family", "λ of the points"] + [f"slope of log {m}" for m in metrics]
    rows = []
    for family in families_of(results):
        records = select(results["records"], kind="equal", family=family)
        for r in records:
            r["one_minus_rho"] = 1 - r["spearman_per_target_mean"]
        for label, points in (("peer", select(records, damping_set=PEER)), ("all of the grid", records)):
            rows.append([family, label] + [f"{fitted_slope(points, m)[0]:.2f}" for m in metrics])
    return table(header, rows)


def write_tables(results: dict, folder: Path) -> str:
    parts = [
        "## Effective dimensions at the peer λ\n\n" + effective_table(results),
        "## Auto sizes (m_A × m_E; parentheses = side left unsketched)\n\n" + sizes_table(results),
        "## Rule sizes at several ε (peer λ)\n\n" + faithfulness_table(results, "rule", "epsilon"),
        "## Rule sizes under a sketch budget (ε = 0.5, λ raised)\n\n"
        + faithfulness_table(results, "budget", "budget"),
        "## The same without the rule's ln 1/δ term (δ = 1)\n\n"
        + faithfulness_table(results, "budget_delta1", "budget"),
        "## Equal sides m × m (peer λ)\n\n" + faithfulness_table(results, "equal", "m"),
        "## ε₉₅ with the φ₀ = gᵀF⁺g normaliser (equal sides, peer λ)\n\n"
        + faithfulness_table(results, "equal", "m", metrics=("eps95",)),
        "## The fixed m × m sketch nearest the peers' 64 × 64, at several λ\n\n" + grid_damping_table(results),
        "## Exact rankings at other λ, EK-FAC and plain gradients vs K-FAC at the peer λ\n\n" + damping_table(results),
        "## What a user gets: sketched scores vs exact K-FAC at the peer λ\n\n" + end_to_end_table(results),
        "## What small sketches approximate (equal sides, peer λ)\n\n" + small_sketch_table(results),
        "## Two sketch seeds against each other (mean over families and seeds 1, 2 vs 0)\n\n" + seed_table(results),
        "## Fitted log-log slopes against m / d_λ (equal sides; theory: -0.5 for ε₉₅)\n\n" + slopes_table(results),
    ]
    if results.get("engine_check"):
        check = {k: v for k, v in results["engine_check"].items() if k != "engine_sizing"}
        parts.append(
            "## Engine check\n\n```\n"
            + json.dumps(check, indent=2)
            + "\n"
            + results["engine_check"]["engine_sizing"]
            + "\n```\n"
        )
    parts.append("## Timings (s)\n\n```\n" + json.dumps(results["timings"]) + "\n```\n")
    text = "\n".join(parts)
    (folder / "tables.md").write_text(text)
    return text


# ---------------------------------------------------------------------------------------------- plots

GRID_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def _annotate(ax, points: list[dict], metric: str, field: str, prefix: str) -> None:
    """Label seed-0 points; points that coincide (e.g. several ε leaving every layer unsketched) share a label."""
    spots: dict[tuple, list[str]] = {}
    for r in select(points, seed=0):
        spots.setdefault((r["ratio_median"], r[metric]), []).append(f"{r[field]:g}")
    for (x, y), values in spots.items():
        ax.annotate(f"{prefix}={', '.join(values)}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)


def _scatter_family(ax, results: dict, family: str, metric: str) -> None:
    records = select(results["records"], family=family)
    grid_sets = list(dict.fromkeys(r["damping_set"] for r in select(records, kind="equal")))
    sizes = "m = " + " … ".join(str(f(r["m"] for r in select(records, kind="equal"))) for f in (min, max))
    for colour, key in zip(GRID_COLOURS, grid_sets, strict=False):
        points = select(records, kind="equal", damping_set=key)
        xs, ys = [r["ratio_median"] for r in points], [r[metric] for r in points]
        ax.scatter(xs, ys, s=12, alpha=0.6, color=colour, label=f"m × m ({sizes}), λ = {key[5:]} × mean eig.")
    for kind, marker, field, colour in (("rule", "*", "epsilon", "black"), ("budget", "D", "budget", "tab:brown")):
        points = select(records, kind=kind)
        if not points:
            continue
        label = "auto sizes at ε (peer λ)" if kind == "rule" else "auto at ε = 0.5 with sketch_budget B (λ raised)"
        xs, ys = [r["ratio_median"] for r in points], [r[metric] for r in points]
        ax.scatter(xs, ys, s=60 if kind == "rule" else 30, marker=marker, color=colour, label=label, zorder=3)
        _annotate(ax, points, metric, field, "ε" if kind == "rule" else "B")
    ax.set_xscale("log")
    ax.set_title(family)
    ax.set_xlabel("m / d_λ  (per layer m_A·m_E / d_λ(A⊗E), median over layers)")
    ax.grid(True, which="both", alpha=0.3)


def _theory_line(ax, results: dict, power: float = 0.5) -> None:
    """The theory's rate (d_λ / m)^power with constant 1 over the plotted range of m / d_λ."""
    xs = [r["ratio_median"] for r in results["records"]]
    grid = [min(xs), max(xs)]
    ax.plot(grid, [x**-power for x in grid], "k--", lw=1, label="√(d_λ / m): the theory's rate, constant 1")


def _finish(fig, axes, title: str, path: Path, plt) -> None:
    handles, labels = axes[0][0].get_legend_handles_labels()
    extra = [(h, lab) for ax in axes[-1] for h, lab in zip(*ax.get_legend_handles_labels(), strict=True)]
    for handle, label in extra:
        if label not in labels:
            handles.append(handle)
            labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_eps(results: dict, folder: Path, plt) -> None:
    families = families_of(results)
    fig, axes = plt.subplots(2, len(families), figsize=(5.2 * len(families), 9.5), squeeze=False)
    for column, family in enumerate(families):
        for row, (metric, name) in enumerate(
            (("eps95", "ε₉₅ (φ₀ = gᵀF⁺g)"), ("eps95_lambda", "ε₉₅ (φ_λ = gᵀ(F+λI)⁻¹g)"))
        ):
            ax = axes[row][column]
            _scatter_family(ax, results, family, metric)
            _theory_line(ax, results)
            ax.set_yscale("log")
            ax.set_ylabel(name)
    title = "Sketched vs exact K-FAC scores: 95th-percentile error normalised by √φ(g)√φ(g′)"
    _finish(fig, axes, title, folder / "eps95.png", plt)


def full_size(results: dict) -> int:
    return sum(a * b for a, b in results["meta"]["tracked"].values())


def plot_spearman(results: dict, folder: Path, plt) -> None:
    families = families_of(results)
    for r in results["records"]:
        r["one_minus_rho"] = max(1 - r["spearman_per_target_mean"], 1e-6)
    sketched = {**results, "records": [r for r in results["records"] if r["total"] < full_size(results)]}
    fig, axes = plt.subplots(2, len(families), figsize=(5.2 * len(families), 9.5), squeeze=False)
    for column, family in enumerate(families):
        ax = axes[0][column]
        _scatter_family(ax, results, family, "spearman_per_target_mean")
        ax.axhline(0.95, color="red", lw=1, ls=":", label="Spearman 0.95")
        ax.set_ylabel("Spearman vs exact at the same λ (mean over targets)")
        ax.set_ylim(max(0.0, ax.get_ylim()[0]), 1.02)
        ax = axes[1][column]
        _scatter_family(ax, sketched, family, "one_minus_rho")
        _theory_line(ax, sketched)
        ax.axhline(0.05, color="red", lw=1, ls=":")
        ax.set_yscale("log")
        ax.set_ylabel("1 − Spearman (sketches of every layer only)")
    _finish(
        fig,
        axes,
        "Rank agreement of sketched with exact K-FAC scores (candidates ranked per target)",
        folder / "spearman.png",
        plt,
    )


def plot_sizes(results: dict, folder: Path, plt) -> None:
    layers = list(results["meta"]["tracked"])
    keys = [k for k in results["sizing"] if k.startswith("epsilon")]
    budget_keys = [k for k in results["sizing"] if k.startswith("budget")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    xs = range(len(layers))
    for key in keys:
        left.plot(
            xs,
            [results["sizing"][key]["layers"][n]["m_a"] * results["sizing"][key]["layers"][n]["m_e"] for n in layers],
            marker="o",
            label=f"auto, {key.replace('epsilon', 'ε')}",
        )
    left.plot(xs, [a * b for a, b in results["meta"]["tracked"].values()], "k-", lw=2, label="full d_in·d_out")
    left.axhline(64 * 64, color="red", ls=":", label="64 × 64 (peers)")
    left.set_xticks(list(xs), [n.removeprefix("model.layers.") for n in layers], rotation=60, fontsize=7)
    left.set_yscale("log")
    left.set_ylabel("sketched gradient size m_A·m_E")
    full = [k.split("=")[1] for k in keys if results["sizing"][k]["total"] == full_size(results)]
    left.set_title(f"Per-layer auto sizes (peer λ; ε = {', '.join(full)} leave every layer unsketched)")
    left.legend(fontsize=7)
    right.plot(
        [float(k.split("=")[1]) for k in keys],
        [results["sizing"][k]["total"] for k in keys],
        "o-",
        label="auto at ε (peer λ)",
    )
    right.axhline(results["meta"]["peer_total"], color="red", ls=":", label="64 × 64 per layer")
    right.axhline(sum(a * b for a, b in results["meta"]["tracked"].values()), color="k", label="no sketch")
    for key in budget_keys:
        right.scatter([InfluenceConfig.epsilon], [results["sizing"][key]["total"]], marker="D", color="tab:brown")
        right.annotate(
            key.replace("budget=", "B="),
            (InfluenceConfig.epsilon, results["sizing"][key]["total"]),
            textcoords="offset points",
            xytext=(5, -3),
            fontsize=7,
        )
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("ε")
    right.set_ylabel("total Σ m_A·m_E over tracked layers")
    right.set_title("Total sketch size (diamonds: sketch_budget B at ε = 0.5, λ raised)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "auto_sizes.png", dpi=110)
    plt.close(fig)


def plot_damping(results: dict, folder: Path, plt) -> None:
    rankings = results["rankings"]
    factors = sorted((float(k.split("@")[1]), k) for k in rankings if k.startswith("kfac@") and k != "kfac@0")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for metric, label in (
        ("spearman_per_target_mean", "Spearman, mean over targets"),
        ("top10_overlap", "top-10 % overlap"),
    ):
        left.plot([f for f, _ in factors], [rankings[k][metric] for _, k in factors], "o-", label=label)
    for key in (k for k in rankings if k.startswith("budget@")):
        ratio = rankings[key]["damping_ratio_median"] * PEER_FACTOR
        left.scatter([ratio], [rankings[key]["spearman_per_target_mean"]], marker="D", color="tab:brown")
        left.annotate(
            key.replace("budget@", "B="),
            (ratio, rankings[key]["spearman_per_target_mean"]),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=7,
        )
    for key, colour in (("identity", "grey"), (f"ekfac@{PEER_FACTOR:g}", "tab:green")):
        if key in rankings:
            value = rankings[key]["spearman_per_target_mean"]
            left.axhline(value, color=colour, ls="--", lw=1, label=f"{key} (Spearman {value:.2f})")
    left.set_xscale("log")
    left.set_xlabel("damping factor (λ / mean eigenvalue of A⊗E; budgets at their median)")
    left.set_title("Exact K-FAC at λ vs exact K-FAC at 0.1 × mean eigenvalue")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    for family in families_of(results):
        points = select(results["records"], kind="equal", m=reference_size(results), family=family)
        keys = sorted({r["damping_set"] for r in points}, key=lambda k: float(k.split("@")[1]))
        xs = [float(k.split("@")[1]) for k in keys]
        ys = [statistics.mean(r["spearman_per_target_mean"] for r in points if r["damping_set"] == k) for k in keys]
        right.plot(xs, ys, "o-", label=family)
    right.set_xscale("log")
    right.set_xlabel("damping factor")
    right.set_ylabel("Spearman with exact at the same λ")
    right.set_title(f"{reference_size(results)}² sketch vs exact at the same λ (mean over seeds)")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "damping.png", dpi=110)
    plt.close(fig)


def plot_all(results: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for plot in (plot_eps, plot_spearman, plot_sizes, plot_damping):
        plot(results, folder, plt)


def data_stats(args) -> None:
    """Tokens, completion (loss) tokens and left-truncated rows of the sampled candidates and targets."""
    _, tokenizer = load_model_and_tokenizer()
    formatter = format_prompt_completion(tokenizer, max_length=args.max_length)
    targets = [row for path in args.targets for row in sample_rows(path, args.targets_per_file, args.seed)]
    for name, rows in (("candidates", sample_rows(args.pool, args.candidates, args.seed)), ("targets", targets)):
        formatted = [formatter(row) for row in rows]
        tokens = statistics.mean(len(f["input_ids"]) for f in formatted)
        labelled = statistics.mean(f["num_loss_tokens"] for f in formatted)
        truncated = sum(f["truncated"] for f in formatted)
        print(
            f"{name}: {len(rows)} rows, {tokens:.1f} tokens and {labelled:.1f} completion tokens per row, "
            f"{truncated} truncated to {args.max_length}"
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.data_stats:
        data_stats(args)
        return
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        results = json.loads((folder / "results.json").read_text())
    else:
        results = run_study(args)
        (folder / "results.json").write_text(json.dumps(results, indent=1))
    plot_all(results, folder)
    print(write_tables(results, folder))


if __name__ == "__main__":
    main()
