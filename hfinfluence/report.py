"""The human-readable side of an offline run: ``report.md``, the score histogram and the same facts in W&B.

Everything here reads what `filtering` computed (the scores table, the manifest's findings, the kept rows);
nothing is recomputed. W&B is imported only when ``--report-to wandb`` asks for it.
"""

from __future__ import annotations

import math
import os
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .leakage import SEED_SPEARMAN_WARNING
from .logs import get_logger
from .sizing import SizingRow, SizingTable

logger = get_logger(__name__)

HISTOGRAM_FILE, REPORT_FILE = "score_histogram.png", "report.md"
SNIPPET_CHARS = 160


@dataclass
class ReportInputs:
    """What a report shows: the job, the manifest (settings, findings, history), scores, kept rows and examples.

    ``table`` is ``scores.parquet`` (row, [id], [group], score, rank, truncated, loss_tokens); ``kept`` the kept
    row indices (None for ``score``); ``examples`` the highest- and lowest-scored rows with their text.
    """

    job: object
    manifest: dict
    table: pa.Table
    kept: np.ndarray | None
    times: dict
    examples: dict


def write_report(inputs: ReportInputs, out: Path) -> dict[str, Path]:
    """Write ``score_histogram.png`` and ``report.md`` into ``out``; return their paths."""
    histogram = write_histogram(_scores(inputs.table), inputs.kept, out / HISTOGRAM_FILE)
    report = out / REPORT_FILE
    tmp = report.with_name(f".{report.name}.tmp-{os.getpid()}")
    tmp.write_text(render_report(inputs))
    os.replace(tmp, report)
    return {"report": report, "histogram": histogram}


def _scores(table: pa.Table) -> np.ndarray:
    return table.column("score").to_numpy(zero_copy_only=False)


def write_histogram(scores: np.ndarray, kept: np.ndarray | None, path: Path) -> Path:
    """Histogram of the scored rows, the kept ones stacked in a second colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    valid = ~np.isnan(scores)
    mask = np.zeros(scores.shape[0], dtype=bool)
    if kept is not None:
        mask[kept] = True
    bins = np.histogram_bin_edges(scores[valid], bins=60) if valid.any() else 10
    figure, axes = plt.subplots(figsize=(7, 3.6), dpi=110)
    parts = [scores[valid & ~mask], scores[valid & mask]]
    labels = ["not kept" if kept is not None else "scored", "kept"]
    axes.hist(parts, bins=bins, stacked=True, label=labels, color=["#9aa5b1", "#d9480f"])
    axes.set_xlabel("influence score (positive = lowers the target loss)")
    axes.set_ylabel("candidates")
    axes.set_yscale("log")
    axes.legend(frameon=False, loc="upper right")
    figure.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    figure.savefig(tmp)
    plt.close(figure)
    os.replace(tmp, path)
    return path


def group_counts(table: pa.Table, kept: np.ndarray | None) -> list[dict]:
    """Per group: rows in the pool, rows kept, both shares and their ratio (the enrichment), most kept first."""
    groups = [str(g) for g in table.column("group").to_pylist()]
    pool = Counter(groups)
    chosen = Counter(groups[i] for i in kept) if kept is not None else Counter()
    total, kept_total = len(groups), max(sum(chosen.values()), 1)
    rows = []
    for group, count in pool.items():
        pool_share, kept_share = count / total, chosen[group] / kept_total
        rows.append(
            {
                "group": group,
                "pool": count,
                "kept": chosen[group],
                "pool_share": pool_share,
                "kept_share": kept_share,
                "enrichment": kept_share / pool_share,
            }
        )
    return sorted(rows, key=lambda r: (-r["kept"], r["group"]))


def render_report(inputs: ReportInputs) -> str:
    """The Markdown report: command, summary, histogram, groups, examples, curvature, leakage, notes, settings."""
    sections = [
        _header(inputs),
        _summary(inputs),
        _score_section(inputs),
        _group_section(inputs),
        _example_section(inputs),
        _curvature_section(inputs),
        _leakage_section(inputs),
        _notes_section(inputs),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _header(inputs: ReportInputs) -> str:
    job = inputs.job
    command = shlex.join(["hfinfluence", *job.argv]) if job.argv else "(called from Python)"
    return f"# hfinfluence {job.command}: {job.candidates.path}\n\nCommand:\n\n```bash\n{command}\n```"


def _summary(inputs: ReportInputs) -> str:
    job, info, table = inputs.job, inputs.manifest.get("info", {}), inputs.table
    scores = _scores(table)
    total, scored = scores.shape[0], int((~np.isnan(scores)).sum())
    truncated = int(np.asarray(table.column("truncated").to_numpy(zero_copy_only=False)).sum())
    target, fit = info.get("target", {}), info.get("fit", {})
    lines = [
        "## Summary",
        "",
        f"- candidates: {total} rows from `{job.candidates.path}`; scored {scored}; "
        f"not scored (no labelled token within `--max-length`): {total - scored}",
        f"- truncated to `--max-length` {job.read.max_length} ({job.read.side} side): {truncated} of {total} "
        f"candidates, {target.get('truncated', '?')} of {target.get('rows', '?')} target rows, "
        f"{fit.get('truncated', '?')} of {fit.get('rows', '?')} fit rows",
        f"- target: {target.get('rows', '?')} rows from `{job.target.path}`",
        f"- curvature fitted on {fit.get('rows', '?')} candidate rows (`--fit-rows` {job.fit_rows or 'all'})",
    ]
    if inputs.kept is not None:
        lines.append(f"- kept: {inputs.kept.size} of {total} ({inputs.kept.size / max(total, 1):.1%}) by {_rule(job)}")
    history = inputs.manifest.get("history", [])
    processes = history[-1]["processes"] if history else "?"
    lines.append(f"- processes: {processes}; invocations of this run: {len(history)}")
    times = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in inputs.times.items())
    lines.append(f"- wall time of this invocation: {times or 'n/a'}")
    return "\n".join(lines)


def _rule(job) -> str:
    select = job.select
    if select.min_score is not None:
        return f"`--min-score {select.min_score}`"
    amount = f"`--keep-ratio {select.keep_ratio}`" if select.keep_ratio is not None else f"`--top-k {select.top_k}`"
    mode = f"`--mode {select.mode}`" + (f" (temperature {select.temperature})" if select.mode == "boltzmann" else "")
    quotas = f", within each `{job.group_field}` group" if select.group_quotas else ""
    return f"{amount}, {mode}{quotas}"


def _score_section(inputs: ReportInputs) -> str:
    scores = _scores(inputs.table)
    valid = scores[~np.isnan(scores)]
    if not valid.size:
        return "## Scores\n\nNo row was scored."
    quantiles = np.quantile(valid, [0.0, 0.5, 1.0])
    line = (
        f"mean {valid.mean():.4g}, std {valid.std():.4g}, min {quantiles[0]:.4g}, median {quantiles[1]:.4g}, "
        f"max {quantiles[2]:.4g}"
    )
    if inputs.kept is not None and inputs.kept.size:
        line += f"; lowest kept score {scores[inputs.kept].min():.4g}"
    return (
        f"## Scores\n\nPositive = training on the row lowers the target loss. {line}.\n\n"
        f"![score histogram]({HISTOGRAM_FILE})\n\nAll scores (another threshold needs no rescoring): `scores.parquet`."
    )


def _group_section(inputs: ReportInputs) -> str:
    if "group" not in inputs.table.column_names:
        return ""
    rows = group_counts(inputs.table, inputs.kept)
    lines = [
        f"## Counts per `{inputs.job.group_field}`",
        "",
        "| group | pool | kept | pool share | kept share | kept share / pool share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {_cell(r['group'])} | {r['pool']} | {r['kept']} | {r['pool_share']:.1%} | {r['kept_share']:.1%} "
            f"| {r['enrichment']:.2f} |"
        )
    return "\n".join(lines)


def _example_section(inputs: ReportInputs) -> str:
    parts = []
    for side, title in (("highest", "Highest-scored rows"), ("lowest", "Lowest-scored rows")):
        lines = [f"## {title}", "", "| rank | row | score | text |", "|---:|---:|---:|---|"]
        for example in inputs.examples.get(side, []):
            text = _cell(_snippet(example["text"]))
            lines.append(f"| {example['rank']} | {example['row']} | {example['score']:.4g} | {text} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _snippet(text: str) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= SNIPPET_CHARS else flat[: SNIPPET_CHARS - 1] + "…"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def sizing_table(info: dict) -> SizingTable:
    """The `SizingTable` stored in a manifest's ``info``."""
    return SizingTable(SizingRow(**row) for row in info.get("sizing", []))


def _curvature_section(inputs: ReportInputs) -> str:
    config, info = inputs.job.influence, inputs.manifest.get("info", {})
    table = sizing_table(info)
    if not table:
        return ""
    dampings = np.array([row.damping for row in table])
    sketched = sum(r.sketch_dim_a * r.sketch_dim_e for r in table)
    full = sum(r.d_in * r.d_out for r in table)
    lines = [
        "## Curvature and sketches",
        "",
        f"- {len(table)} tracked modules; curvature `{config.curvature}`, sketch `{config.sketch}`, "
        f"`sketch_dims={config.sketch_dims}`, ε = {config.epsilon}, loss reduction `{config.loss_reduction}`",
        f"- damping λ per layer: min {dampings.min():.3g}, median {np.median(dampings):.3g}, max {dampings.max():.3g} "
        f"(`damping={config.damping}`)",
        f"- sketched gradient size {sketched:,} of {full:,} parameters ({sketched / max(full, 1):.1%})",
        "",
        "```text",
        info.get("memory_plan", "memory plan: not recorded"),
        "```",
        "",
        "<details><summary>Sizing table (per layer)</summary>",
        "",
        table.to_markdown(),
        "</details>",
    ]
    return "\n".join(lines)


def _leakage_section(inputs: ReportInputs) -> str:
    info = inputs.manifest.get("info", {})
    leakage, check = info.get("leakage"), info.get("seed_check")
    parts = ["## Leakage diagnostic"]
    if leakage:
        worst = ", ".join(f"`{name}` {value:.1%}" for name, value in leakage.get("worst_layers", []))
        parts.append(
            f"Share of the target gradient outside the range of the fitted curvature: {leakage['total']:.1%} "
            f"overall; largest layers: {worst}. Sketched scores pick up noise from this part; when it is large, "
            "raise `--damping` or the sketch size, or fit the curvature on rows that resemble the target."
        )
    else:
        parts.append("Kernel fraction: not computed for this run.")
    if check:
        parts.append(
            f"Seed check: the first {check['examples']} scored candidates, scored again through a second sketch "
            f"with another seed, rank with Spearman {check['spearman']:.3f} against the scores used here; the two "
            f"differ by {check['spread']:.1%} of the scores' spread. Below {SEED_SPEARMAN_WARNING:g} the ranking "
            "depends on the sketch: "
            "raise `--sketch-budget` (or lower `--epsilon`)."
        )
    else:
        parts.append(
            "Seed check: not computed for this run (`seed_check` off, no sketch, or every score was read from the "
            "gradient cache)."
        )
    return "\n\n".join(parts)


def _notes_section(inputs: ReportInputs) -> str:
    notes = inputs.manifest.get("info", {}).get("notes", [])
    if not notes:
        return ""
    return "## Notes\n\n" + "\n".join(f"- {_snippet(n) if len(n) > 400 else n}" for n in notes)


# ---------------------------------------------------------------------------------------------- W&B


def log_to_wandb(inputs: ReportInputs, out: Path) -> Path | None:
    """Log the report's facts to a W&B run whose files live in ``out/wandb`` (``WANDB_MODE=offline`` works).

    Keys: ``influence/score_mean``, ``influence/score_std``, ``influence/score_histogram``, ``select/kept``,
    ``select/kept_fraction``, ``select/kept/<group>``; tables ``influence/sizing``, ``influence/highest``,
    ``influence/lowest``; the histogram image. Returns the run folder, or None when W&B failed (a warning
    says why; the files on disk are complete either way).
    """
    import wandb

    job = inputs.job
    config = {"command": job.command, **inputs.manifest.get("scoring", {}), **inputs.manifest.get("outputs", {})}
    try:
        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "hfinfluence"),
            dir=str(out),
            name=out.name,
            job_type=job.command,
            config=config,
            reinit="finish_previous",
        )
    except wandb.errors.Error as e:
        logger.warning(f"W&B logging failed ({e}); set WANDB_MODE=offline to log without a login.")
        return None
    metrics = wandb_metrics(inputs, wandb)
    if (out / HISTOGRAM_FILE).is_file():
        metrics["influence/score_histogram_image"] = wandb.Image(str(out / HISTOGRAM_FILE))
    run.log(metrics)
    run.summary.update({k: v for k, v in wandb_scalars(inputs).items()})
    folder = Path(run.dir).parent
    run.finish()
    return folder


def wandb_scalars(inputs: ReportInputs) -> dict[str, float]:
    """Scalar metrics: score mean/std, number scored, kept count and fraction, kept rows per group."""
    scores = _scores(inputs.table)
    valid = scores[~np.isnan(scores)]
    metrics = {
        "influence/score_mean": float(valid.mean()) if valid.size else math.nan,
        "influence/score_std": float(valid.std()) if valid.size else math.nan,
        "influence/scored": float(valid.size),
    }
    info = inputs.manifest.get("info", {})
    if info.get("leakage"):
        metrics["influence/leakage"] = float(info["leakage"]["total"])
    if info.get("seed_check"):
        metrics["influence/seed_spearman"] = float(info["seed_check"]["spearman"])
        metrics["influence/seed_spread"] = float(info["seed_check"]["spread"])
    if inputs.kept is not None:
        metrics["select/kept"] = float(inputs.kept.size)
        metrics["select/kept_fraction"] = inputs.kept.size / max(scores.shape[0], 1)
    if "group" in inputs.table.column_names:
        for row in group_counts(inputs.table, inputs.kept):
            metrics[f"select/kept/{row['group']}"] = float(row["kept"])
    return metrics


def wandb_metrics(inputs: ReportInputs, wandb) -> dict:
    """Everything logged in one step: the scalars, the score histogram and the sizing and example tables."""
    scores = _scores(inputs.table)
    metrics: dict = dict(wandb_scalars(inputs))
    metrics["influence/score_histogram"] = wandb.Histogram(scores[~np.isnan(scores)].tolist())
    table = sizing_table(inputs.manifest.get("info", {}))
    if table:
        columns = list(table[0].__dataclass_fields__)
        metrics["influence/sizing"] = wandb.Table(columns=columns, data=[list(r.__dict__.values()) for r in table])
    for side in ("highest", "lowest"):
        rows = [[e["rank"], e["row"], e["score"], _snippet(e["text"])] for e in inputs.examples.get(side, [])]
        metrics[f"influence/{side}"] = wandb.Table(columns=["rank", "row", "score", "text"], data=rows)
    return metrics
