"""What the recipes share: one argument parser for YAML + command line, model loading, training, the summary."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from hfinfluence.data import CausalCollator
from hfinfluence.errors import ConfigError
from hfinfluence.models import load_model_and_tokenizer
from hfinfluence.trainer import InfluenceTrainer, InfluenceTrainingArguments

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float64": "float64"}


@dataclass
class ModelArguments:
    """Which model to train; LoRA adapters instead of full fine-tuning when ``lora_r`` > 0."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id, local folder or .gguf file; default: the bundled SmolLM2-135M."}
    )
    dtype: str = field(default="float32", metadata={"help": "Parameter dtype: float32, bfloat16 or float64."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains every parameter."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names LoRA wraps; default q_proj and v_proj."}
    )


def parse_with_config(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple:
    """Parse ``dataclass_types`` from ``--config x.yaml`` (defaults) and command-line flags (which override it).

    Unknown YAML keys are refused with the list of valid ones, so a typo never passes silently.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)

    parser = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", default=None, help="YAML file of argument defaults; flags override it.")
    if known.config:
        values = yaml.safe_load(Path(known.config).read_text()) or {}
        valid = {f.name for cls in dataclass_types for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ConfigError(f"{known.config}: unknown keys {unknown}; valid keys: {sorted(valid)}.")
        parser.set_defaults(**values)
    *parsed, _ = parser.parse_args_into_dataclasses(args=rest + ["--config", known.config or ""])
    return tuple(parsed)


def load_model(model_args: ModelArguments):
    """``(model, tokenizer)``, the model wrapped in LoRA adapters when ``lora_r`` > 0."""
    import torch

    if model_args.dtype not in DTYPES:
        raise ConfigError(f"`dtype` must be one of {sorted(DTYPES)}, got {model_args.dtype!r}.")
    model, tokenizer = load_model_and_tokenizer(model_args.model_name_or_path, dtype=getattr(torch, model_args.dtype))
    if model_args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = model_args.lora_target_modules or ["q_proj", "v_proj"]
        config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, target_modules=targets)
        model = get_peft_model(model, config)
    return model, tokenizer


def train_and_measure(
    model, tokenizer, args: InfluenceTrainingArguments, *, train_dataset, target_dataset
) -> tuple[InfluenceTrainer, dict]:
    """Train on ``train_dataset`` with influence selection against ``target_dataset``.

    Returns the trainer and the mean target loss before and after training, ``{"before": ..., "after": ...}``.
    """
    trainer = InfluenceTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        target_dataset=target_dataset,
        data_collator=CausalCollator(tokenizer),
        processing_class=tokenizer,
    )
    loss_before = trainer.target_loss()
    trainer.train()
    return trainer, {"before": loss_before, "after": trainer.target_loss()}


def summarise_run(
    trainer,
    *,
    seen: str,
    details: dict,
    detail_lines: Sequence[str] = (),
    losses: dict,
    loss_per: str,
    seconds: float,
) -> dict:
    """Save and print what the run saw and kept (`finish`); returns the summary.

    The summary holds the selection counts, the recipe's ``details``, the target ``losses`` before and after,
    the number of processes, the wall time and the W&B run folder. The printed lines are the selection
    settings, ``seen``, the kept fraction, ``detail_lines``, the target loss (mean per ``loss_per``), the
    processes and wall time, and the W&B folder.
    """
    args, selection = trainer.args, trainer.selection_summary()
    folder = wandb_run_folder()
    summary = {
        **selection,
        **details,
        "target_loss_before": losses["before"],
        "target_loss_after": losses["after"],
        "processes": trainer.accelerator.num_processes,
        "wall_seconds": seconds,
        "wandb_folder": str(folder) if folder else None,
    }
    lines = [
        f"selection         {args.selection} ({args.selection_method}, keep_ratio {args.keep_ratio:g}, "
        f"buffer {args.buffer_multiplier}x, {trainer.state.global_step} steps)",
        seen,
        f"kept fraction     {selection['kept_fraction']:.3f} ({selection['examples_kept']} kept)",
        *detail_lines,
        f"target loss       {losses['before']:.4f} -> {losses['after']:.4f} (mean per {loss_per})",
        f"processes         {trainer.accelerator.num_processes}, wall time {seconds:.0f} s (this process)",
    ]
    if folder:
        lines.append(f"W&B run folder    {folder}   (upload later: wandb sync {folder})")
    finish(trainer, summary=summary, lines=lines)
    return summary


def family_shares(trainer, pool_groups: Sequence[str], families: Sequence[str]) -> dict:
    """Share of the target's families in the pool, among the candidates seen, and among the kept weight."""
    summary = trainer.selection_summary()
    groups = summary["groups"]
    seen = sum(groups.get(f, {}).get("seen", 0) for f in families)
    weight = sum(groups.get(f, {}).get("weight", 0.0) for f in families)
    return {
        "pool": sum(g in families for g in pool_groups) / max(len(pool_groups), 1),
        "seen": seen / summary["examples_seen"] if summary["examples_seen"] else math.nan,
        "kept": weight / summary["weight_total"] if summary["weight_total"] else math.nan,
    }


def wandb_run_folder() -> Path | None:
    """The folder of the active W&B run (``.../offline-run-*`` in offline mode), or None."""
    from hfinfluence.tracking import wandb_run

    run = wandb_run()
    return Path(run.dir).parent if run is not None else None


def finish(trainer, *, summary: dict, lines: list[str]) -> None:
    """Write ``summary`` to ``output_dir/influence_summary.json``, print ``lines`` on the main process, close W&B."""
    if trainer.accelerator.is_main_process:
        out = Path(trainer.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "influence_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print("\n".join(["", "=" * 72, *lines, f"summary file      {out / 'influence_summary.json'}", "=" * 72]))
    from hfinfluence.tracking import wandb_run

    run = wandb_run()
    if run is not None:
        run.finish()
