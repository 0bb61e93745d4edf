"""Issue 13 on several GPUs: tokens/s, peak memory per GPU, the adapter and the loss curve of the real
training entry point (`rwkv_ft.train.run`) under `accelerate launch`, on random-weight models of
published shapes. benchmarks/bench_multi_gpu.sh runs the whole set; the steps:

    python benchmarks/bench_multi_gpu.py prepare SHAPE WORK         # random bf16 base + long rows, once
    accelerate launch --config_file CONFIG benchmarks/bench_multi_gpu.py train SHAPE WORK NAME RECIPE \\
        [--steps N] [--skip K] [--kill-at STEP] [--resume] [section.key=value ...]
    python benchmarks/bench_multi_gpu.py compare WORK/NAME_A WORK/NAME_B   # adapters, losses, speed

SHAPE: rwkv7-1.5b (L24 D2048), rwkv4-1.6b (L24 D2048), rwkv7-13.3b (L61 D4096), tiny (CPU check).
`train` writes WORK/NAME/bench.json (main process: tokens/s over all GPUs after --skip warm-up
steps, versions, settings) and WORK/NAME/rank<R>.json (each GPU's peak memory); `--kill-at STEP`
kills the last rank at the start of that step (a crashed run, for kill-and-resume; on one GPU the
only one). `compare` prints and writes WORK/compare-<A>-<B>.json: the adapters' largest relative
difference, the loss curves' largest difference, and the tokens/s ratio B/A. Results are also
copied under $OUT when it is set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recipe import Throughput, long_rows  # noqa: E402

SHAPES = {
    "rwkv7-1.5b": ("rwkv7_ft", 24, 2048),
    "rwkv4-1.6b": ("rwkv4", 24, 2048),
    "rwkv7-13.3b": ("rwkv7_ft", 61, 4096),
    "tiny": ("rwkv7_ft", 2, 64),
}


def prepare(shape: str, work: Path, rows: int) -> None:
    """WORK/base-SHAPE (random weights, bf16 on a GPU) and WORK/data.jsonl (Alpaca rows whose answers
    are joined until they fill long contexts), each built once."""
    from rwkv_ft.models.architecture import architecture_for_model_type

    work.mkdir(parents=True, exist_ok=True)
    base = work / f"base-{shape}"
    if not (base / "config.json").exists():
        model_type, layers, width = SHAPES[shape]
        arch = architecture_for_model_type(model_type)
        config = arch.config_class(vocab_size=65536, hidden_size=width, num_hidden_layers=layers)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        with torch.device(device):
            model = arch.model_class(config).to(torch.bfloat16)
        model.save_pretrained(base)
        del model
    if not (work / "data.jsonl").exists():
        long_rows(work / "data.jsonl", rows=rows, answers_per_row=240)
    print(f"prepared {base} and {work / 'data.jsonl'}")


class KillAt:
    """Kills the last rank (SIGKILL) when training step `step` begins: a crashed run."""

    def __init__(self, step: int):
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                last = int(os.environ.get("WORLD_SIZE", "1")) - 1
                if state.global_step + 1 == step and int(os.environ.get("RANK", "0")) == last:
                    os.kill(os.getpid(), signal.SIGKILL)

        self.callback = Callback()


def train(args: argparse.Namespace) -> int:
    from rwkv_ft.recipe import load_recipe
    from rwkv_ft.train import run

    out = args.work / args.name
    recipe = load_recipe(
        args.recipe,
        [
            f"model.path={args.work / f'base-{args.shape}'}",
            "model.config=null",
            f"data.path={args.work / 'data.jsonl'}",
            "data.eval_fraction=null",
            "data.pack=false",
            f"training.output_dir={out}",
            f"training.max_steps={args.steps}",
            f"training.save_steps={args.save_steps}",
            "training.grad_accum=1",
            "training.logging_steps=1",
            "training.save_total_limit=null",
            "merge.enabled=false",
            "generate.prompt=null",
            *args.overrides,
        ],
    )
    meter = Throughput(args.skip)
    callbacks = [meter] + ([KillAt(args.kill_at).callback] if args.kill_at else [])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    summary = run(recipe, resume=args.resume, callbacks=callbacks)
    rank = int(os.environ.get("RANK", "0"))
    gpu = torch.cuda.is_available()
    memory = {
        "rank": rank,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if gpu else None,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(memory, indent=2))
    if rank == 0:
        result = {
            "name": args.name,
            "shape": args.shape,
            "recipe": str(args.recipe),
            "overrides": args.overrides,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "accelerate_config": os.environ.get("BENCH_CONFIG"),
            "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name() if gpu else "cpu",
            "versions": versions(),
            "batch_per_gpu": recipe.training.batch_size,
            "max_length": recipe.data.max_length,
            "steps": summary["steps"],
            "resumed_from_step": summary["resumed_from_step"],
            "train_loss": summary["train_loss"],
            **(meter.result() if meter.started is not None else {}),
        }
        (out / "bench.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        copy_out(out)
    return 0


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "triton", "transformers", "peft", "accelerate", "deepspeed", "rwkv_ft"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def copy_out(run_dir: Path) -> None:
    if os.environ.get("OUT"):
        target = Path(os.environ["OUT"]) / run_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for name in ("bench.json", "rank0.json", "rank1.json"):
            if (run_dir / name).exists():
                shutil.copy(run_dir / name, target / name)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> logged train loss, from the last checkpoint's trainer_state.json."""
    from rwkv_ft.train import complete_checkpoints

    state = json.loads((complete_checkpoints(run_dir)[-1] / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def compare(a: Path, b: Path) -> int:
    from safetensors.torch import load_file

    first, second = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (a, b))
    worst = max(
        ((first[k].float() - second[k].float()).norm() / first[k].float().norm().clamp_min(1e-12)).item() for k in first
    )
    curve_a, curve_b = losses(a), losses(b)
    steps = sorted(set(curve_a) & set(curve_b))
    speed = [json.loads((d / "bench.json").read_text()).get("tokens_per_s") for d in (a, b)]
    result = {
        "a": a.name,
        "b": b.name,
        "adapter_max_relative_difference": worst,
        "loss_max_abs_difference": max(abs(curve_a[s] - curve_b[s]) for s in steps) if steps else None,
        "loss_steps_compared": len(steps),
        "tokens_per_s": speed,
        "speedup_b_over_a": speed[1] / speed[0] if all(speed) else None,
    }
    path = a.parent / f"compare-{a.name}-{b.name}.json"
    path.write_text(json.dumps(result, indent=2))
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    print(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare")
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("work", type=Path)
    p.add_argument("--rows", type=int, default=600)
    t = commands.add_parser("train")
    t.add_argument("shape", choices=sorted(SHAPES))
    t.add_argument("work", type=Path)
    t.add_argument("name")
    t.add_argument("recipe", type=Path)
    t.add_argument("overrides", nargs="*")
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--skip", type=int, default=5, help="warm-up steps left out of tokens/s")
    t.add_argument("--save-steps", type=int, default=100000)
    t.add_argument("--kill-at", type=int, default=None)
    t.add_argument("--resume", action="store_true")
    c = commands.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args, extra = parser.parse_known_args(argv)  # recipe overrides may follow the options too
    if extra and (args.command != "train" or not all("=" in item for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "train":
        args.overrides = [*args.overrides, *extra]
    if args.command == "prepare":
        prepare(args.shape, args.work, args.rows)
        return 0
    if args.command == "compare":
        return compare(args.a, args.b)
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
