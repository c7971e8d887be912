"""Turn scores into a selection (indices) or into per-example loss weights.

Pure tensor functions: scores in, indices or weights out. Scores are standardised (z-scores) before any
temperature is applied, so ``tau`` is in units of the scores' standard deviation whatever the scale of
the raw influence values.
"""

from __future__ import annotations

import torch

from .errors import ConfigError


def keep_count(n: int, keep_ratio: float) -> int:
    """How many of ``n`` to keep at ``keep_ratio`` ∈ (0, 1]: round(n · ratio), at least 1."""
    if not 0 < keep_ratio <= 1:
        raise ConfigError(f"`keep_ratio` must be in (0, 1], got {keep_ratio!r}.")
    return max(1, min(n, round(n * keep_ratio)))


def standardise(scores: torch.Tensor) -> torch.Tensor:
    """(s − mean) / std in float64; all zeros when the scores are constant."""
    scores = scores.to(torch.float64)
    std = scores.std(unbiased=False) if scores.numel() > 1 else scores.new_zeros(())
    centred = scores - scores.mean()
    return centred / std if std > 0 else torch.zeros_like(centred)


def select_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [k] of the k highest scores, highest first; ties go to the lower index."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(order[:k], dtype=torch.long)


def select_boltzmann(scores: torch.Tensor, k: int, *, tau: float, generator: torch.Generator) -> torch.Tensor:
    """Draw k indices without replacement with p_i ∝ exp(z_i / τ), z the standardised scores.

    Uses the Gumbel-top-k identity: the k largest of z_i/τ + Gumbel noise are a draw without replacement
    from the successive softmax distributions (OPUS's Boltzmann selection, arXiv 2602.05400 §3).
    """
    if not tau > 0:
        raise ConfigError(f"`tau` must be > 0, got {tau!r}.")
    uniform = torch.rand(scores.numel(), generator=generator, dtype=torch.float64).clamp(1e-300, 1.0)
    keys = standardise(scores) / tau - torch.log(-torch.log(uniform))
    return select_top_k(keys, k)


def select_min_score(scores: torch.Tensor, min_score: float) -> torch.Tensor:
    """Indices of every score ≥ ``min_score``, highest first."""
    chosen = select_top_k(scores, scores.numel())
    return chosen[scores[chosen] >= min_score]


def select_with_quotas(scores: torch.Tensor, groups: list, keep_ratio: float, *, select=select_top_k) -> torch.Tensor:
    """Keep ``keep_ratio`` of every group separately (``select(scores, k)`` within each), highest first overall."""
    chosen = []
    for group in dict.fromkeys(groups):
        members = torch.tensor([i for i, g in enumerate(groups) if g == group], dtype=torch.long)
        picked = select(scores[members], keep_count(len(members), keep_ratio))
        chosen.append(members[picked])
    merged = torch.cat(chosen)
    return merged[select_top_k(scores[merged], merged.numel())]


def reweight(scores: torch.Tensor, *, tau: float) -> torch.Tensor:
    """Non-negative per-example loss weights with mean 1: w_i = n · softmax(z / τ)_i.

    Large τ gives uniform weights (plain training); small τ puts the weight on the top-scored examples.
    """
    if not tau > 0:
        raise ConfigError(f"`tau` must be > 0, got {tau!r}.")
    logits = standardise(scores) / tau
    return torch.softmax(logits, dim=0) * scores.numel()


def selection_mask(n: int, indices: torch.Tensor) -> torch.Tensor:
    """[n] float mask, 1 at ``indices``."""
    mask = torch.zeros(n, dtype=torch.float64)
    mask[indices] = 1.0
    return mask
