"""Per-step cost of influence filtering in the Trainer against plain training, on the same data and seed.

    OMP_NUM_THREADS=1 python scripts/bench_trainer.py --model smollm2 --batch 2 --multiplier 4 --steps 8

Runs, one after another in this process, with the same rows, seed and model weights:

- ``off b``        plain `Trainer` step over a batch of b (what the filtered run trains on per step);
- ``off B``        plain step over B = multiplier × b: one forward+backward over the buffer, the unavoidable part;
- ``bare B``       the filter step's passes without the engine: forward over B, the input-gradient backward to the
                   tracked layers' outputs, the training backward on the retained graph; no capture, sketching,
                   curvature or selection maths (constant scores);
- ``filter B``     the real filter step, ``training_pass="retained"``;
- ``recompute B``  the filter step with ``training_pass="recompute"`` (fresh forward+backward on the kept rows).

Each is timed per optimizer step with a callback, in CPU time of this process (steady on a shared machine; run
with one thread) and wall time: the median over the steps after the first ``--skip`` (whose first fit and
target pass are reported as "start-up"), and the mean, which includes the refresh steps. Ratios are of median
CPU times against ``off B``; the engine's own share is ``(filter B − bare B) / off B``. Prints a markdown
table and, with ``--json``, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import datasets
import torch
from transformers import TrainerCallback

from hfinfluence.config import InfluenceConfig
from hfinfluence.data import CausalCollator, format_prompt_completion
from hfinfluence.models import load_model_and_tokenizer, tiny_llama, tiny_tokenizer
from hfinfluence.trainer import InfluenceTrainer, InfluenceTrainingArguments, _model_inputs

REPO = Path(__file__).resolve().parents[1]


class StepTimer(TrainerCallback):
    """Wall time and CPU time of this process for every optimizer step.

    CPU time (`time.process_time`) counts only this process's own work, so on a machine shared with other jobs
    it is the steadier measure; with one thread per process it is also what the step costs on an idle core.
    """

    def __init__(self):
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._start = (0.0, 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start[0])
        self.cpu_times.append(time.process_time() - self._start[1])


class BareTrainer(InfluenceTrainer):
    """The filter step's passes with the engine taken out: plain forward hooks collect the same layer outputs."""

    def _run_schedule(self, model, inputs):
        self._bare_modules = getattr(self, "_bare_modules", None) or _tracked_linear(model, self.args.modules)

    def _score_pass(self, model, inputs):
        outputs = []
        handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in self._bare_modules]
        with self.compute_loss_context_manager():
            logits = model(**_model_inputs(inputs)).logits
        for handle in handles:
            handle.remove()
        from hfinfluence.losses import per_example_loss

        losses = per_example_loss(logits, inputs["labels"])
        torch.autograd.grad(losses.sum(), outputs, retain_graph=True, allow_unused=True)
        return torch.zeros(losses.shape[0], dtype=torch.float64), losses

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.engine = self.engine or object()  # any non-None value skips the warm-up branch
        return super().training_step(model, inputs, num_items_in_batch)

    def _window_metrics(self):
        self._window.clear()
        return {}


def _tracked_linear(model, patterns):
    from hfinfluence.capture import find_tracked_modules

    return [info.module for info in find_tracked_modules(model, patterns).values()]


def build(model_name: str, max_length: int, rows: int):
    if model_name == "tiny":
        tokenizer = tiny_tokenizer()
        model = tiny_llama(vocab_size=len(tokenizer), hidden=256, layers=4, intermediate=688, heads=8, kv_heads=4)
    else:
        model, tokenizer = load_model_and_tokenizer(None if model_name == "smollm2" else model_name)
    lines = (REPO / "recipes" / "data" / "pool.jsonl").read_text().splitlines()[:rows]
    pool = datasets.Dataset.from_list([json.loads(line) for line in lines])
    formatter = format_prompt_completion(tokenizer, max_length=max_length)
    pool = pool.map(formatter, batched=True).filter(lambda row: row["num_loss_tokens"] > 0)
    target_lines = (REPO / "recipes" / "data" / "target_gsm8k.jsonl").read_text().splitlines()[:8]
    target = datasets.Dataset.from_list([json.loads(line) for line in target_lines]).map(formatter, batched=True)
    return model, tokenizer, pool, target


def run(variant: str, options, model_state, parts) -> dict:
    model, tokenizer, pool, target = parts
    model.load_state_dict(model_state)
    selection = "off" if variant.startswith("off") else "filter"
    batch = options.batch * (options.multiplier if variant == "off B" else 1)
    args = InfluenceTrainingArguments(
        output_dir=str(Path(options.out) / variant.replace(" ", "_")),
        selection=selection,
        training_pass="recompute" if variant == "recompute B" else "retained",
        per_device_train_batch_size=batch,
        buffer_multiplier=options.multiplier,
        max_steps=options.steps,
        learning_rate=1e-5,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=options.bf16,
        seed=0,
        modules=options.modules,
        sketch_budget=options.sketch_budget,
        sizing_delta=options.delta,
        seed_check=options.seed_check,
        curvature_refresh_steps=options.refresh,
        target_refresh_steps=options.refresh,
        log_target_loss=False,
    )
    cls = BareTrainer if variant == "bare B" else InfluenceTrainer
    timer = StepTimer()
    trainer = cls(
        model=model, args=args, train_dataset=pool, target_dataset=target, data_collator=CausalCollator(tokenizer)
    )
    trainer.add_callback(timer)
    trainer.train()
    measured, cpu = timer.times[options.skip :], timer.cpu_times[options.skip :]
    return {
        "variant": variant,
        "median_s": statistics.median(measured),
        "median_cpu_s": statistics.median(cpu),
        "mean_cpu_s": statistics.fmean(cpu),
        "startup_cpu_s": sum(timer.cpu_times[: options.skip]),
        "steps": len(measured),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2' (bundled), 'tiny', or a path / Hub id")
    parser.add_argument("--batch", type=int, default=2, help="b: examples trained on per step")
    parser.add_argument("--multiplier", type=int, default=4, help="B = multiplier × b candidates scored per step")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=2, help="first steps left out of the median (start-up)")
    parser.add_argument("--refresh", type=int, default=4, help="curvature and target refresh interval (steps)")
    parser.add_argument("--modules", nargs="+", default=None, help="engine module patterns (default: all)")
    parser.add_argument("--sketch-budget", type=int, default=None)
    parser.add_argument(
        "--delta", type=float, default=InfluenceConfig.delta, help="the sizing rule's δ (1: no log term)"
    )
    parser.add_argument(
        "--seed-check", type=int, default=InfluenceConfig.seed_check, help="0 turns the seed check off"
    )
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--variants", nargs="+", default=["off b", "off B", "bare B", "filter B", "recompute B"])
    parser.add_argument("--out", default="/tmp/bench_trainer")
    parser.add_argument("--json", default=None, help="write the results here")
    options = parser.parse_args()

    parts = build(options.model, options.max_length, rows=options.batch * options.multiplier * (options.steps + 2))
    state = {k: v.clone() for k, v in parts[0].state_dict().items()}
    results = [run(variant, options, state, parts) for variant in options.variants]
    base = next((r["median_cpu_s"] for r in results if r["variant"] == "off B"), None)
    bare = next((r["median_cpu_s"] for r in results if r["variant"] == "bare B"), None)

    print(
        f"\nmodel {options.model}, b={options.batch}, B={options.batch * options.multiplier}, "
        f"max_length {options.max_length}, modules {options.modules or 'all'}, threads {torch.get_num_threads()}"
    )
    header = "| variant | median CPU s/step | / off B | mean CPU s/step | median wall s/step | start-up CPU s |"
    print(header + "\n|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['median_cpu_s'] / base:.3f}" if base else "-"
        print(
            f"| {r['variant']} | {r['median_cpu_s']:.3f} | {ratio} | {r['mean_cpu_s']:.3f} | {r['median_s']:.3f} "
            f"| {r['startup_cpu_s']:.1f} |"
        )
    filtered = next((r["median_cpu_s"] for r in results if r["variant"] == "filter B"), None)
    if base and bare and filtered:
        print(f"engine share (filter B - bare B) / off B = {(filtered - bare) / base:.3f}")
    if options.json:
        Path(options.json).write_text(json.dumps({"options": vars(options), "results": results}, indent=2))


if __name__ == "__main__":
    main()
