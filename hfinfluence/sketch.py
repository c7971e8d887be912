"""Random sketch families and their deterministic seeding.

Every sketch P (m × d) is normalised so that E[PᵀP] = I, which keeps a ridge λ added in the sketched
space on the same scale as in the full space (Hu et al., arXiv 2602.10449, §3):

- ``gaussian``: entries N(0, 1/m);
- ``rademacher``: entries ±1/√m;
- ``countsketch``: one ±1 per column in a uniformly random row (the sparse JL transform with one
  non-zero per column).

A layer's pair (P_A, P_E) is derived from (seed, module name, side) alone, so every process and every
later run rebuilds the same matrices without communication.
"""

from __future__ import annotations

import hashlib

import torch

from .errors import ConfigError


def sketch_seed(seed: int, module_name: str, side: str) -> int:
    """A 63-bit seed for one side (``"A"``, ``"E"`` or ``"pilot-A"`` …) of one module."""
    digest = hashlib.sha256(f"{seed}|{module_name}|{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_sketch(family: str, m: int, d: int, *, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Build one dense sketch matrix of shape [m, d] on the CPU from an explicit seed."""
    generator = torch.Generator().manual_seed(seed)
    if family == "gaussian":
        matrix = torch.randn(m, d, generator=generator, dtype=torch.float64) / m**0.5
    elif family == "rademacher":
        signs = torch.randint(0, 2, (m, d), generator=generator, dtype=torch.int64) * 2 - 1
        matrix = signs.to(torch.float64) / m**0.5
    elif family == "countsketch":
        rows = torch.randint(0, m, (d,), generator=generator)
        signs = torch.randint(0, 2, (d,), generator=generator).to(torch.float64) * 2 - 1
        matrix = torch.zeros(m, d, dtype=torch.float64)
        matrix[rows, torch.arange(d)] = signs
    else:
        raise ConfigError(f"Unknown sketch family {family!r}; use gaussian, rademacher or countsketch.")
    return matrix.to(dtype)


def make_module_sketch(
    family: str, m: int, d: int, *, seed: int, module_name: str, side: str, dtype=torch.float32
) -> torch.Tensor:
    """The [m, d] sketch of one side of one module, identical in every process for the same arguments."""
    return make_sketch(family, m, d, seed=sketch_seed(seed, module_name, side), dtype=dtype)
