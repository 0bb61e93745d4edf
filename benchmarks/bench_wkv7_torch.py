"""Time RWKV-7's PyTorch WKV paths where there is no Triton kernel (CPU): the per-token reference
against the 16-token chunked form, the operator alone and inside a LoRA training step.

    python benchmarks/bench_wkv7_torch.py [--device cpu] [--steps 3] [--out DIR]

Operator: fp32 forward + backward, median of --steps, and the bytes autograd keeps for the backward.
Model: a RWKV-7 0.1B-shaped model (L12 D768, random weights, fp32), LoRA r=16, batch 1, one
forward + backward at each length, through `wkv7(backend="torch")` with its dispatch forced to one
path or the other. Prints a table; writes DIR/bench_wkv7_torch.json (DIR: $OUT or '.').
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import rwkv_ft
from rwkv_ft.kernels import wkv7_chunked, wkv7_reference
from rwkv_ft.testing import autograd_saved_bytes, wkv7_inputs

OP_SHAPES = [(1, 1024, 12, 64), (4, 512, 4, 64), (1, 4096, 4, 32)]
MODEL_LENGTHS = [256, 1024]
# RWKV-7 G1 0.1B: L12 D768, head size 64, low ranks (decay, a, v, gate) 64, 64, 32, 128
MODEL_CONFIG = dict(
    hidden_size=768,
    num_hidden_layers=12,
    vocab_size=65536,
    decay_low_rank=64,
    a_low_rank=64,
    v_low_rank=32,
    gate_low_rank=128,
    use_cache=False,
)
_DISPATCH = sys.modules["rwkv_ft.kernels.rwkv7.wkv7"]  # the module (the package's `wkv7` is the function)


def median_seconds(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def op_case(shape, device, steps) -> dict:
    xs = [x.requires_grad_() for x in wkv7_inputs(*shape, device=device)]

    def step(fn):
        y, s = fn(*xs[:6], xs[6])
        (y.sum() + s.sum()).backward()

    row = {"shape": shape}
    for name, fn in (("reference", wkv7_reference), ("chunked", wkv7_chunked)):
        row[f"{name}_s"] = median_seconds(lambda fn=fn: step(fn), steps)
        row[f"{name}_saved_mib"] = autograd_saved_bytes(fn, *xs) / 2**20
    row["speedup"] = row["reference_s"] / row["chunked_s"]
    return row


def model_case(T, device, steps) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = rwkv_ft.Rwkv7ForCausalLM(rwkv_ft.Rwkv7Config(**MODEL_CONFIG)).to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0)).train()
    ids = torch.randint(1, MODEL_CONFIG["vocab_size"], (1, T), device=device)

    def step():
        model(ids, labels=ids).loss.backward()

    row = {"T": T}
    for name, threshold in (("reference", 10**9), ("chunked", _DISPATCH.CHUNK)):
        saved = _DISPATCH.CHUNK
        _DISPATCH.CHUNK = threshold  # the dispatch's length threshold: 10**9 keeps the token walk
        try:
            row[f"{name}_s"] = median_seconds(step, steps)
        finally:
            _DISPATCH.CHUNK = saved
    row["speedup"] = row["reference_s"] / row["chunked_s"]
    row["tok_s_chunked"] = T / row["chunked_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    out = {
        "date": datetime.date.today().isoformat(),
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "op": [op_case(shape, args.device, args.steps) for shape in OP_SHAPES],
    }
    for row in out["op"]:
        print(
            f"op {row['shape']}: reference {row['reference_s']:.3f} s, chunked {row['chunked_s']:.3f} s "
            f"({row['speedup']:.1f}x); kept for the backward {row['reference_saved_mib']:.0f} -> "
            f"{row['chunked_saved_mib']:.0f} MiB",
            flush=True,
        )
    out["model"] = []
    for T in MODEL_LENGTHS:
        row = model_case(T, args.device, args.steps)
        out["model"].append(row)
        print(
            f"model 0.1B LoRA step, T={T}: reference {row['reference_s']:.2f} s, chunked {row['chunked_s']:.2f} s "
            f"({row['speedup']:.1f}x, {row['tok_s_chunked']:.0f} tok/s)",
            flush=True,
        )
    path = Path(args.out) / "bench_wkv7_torch.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
