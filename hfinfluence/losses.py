"""Per-example causal-LM losses from logits, with -100 labels ignored."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """Next-token cross-entropy per example.

    ``logits`` [batch, tokens, vocab] and ``labels`` [batch, tokens] (unshifted, -100 = no loss) give a
    [batch] tensor: the sum (or mean) of the token losses of each example; 0 for an example with no
    labelled token.
    """
    shifted_logits = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    shifted_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shifted_labels.shape)
    total = token_loss.sum(dim=1)
    if reduction == "mean":
        total = total / (shifted_labels != -100).sum(dim=1).clamp(min=1)
    return total


def labelled_examples(labels: torch.Tensor) -> torch.Tensor:
    """[batch] bool: the example has at least one token that carries loss (after the causal shift)."""
    return (labels[:, 1:] != -100).any(dim=1)
