"""Time LoRA fine-tuning of RWKV-4 in bf16, 8-bit and NF4 (bf16 compute), with and without
gradient checkpointing: peak GPU memory and tokens/s per configuration.

    python benchmarks/bench_lora.py          # 1.6B (L24 D2048, batch 4) and 7.6B (L32 D4096, batch 1)
    python benchmarks/bench_lora.py --shapes 1.6b --quant nf4 --grad-ckpt on
    python benchmarks/bench_lora.py --tiny               # a few seconds on CPU, to check the script

Weights are random (the speed and memory of a step do not depend on their values) and built on
the target device: the model is constructed on the meta device and materialised there. For 8-bit
and NF4 the bf16 model is saved once per shape to a temporary directory (--tmp-dir, ~15 GB for
7.6B) and loaded back with `quantization_config`, the way users load real checkpoints, then goes
through `rwkv_ft.quantization.prepare_for_kbit_training` (peft's preparation; the frozen embedding
and head stay bf16).

Each run self-checks: the expected layers are quantized, the loss is finite, the LoRA weights
moved and the frozen weights did not. A failed check exits with status 1; an out-of-memory
configuration is reported as OOM and the others still run. Prints a table and writes
$OUT/bench_lora.json (or --out DIR).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import rwkv_ft  # noqa: F401  (registers the Auto classes and the peft defaults)
from rwkv_ft import Rwkv4Config, Rwkv4ForCausalLM

# name: (layers, width, vocab, default batch)
SHAPES = {"1.6b": (24, 2048, 65536, 4), "7.6b": (32, 4096, 65536, 1), "tiny": (2, 128, 1000, 2)}
QUANTS = ("bf16", "8bit", "nf4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="1.6b,7.6b", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--quant", default=",".join(QUANTS), help="comma-separated, of bf16, 8bit, nf4")
    p.add_argument("--grad-ckpt", default="off,on", help="comma-separated, of off, on")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--batch", type=int, default=None, help="default: 4 for 1.6b, 1 for 7.6b")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tmp-dir", default=None, help="where quantized runs stage the bf16 checkpoint")
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for bench_lora.json (default: $OUT)")
    p.add_argument("--tiny", action="store_true", help="shape 'tiny', ctx 64, 2 timed steps: checks the script on CPU")
    args = p.parse_args(argv)
    if args.tiny:
        args.shapes, args.ctx, args.warmup, args.steps = "tiny", 64, 1, 2
    for name in args.shapes.split(","):
        if name not in SHAPES:
            p.error(f"--shapes: unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    for q in args.quant.split(","):
        if q not in QUANTS:
            p.error(f"--quant: unknown {q!r}; choose from {', '.join(QUANTS)}")
    return args


# --------------------------------------------------------------------------------------------------
# Model construction


def make_config(shape: str) -> Rwkv4Config:
    layers, width, vocab, _ = SHAPES[shape]
    return Rwkv4Config(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, use_cache=False)


@torch.no_grad()
def build_random_model(config: Rwkv4Config, device: str, seed: int = 0) -> Rwkv4ForCausalLM:
    """A bf16 model with random weights, allocated and filled directly on `device` (no CPU init)."""
    with torch.device("meta"):
        model = Rwkv4ForCausalLM(config)
    model.to(torch.bfloat16)
    for block in model.rwkv.blocks:  # the decay parameters stay fp32, as the model keeps them
        for name in ("time_decay", "time_first"):
            setattr(block.att, name, nn.Parameter(getattr(block.att, name).float()))
    model.to_empty(device=device)
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("time_decay"):
            p.uniform_(-4, 2)
        elif name.endswith("time_first"):
            p.normal_()
        elif ".time_mix" in name:
            p.uniform_(0, 1)
        elif ".ln" in name:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            p.normal_(0, 1 / math.sqrt(p.shape[-1]))
    return model.eval()


def load_quantized_copy(staged: Path, quant: str, device: str) -> nn.Module:
    from rwkv_ft.quantization import load_quantized

    mode = {"8bit": "8bit", "nf4": "nf4"}[quant]
    return load_quantized(staged, mode, compute_dtype=torch.bfloat16, dtype=torch.bfloat16, device_map={"": device})


# --------------------------------------------------------------------------------------------------
# One configuration


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gib(n: int) -> float:
    return round(n / 2**30, 3)


def run_one(args, shape: str, quant: str, grad_ckpt: bool, staged: Path | None) -> dict:
    config = make_config(shape)
    batch = args.batch or SHAPES[shape][3]
    device = args.device
    result = {
        "shape": shape,
        "quant": quant,
        "grad_ckpt": grad_ckpt,
        "batch": batch,
        "ctx": args.ctx,
        "rank": args.rank,
    }
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    if quant == "bf16":
        model = build_random_model(config, device)
        if grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = load_quantized_copy(staged, quant, device)
        from rwkv_ft.quantization import prepare_for_kbit_training, quantized_linear_names

        n_quant = len(quantized_linear_names(model))
        if n_quant != 7 * config.num_hidden_layers:
            raise AssertionError(f"{quant}: {n_quant} quantized layers, expected {7 * config.num_hidden_layers}")
        model = prepare_for_kbit_training(model, gradient_checkpointing=grad_ckpt)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    result["trainable_params"] = sum(p.numel() for p in trainable)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad}
    frozen_probe = {
        n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("blocks.0.ln1.weight", "head.weight"))
    }
    opt = torch.optim.AdamW(trainable, lr=args.lr)
    if device.startswith("cuda"):
        result["weights_gib"] = gib(torch.cuda.memory_allocated())
        torch.cuda.reset_peak_memory_stats()

    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, args.ctx), generator=gen).to(device)
    model.train()

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    losses = [step() for _ in range(args.warmup)]
    sync(device)
    start = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    sync(device)
    elapsed = time.perf_counter() - start

    result["tokens_per_s"] = round(batch * args.ctx * args.steps / elapsed, 1)
    result["step_ms"] = round(1000 * elapsed / args.steps, 1)
    result["loss_first"], result["loss_last"] = round(losses[0], 4), round(losses[-1], 4)
    if device.startswith("cuda"):
        result["peak_gib"] = gib(torch.cuda.max_memory_allocated())
    check(model, losses, lora_before, frozen_probe)
    result["check"] = "ok"
    return result


def check(model, losses: list[float], lora_before: dict, frozen_probe: dict) -> None:
    if not all(math.isfinite(x) for x in losses):
        raise AssertionError(f"non-finite loss: {losses}")
    params = dict(model.named_parameters())
    if not any(not torch.equal(params[n], v) for n, v in lora_before.items()):
        raise AssertionError("no LoRA weight changed during training")
    for n, v in frozen_probe.items():
        if not torch.equal(params[n], v):
            raise AssertionError(f"frozen parameter {n} changed")


# --------------------------------------------------------------------------------------------------


def stage_checkpoint(shape: str, args, root: Path) -> Path:
    """Save the bf16 random model of `shape` once, for the quantized loads."""
    path = root / shape
    if not path.exists():
        model = build_random_model(make_config(shape), args.device)
        model.save_pretrained(path)
        del model
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return path


def print_table(results: list[dict]) -> None:
    cols = [
        "shape",
        "quant",
        "grad_ckpt",
        "batch",
        "ctx",
        "tokens_per_s",
        "step_ms",
        "peak_gib",
        "weights_gib",
        "loss_last",
        "check",
    ]
    rows = [[str(r.get(c, "-")) for c in cols] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quants = args.quant.split(",")
    ckpts = [g == "on" for g in args.grad_ckpt.split(",")]
    results, failed = [], False
    root = Path(tempfile.mkdtemp(prefix="bench_lora_", dir=args.tmp_dir))
    try:
        for shape in args.shapes.split(","):
            staged = stage_checkpoint(shape, args, root) if any(q != "bf16" for q in quants) else None
            for quant in quants:
                for grad_ckpt in ckpts:
                    label = f"{shape} {quant} grad_ckpt={'on' if grad_ckpt else 'off'}"
                    print(f"running {label} ...", flush=True)
                    try:
                        results.append(run_one(args, shape, quant, grad_ckpt, staged))
                    except torch.OutOfMemoryError:
                        results.append({"shape": shape, "quant": quant, "grad_ckpt": grad_ckpt, "check": "OOM"})
                    except AssertionError as exc:
                        failed = True
                        results.append(
                            {
                                "shape": shape,
                                "quant": quant,
                                "grad_ckpt": grad_ckpt,
                                "check": f"FAILED: {exc}",
                            }
                        )
                    gc.collect()
                    if args.device.startswith("cuda"):
                        torch.cuda.empty_cache()
            shutil.rmtree(root / shape, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print_table(results)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        env = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
            "torch": torch.__version__,
            "args": vars(args),
        }
        (out / "bench_lora.json").write_text(json.dumps({"env": env, "results": results}, indent=2, default=str))
        print(f"wrote {out / 'bench_lora.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
