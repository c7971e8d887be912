"""Fine-tuning recipe: prompt/completion data (loss on the completion), influence filtering against a target set.

One process (from the repository root):

    HF_HUB_OFFLINE=1 WANDB_MODE=offline python recipes/finetune.py --config recipes/configs/finetune_demo.yaml

Two CPU processes (mpirun from Debian's openmpi-bin; as root also set OMPI_ALLOW_RUN_AS_ROOT=1 and
OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1):

    accelerate launch --config_file accelerate_configs/cpu.yaml \\
        recipes/finetune.py --config recipes/configs/finetune_demo.yaml

GPUs (one, several, FSDP, several machines):

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/finetune.py --config CONFIG
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/finetune.py --config CONFIG --bf16 true
    accelerate launch --config_file accelerate_configs/fsdp.yaml recipes/finetune.py --config CONFIG
    accelerate launch --config_file accelerate_configs/multi_node.yaml --machine_rank 0 \\
        --main_process_ip HOST recipes/finetune.py --config CONFIG

Any flag overrides the YAML, e.g. ``--selection reweight --tau 0.5`` or ``--selection off`` for the baseline.
At the end the main process prints a summary: candidates seen, kept fraction, the share of kept examples from
the target's families against their share of the pool, the target loss before and after, and the W&B folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from recipe_utils import (
    ModelArguments,
    family_shares,
    load_model,
    parse_with_config,
    summarise_run,
    train_and_measure,
)

from hfinfluence.data import format_prompt_completion, load_dataset_any
from hfinfluence.trainer import InfluenceTrainingArguments


@dataclass
class DataArguments:
    """Candidate pool and target set, each a local file/folder or a Hub id, formatted as prompt + completion."""

    train_file: str = field(default="recipes/data/pool.jsonl", metadata={"help": "Candidate pool."})
    target_file: str = field(default="recipes/data/target_gsm8k.jsonl", metadata={"help": "Target set."})
    prompt_field: str = field(default="prompt", metadata={"help": "Prompt column (no loss)."})
    completion_field: str = field(default="completion", metadata={"help": "Completion column (loss)."})
    max_length: int = field(default=128, metadata={"help": "Tokens per example at most (prompt cut first)."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Use only the first rows of the pool."})
    max_target_rows: int | None = field(default=None, metadata={"help": "Use only the first rows of the target."})
    target_families: list[str] | None = field(
        default=None, metadata={"help": "Values of `group_column` relevant to the target, for the summary."}
    )


def load_rows(path: str, limit: int | None, data_args: DataArguments, tokenizer):
    """Load, cut to ``limit`` rows, format (loss on the completion) and drop rows left without a labelled token."""
    dataset = load_dataset_any(path)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    formatter = format_prompt_completion(
        tokenizer, data_args.prompt_field, data_args.completion_field, max_length=data_args.max_length
    )
    dataset = dataset.map(formatter, batched=True)
    return dataset.filter(lambda row: row["num_loss_tokens"] > 0)


def main(argv=None) -> dict:
    started = time.perf_counter()
    model_args, data_args, args = parse_with_config((ModelArguments, DataArguments, InfluenceTrainingArguments), argv)
    model, tokenizer = load_model(model_args)
    pool = load_rows(data_args.train_file, data_args.max_train_rows, data_args, tokenizer)
    target = load_rows(data_args.target_file, data_args.max_target_rows, data_args, tokenizer)

    trainer, losses = train_and_measure(model, tokenizer, args, train_dataset=pool, target_dataset=target)
    return summarise(trainer, pool, data_args, losses=losses, seconds=time.perf_counter() - started)


def summarise(trainer, pool, data_args: DataArguments, *, losses: dict, seconds: float) -> dict:
    """Print and save what the run saw and kept, with the target families' shares when `target_families` is set."""
    families = data_args.target_families or []
    group_column = trainer.args.group_column
    pool_groups = [str(g) for g in pool[group_column]] if group_column in pool.column_names else []
    shares = family_shares(trainer, pool_groups, families) if families and pool_groups else None
    share_lines = []
    if shares:
        share_lines.append(
            f"{'+'.join(families)} share   pool {shares['pool']:.1%}   seen {shares['seen']:.1%}   "
            f"kept {shares['kept']:.1%}" + ("   (by weight)" if trainer.args.selection == "reweight" else "")
        )
    return summarise_run(
        trainer,
        seen=f"examples seen     {trainer.selection_summary()['examples_seen']}",
        details={"target_families": families, "family_share": shares},
        detail_lines=share_lines,
        losses=losses,
        loss_per="completion token",
        seconds=seconds,
    )


if __name__ == "__main__":
    main()
