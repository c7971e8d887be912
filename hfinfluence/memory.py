"""Memory each stage of the engine needs, estimated from layer widths and sketch sizes alone."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MemoryPlan:
    """Bytes per stage. ``sizes_known`` is False before the first fit with ``sketch_dims="auto"``: the sketched
    stages then assume the rule's cap (no compression), an upper bound."""

    first_fit_factors: int
    eigenbases: int
    batch_sketches: int
    per_example_gradients: int
    score_block: int
    sizes_known: bool

    def rows(self) -> list[tuple[str, int, str]]:
        return [
            ("first fit: exact (or pilot) factors", self.first_fit_factors, "A and E per layer, during the first fit"),
            ("eigenbases + sketched factors", self.eigenbases, "kept for scoring"),
            ("one batch's sketched tokens", self.batch_sketches, "transient, per forward+backward"),
            ("per-example sketched gradients", self.per_example_gradients, "pairwise: queries held + one train batch"),
            ("score block", self.score_block, "pairwise output for one train batch"),
        ]

    def __str__(self) -> str:
        note = "" if self.sizes_known else " (sketch sizes not chosen yet: upper bounds at full width)"
        lines = [f"memory plan{note}:"]
        lines += [f"  {stage:<38} {_human(size):>10}  {why}" for stage, size, why in self.rows()]
        return "\n".join(lines)


def plan_memory(
    widths: list[tuple[int, int]],
    sketch_dims: list[tuple[int, int]],
    pilot_widths: list[tuple[int, int]],
    *,
    batch_size: int,
    tokens: int,
    queries: int,
    factor_bytes: int,
    sizes_known: bool,
    copies: int = 1,
) -> MemoryPlan:
    """Estimate a `MemoryPlan` for layers with ``widths`` (d_in, d_out), sketch sizes and first-fit widths.

    ``copies`` = 2 when the seed check keeps a second, independently seeded set of sketched factors.
    """
    first = sum(a * a + e * e for a, e in pilot_widths) * factor_bytes
    squares = sum(a * a + e * e for a, e in sketch_dims)
    bases = copies * (2 * squares + sum(a * e for a, e in sketch_dims)) * factor_bytes  # eigvecs, factors, scale
    batch = max(batch_size * tokens * (a + e + da + de) for (a, e), (da, de) in zip(sketch_dims, widths, strict=True))
    per_example = sum(a * e for a, e in sketch_dims) * (queries + batch_size) * factor_bytes
    return MemoryPlan(
        first_fit_factors=first,
        eigenbases=bases,
        batch_sketches=batch * factor_bytes,
        per_example_gradients=per_example,
        score_block=batch_size * queries * 8,
        sizes_known=sizes_known,
    )


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
