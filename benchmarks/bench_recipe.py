"""Run a training recipe end to end on a random-weight model of a published shape; report tokens/s
and peak GPU memory of the real training loop (data pipeline, Trainer, LoRA, WKV kernel).

    python benchmarks/bench_recipe.py recipes/rwkv4_alpaca_lora.yaml --shape 1.6b --steps 40
    python benchmarks/bench_recipe.py recipes/quickstart.yaml --shape tiny --steps 4     # CPU check

The base model is built on the device with random weights and saved once (bf16); the data are the
bundled Alpaca sample, each row's answer lengthened by concatenating sample answers so that rows
reach the recipe's max_length (the reference figures are for full 1024-token rows). Throughput is
measured after `--skip` warm-up steps (kernel compilation, allocator growth). Writes
$OUT/bench_recipe.json when OUT is set; prints a summary line last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

import rwkv_ft
from rwkv_ft.recipe import load_recipe
from rwkv_ft.train import run

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"1.6b": (24, 2048), "7.6b": (32, 4096), "tiny": (2, 64)}


class Throughput(TrainerCallback):
    """Tokens (non-padding) and wall time from the start of step `skip` to the end of the last step
    (not the final save after it)."""

    def __init__(self, skip: int):
        self.skip, self.steps = skip, 0
        self.started = self.ended = None
        self.tokens_at_start = self.tokens_at_end = 0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.skip:
            sync()
            self.started, self.tokens_at_start = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.started is not None and state.global_step == state.max_steps:
            sync()
            self.ended, self.tokens_at_end = time.perf_counter(), state.num_input_tokens_seen
            self.steps = state.global_step - self.skip

    def result(self) -> dict[str, float]:
        if self.ended is None:
            raise SystemExit(f"bench_recipe: the run ended before step {self.skip + 1}; lower --skip")
        elapsed, tokens = self.ended - self.started, self.tokens_at_end - self.tokens_at_start
        return {"timed_steps": self.steps, "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def long_rows(path: Path, rows: int, answers_per_row: int, seed: int = 0) -> Path:
    """Alpaca rows whose outputs are several sample answers joined, so rows fill long contexts."""
    samples = [json.loads(line) for line in (ROOT / "data" / "alpaca_sample.jsonl").read_text().splitlines() if line]
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            row = dict(rng.choice(samples))
            row["output"] = "\n".join(rng.choice(samples)["output"] for _ in range(answers_per_row))
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def build_base(shape: str, directory: Path) -> Path:
    layers, width = SHAPES[shape]
    config = rwkv_ft.Rwkv4Config(vocab_size=65536, hidden_size=width, num_hidden_layers=layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = rwkv_ft.Rwkv4ForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(directory)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the training run's reserved memory is measured without this model's blocks
    return directory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("--shape", default="1.6b", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the throughput")
    p.add_argument("overrides", nargs="*", help="extra recipe overrides")
    args = p.parse_intermixed_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_recipe_"))
    started = time.perf_counter()
    base = build_base(args.shape, work / "base")
    base_seconds = time.perf_counter() - started
    recipe = load_recipe(args.recipe, [])
    data = long_rows(work / "data.jsonl", rows=args.steps * recipe.training.batch_size * 2, answers_per_row=60)
    recipe = load_recipe(
        args.recipe,
        [
            f"model.path={base}",
            "model.config=null",
            f"data.path={data}",
            "data.eval_fraction=null",
            "data.pack=false",
            f"training.output_dir={work / 'out'}",
            f"training.max_steps={args.steps}",
            "training.grad_accum=1",
            "training.save_steps=100000",
            "training.logging_steps=5",
            "merge.enabled=false",
            "generate.prompt=null",
            *args.overrides,
        ],
    )
    meter = Throughput(args.skip)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    summary = run(recipe, callbacks=[meter])
    result = {
        "recipe": args.recipe,
        "shape": args.shape,
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "batch": recipe.training.batch_size,
        "max_length": recipe.data.max_length,
        "precision": recipe.training.precision,
        "gradient_checkpointing": recipe.training.gradient_checkpointing,
        "steps": summary["steps"],
        "train_loss": summary["train_loss"],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
        "base_build_seconds": base_seconds,
        **meter.result(),
    }
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_recipe.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    peak = f"{result['peak_gib']:.1f} GiB" if result["peak_gib"] is not None else "n/a"
    print(
        f"RESULT {args.shape} {args.recipe}: {result['tokens_per_s']:.0f} tokens/s over {result['timed_steps']} steps, "
        f"peak {peak}, loss {result['train_loss']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
