"""The ``hfinfluence`` command: score and filter whole datasets, or print the sizing, from the shell.

    hfinfluence filter --candidates pool.jsonl --target target.jsonl --keep-ratio 0.1 --output runs/math
    hfinfluence score  --candidates pool.jsonl --target target.jsonl --output runs/math-scores
    hfinfluence size   --candidates pool.jsonl --max-length 256
    accelerate launch -m hfinfluence filter …        # the same, sharded over processes

Errors about the inputs or settings print one line (``hfinfluence: error: …``) naming the problem and the
fix, and exit with status 2; an interrupted run exits with 130 and continues when rerun.
See docs/FILTERING.md for the user guide.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import InfluenceConfig
from .errors import ConfigError, InfluenceError

DEFAULT_FIT_ROWS = 1024


# Flags whose values go, under the same names, into the settings objects a command line builds.
INFLUENCE_FLAGS = (
    "modules",
    "sketch",
    "sketch_dims",
    "sketch_budget",
    "epsilon",
    "delta",
    "seed_check",
    "damping",
    "curvature",
    "loss_reduction",
    "seed",
)
READ_FLAGS = ("text_field", "prompt_field", "completion_field", "max_length", "truncation_side")
SELECT_FLAGS = ("keep_ratio", "top_k", "min_score", "mode", "temperature", "group_quotas")
JOB_FLAGS = (
    "command",
    "output",
    "model",
    "fit_rows",
    "batch_size",
    "shard_size",
    "streaming",
    "id_field",
    "group_field",
    "overwrite",
    "curvature_cache",
    "gradient_cache",
    "report_to",
)


def _word_or(word: str, result, convert, expected: str):
    """An argparse type: ``word`` stands for ``result``, any other value goes through ``convert``.

    A ``ValueError`` from ``convert`` becomes the usage error ``expected {expected}; got '<value>'``.
    """

    def parse(value: str):
        if value == word:
            return result
        try:
            return convert(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected {expected}; got {value!r}") from e

    return parse


def _dims(value: str) -> int | tuple[int, int]:
    """``"M"`` -> M, ``"M_A,M_E"`` -> (M_A, M_E)."""
    parts = [int(v) for v in value.split(",")]
    if len(parts) not in (1, 2):
        raise ValueError(f"{len(parts)} sizes")
    return parts[0] if len(parts) == 1 else tuple(parts)


_sketch_dims = _word_or("auto", "auto", _dims, "'auto', M or M_A,M_E")
_damping = _word_or("auto", "auto", float, "'auto' or a number >= 0")
_optional_int = _word_or("none", None, int, "a number or 'none'")
_fit_rows = _word_or("all", None, int, "a number of rows or 'all'")


def _add_data_arguments(parser: argparse.ArgumentParser, *, with_target: bool) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument(
        "--model", default=None, help="Hub id, local folder or .gguf file (default: bundled SmolLM2-135M)"
    )
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    group.add_argument(
        "--candidates", required=True, help="pool to score: Hub id, json/jsonl/csv/parquet file or folder"
    )
    group.add_argument("--candidates-config", default=None, help="Hub dataset configuration of the candidates")
    group.add_argument("--candidates-split", default="train")
    if with_target:
        group.add_argument("--target", required=True, help="the data to help: same kinds of source as --candidates")
        group.add_argument("--target-config", default=None)
        group.add_argument("--target-split", default="train")
    group.add_argument("--streaming", action="store_true", help="read lazily (pools too large for disk)")
    group.add_argument("--text-field", default=None, help="raw-text column (loss on every token)")
    group.add_argument("--prompt-field", default="prompt", help="prompt column (no loss)")
    group.add_argument("--completion-field", default="completion", help="completion column (loss)")
    group.add_argument("--max-length", type=int, default=512, help="tokens per row; longer rows are truncated")
    group.add_argument(
        "--truncation-side",
        choices=["left", "right"],
        default=None,
        help="where long rows are cut (default: left for prompt/completion, keeping the completion; right for text)",
    )


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = InfluenceConfig()
    group = parser.add_argument_group("influence engine")
    group.add_argument("--modules", nargs="+", default=None, help="fnmatch patterns of layers (default: decoder)")
    group.add_argument("--sketch", default=defaults.sketch, choices=["gaussian", "rademacher", "countsketch", "none"])
    group.add_argument("--sketch-dims", type=_sketch_dims, default="auto", help="'auto', M, or M_A,M_E")
    group.add_argument(
        "--sketch-budget",
        type=_optional_int,
        default=defaults.sketch_budget,
        help=f"most sketch rows per side, λ rising per layer to fit ({defaults.sketch_budget}; 'none': no limit)",
    )
    group.add_argument("--epsilon", type=float, default=defaults.epsilon, help="target accuracy of the sizing rule")
    group.add_argument(
        "--delta",
        type=float,
        default=defaults.delta,
        help=f"failure probability δ of the sizing rule ({defaults.delta:g}; 1 drops its ln 1/δ term)",
    )
    group.add_argument(
        "--seed-check",
        type=int,
        default=defaults.seed_check,
        help=f"candidates also scored through a second sketch seed, in report.md ({defaults.seed_check}; 0: off)",
    )
    group.add_argument("--damping", type=_damping, default="auto", help="'auto' (0.1 × mean eigenvalue) or λ")
    group.add_argument("--curvature", default=defaults.curvature, choices=["kfac", "ekfac", "identity"])
    group.add_argument("--loss-reduction", default=defaults.loss_reduction, choices=["sum", "mean"])
    group.add_argument("--seed", type=int, default=0, help="seeds sketches, the fit subset and Boltzmann draws")
    group.add_argument(
        "--fit-rows",
        type=_fit_rows,
        default=DEFAULT_FIT_ROWS,
        help=f"rows (a seeded random subset of the candidates) to fit the curvature on, or 'all' ({DEFAULT_FIT_ROWS})",
    )
    group.add_argument(
        "--batch-size", type=int, default=8, help="rows per forward+backward (scores do not depend on it)"
    )


def _add_output_arguments(parser: argparse.ArgumentParser, *, select: bool) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--output", required=True, help="run folder (new, empty, or a previous run of this command)")
    group.add_argument("--overwrite", action="store_true", help="replace a previous run with other settings")
    group.add_argument(
        "--curvature-cache",
        default=None,
        metavar="DIR",
        help="reuse fitted curvatures from DIR (keyed by model, data and engine settings); new fits are saved there",
    )
    group.add_argument(
        "--gradient-cache",
        default=None,
        metavar="DIR",
        help="store the candidates' sketched gradients in DIR so runs against other targets skip the model passes",
    )
    group.add_argument("--id-field", default=None, help="column copied into scores.parquet as `id`")
    group.add_argument("--group-field", default=None, help="column to count kept rows by (e.g. source)")
    group.add_argument("--shard-size", type=int, default=256, help="rows per score shard (the unit of resuming)")
    group.add_argument("--report-to", default="none", choices=["none", "wandb"])
    if not select:
        return
    group.add_argument("--format", default="parquet", choices=["parquet", "jsonl", "arrow"], dest="output_format")
    group.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload the kept rows (private)")
    group.add_argument("--public", action="store_true", help="make the --push-to-hub dataset public")

    rule = parser.add_argument_group("selection").add_mutually_exclusive_group(required=True)
    rule.add_argument("--keep-ratio", type=float, help="keep this fraction of the scored rows")
    rule.add_argument("--top-k", type=int, help="keep this many rows")
    rule.add_argument("--min-score", type=float, help="keep every row scoring at least this")
    how = parser.add_argument_group("selection method")
    how.add_argument("--mode", default="top_k", choices=["top_k", "boltzmann"], help="highest scores, or a draw")
    how.add_argument("--temperature", type=float, default=1.0, help="Boltzmann temperature, in score std units")
    how.add_argument("--group-quotas", action="store_true", help="apply the keep ratio within each --group-field")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``filter``, ``score`` and ``size`` commands."""
    parser = argparse.ArgumentParser(prog="hfinfluence", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    filter_parser = commands.add_parser("filter", help="score candidates against a target and keep the best")
    score_parser = commands.add_parser("score", help="score candidates against a target, keep everything")
    size_parser = commands.add_parser("size", help="print the sizing table and memory plan, score nothing")
    for sub in (filter_parser, score_parser, size_parser):
        sub.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    for sub, select in ((filter_parser, True), (score_parser, False)):
        _add_data_arguments(sub, with_target=True)
        _add_engine_arguments(sub)
        _add_output_arguments(sub, select=select)
    _add_data_arguments(size_parser, with_target=False)
    _add_engine_arguments(size_parser)
    size_parser.set_defaults(fit_rows=256)
    return parser


def _flags(args: argparse.Namespace, names) -> dict:
    """``{name: args.<name>}`` for ``names``: settings that take a flag's value under the flag's own name."""
    return {name: getattr(args, name) for name in names}


def _source(args: argparse.Namespace, name: str):
    """The `SourceSpec` of ``--<name>``, ``--<name>-config`` and ``--<name>-split``."""
    from .filtering import SourceSpec

    return SourceSpec(getattr(args, name), getattr(args, f"{name}_config"), getattr(args, f"{name}_split"))


def influence_config(args: argparse.Namespace) -> InfluenceConfig:
    """The engine settings of a command line."""
    return InfluenceConfig(**_flags(args, INFLUENCE_FLAGS))


def read_spec(args: argparse.Namespace):
    """How a command line reads rows (`ReadSpec`)."""
    from .filtering import ReadSpec

    return ReadSpec(**_flags(args, READ_FLAGS))


def build_job(args: argparse.Namespace, argv: list[str]):
    """The `FilterJob` a ``filter`` or ``score`` command line describes."""
    from .filtering import FilterJob, SelectSpec

    select = SelectSpec(**_flags(args, SELECT_FLAGS)) if args.command == "filter" else None
    return FilterJob(
        **_flags(args, JOB_FLAGS),
        candidates=_source(args, "candidates"),
        target=_source(args, "target"),
        read=read_spec(args),
        influence=influence_config(args),
        select=select,
        model_dtype=args.dtype,
        output_format=getattr(args, "output_format", "parquet"),
        push_to_hub=getattr(args, "push_to_hub", None),
        private=not getattr(args, "public", False),
        argv=argv,
    )


def run_filter(args: argparse.Namespace, argv: list[str]) -> int:
    """``filter`` and ``score``: run the job, then print where everything went (main process)."""
    from .filtering import run_job

    summary = run_job(build_job(args, argv))
    if _process_index() != 0:
        return 0
    resumed = (
        f" ({summary.resumed_shards} shard(s) reused from an earlier invocation)" if summary.resumed_shards else ""
    )
    print(f"scored {summary.scored} of {summary.num_rows} candidates{resumed}")
    if summary.kept is not None:
        print(f"kept {summary.kept} rows -> {summary.files['kept']}")
    print(f"all scores -> {summary.files['scores']}")
    print(f"report -> {summary.files.get('report', '(not written)')}")
    times = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in summary.times.items())
    print(f"wall time: {times}")
    return 0


def run_size(args: argparse.Namespace, argv: list[str]) -> int:
    """``size``: print the memory plan and sizing table (main process)."""
    from .filtering import size_report

    text = size_report(
        model=args.model,
        candidates=_source(args, "candidates"),
        read=read_spec(args),
        influence=influence_config(args),
        fit_rows=args.fit_rows,
        batch_size=args.batch_size,
        streaming=args.streaming,
        model_dtype=args.dtype,
    )
    if _process_index() == 0:
        print(text)
    return 0


def _process_index() -> int:
    """This process's rank: from torch.distributed once joined, else from the launcher's environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def _console_logging(quiet: bool) -> logging.Handler:
    """Show the package's messages on stderr (the CLI is an application: configuring its loggers is its job)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("hfinfluence: %(message)s"))
    package = logging.getLogger("hfinfluence")
    package.addHandler(handler)
    package.setLevel(logging.WARNING if quiet else logging.INFO)
    return handler


def main(argv: list[str] | None = None) -> int:
    """Run one ``hfinfluence`` command; returns the exit status (0 ok, 2 bad input or settings, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    handler = _console_logging(args.quiet)
    try:
        return {"filter": run_filter, "score": run_filter, "size": run_size}[args.command](args, argv)
    except (InfluenceError, ConfigError) as e:
        print(f"{_prefix()}hfinfluence: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_prefix()}hfinfluence: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    finally:
        logging.getLogger("hfinfluence").removeHandler(handler)


def _prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    return f"[process {_process_index()}] " if world > 1 else ""
