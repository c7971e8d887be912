"""Pretraining-style recipe: raw text packed into fixed-length blocks, influence filtering against a target text set.

Every token carries loss. The pool is tokenized, joined with eos between documents and cut into
``block_size`` blocks (`hfinfluence.data.pack_texts`); candidates are blocks, so a buffer holds
``buffer_multiplier × per_device_train_batch_size`` blocks. Target documents are kept whole (cut at
``block_size``). When the data has no ``text_field`` column but has prompt and completion columns, the text is
``prompt + completion``, so the shipped demo files work here too.

One process (from the repository root):

    HF_HUB_OFFLINE=1 WANDB_MODE=offline python recipes/pretrain.py --config recipes/configs/pretrain_demo.yaml

Two CPU processes (mpirun from Debian's openmpi-bin; as root also OMPI_ALLOW_RUN_AS_ROOT=1
OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1):

    accelerate launch --config_file accelerate_configs/cpu.yaml \\
        recipes/pretrain.py --config recipes/configs/pretrain_demo.yaml

GPUs:

    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/pretrain.py --config CONFIG
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/pretrain.py --config CONFIG
    accelerate launch --config_file accelerate_configs/fsdp.yaml recipes/pretrain.py --config CONFIG
    accelerate launch --config_file accelerate_configs/multi_node.yaml --machine_rank 0 \\
        --main_process_ip HOST recipes/pretrain.py --config CONFIG
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from recipe_utils import ModelArguments, load_model, parse_with_config, summarise_run, train_and_measure

from hfinfluence.data import format_text, load_dataset_any, pack_texts
from hfinfluence.trainer import InfluenceTrainingArguments


@dataclass
class TextArguments:
    """Raw-text pool and target, each a local file/folder or a Hub id."""

    train_file: str = field(default="recipes/data/pool.jsonl", metadata={"help": "Candidate texts."})
    target_file: str = field(default="recipes/data/target_gsm8k.jsonl", metadata={"help": "Target texts."})
    text_field: str = field(default="text", metadata={"help": "Text column (else prompt + completion)."})
    block_size: int = field(default=128, metadata={"help": "Tokens per packed block."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Use only the first documents of the pool."})
    max_target_rows: int | None = field(default=None, metadata={"help": "Use only the first target documents."})


def load_texts(path: str, limit: int | None, text_field: str):
    """A dataset with a ``text_field`` column, joining prompt and completion when that column is absent."""
    dataset = load_dataset_any(path)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    columns = dataset.column_names
    if text_field not in columns and {"prompt", "completion"} <= set(columns):
        dataset = dataset.map(lambda row: {text_field: row["prompt"] + row["completion"]})
    return dataset


def main(argv=None) -> dict:
    started = time.perf_counter()
    model_args, text_args, args = parse_with_config((ModelArguments, TextArguments, InfluenceTrainingArguments), argv)
    model, tokenizer = load_model(model_args)
    pool_texts = load_texts(text_args.train_file, text_args.max_train_rows, text_args.text_field)
    blocks = pack_texts(pool_texts, tokenizer, text_field=text_args.text_field, block_size=text_args.block_size)
    target = load_texts(text_args.target_file, text_args.max_target_rows, text_args.text_field)
    formatter = format_text(tokenizer, text_args.text_field, max_length=text_args.block_size)
    target = target.map(formatter, batched=True, remove_columns=target.column_names)

    trainer, losses = train_and_measure(model, tokenizer, args, train_dataset=blocks, target_dataset=target)
    seen = trainer.selection_summary()["examples_seen"]
    return summarise_run(
        trainer,
        seen=f"blocks seen       {seen} of {len(blocks)} ({text_args.block_size} tokens each)",
        details={"blocks": len(blocks)},
        losses=losses,
        loss_per="token",
        seconds=time.perf_counter() - started,
    )


if __name__ == "__main__":
    main()
