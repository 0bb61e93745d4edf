"""Full LoRA training steps on a GPU: tokens/s, peak memory, a profile of where the step goes, and
long-context runs (training.chunk_len), for RWKV-4 and RWKV-7 at published shapes, variants side
by side in one run.

    source .whl/prelude.sh && python -u benchmarks/bench_step.py [--shapes rwkv4-1.6b,rwkv7-1.5b]
        [--variants eager,plain_head,grad_ckpt,autocast] [--profile] [--long-context] [--budget-s 420]
    python benchmarks/bench_step.py --tiny        # CPU: checks the script in seconds

Random weights in bf16 built directly on the device (the speed of a step does not depend on the
values), LoRA r=16 alpha=32 dropout 0 on the version's default targets, AdamW lr 1e-4, random
tokens, ctx 1024. `eager` is the library's default (the fused chunked head + cross-entropy in
training); `plain_head` materialises the logits as transformers does; `grad_ckpt` adds activation
checkpointing; `autocast` wraps the step in bf16 autocast (what the HF Trainer with bf16=True does).
Prints a table last and writes DIR/bench_step.json (DIR: --out, default $OUT or '.').
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import time
from collections import defaultdict

import torch
from peft import LoraConfig, get_peft_model

import rwkv_ft
from rwkv_ft.train import set_chunk_len

# name: (version, layers, width, vocab, batch, extra config)
SHAPES = {
    "rwkv4-1.6b": ("rwkv4", 24, 2048, 65536, 4, {}),
    "rwkv4-7.6b": ("rwkv4", 32, 4096, 65536, 1, {}),
    "rwkv7-1.5b": (
        "rwkv7",
        24,
        2048,
        65536,
        4,
        dict(decay_low_rank=96, a_low_rank=96, v_low_rank=64, gate_low_rank=256),
    ),
    "tiny4": ("rwkv4", 2, 128, 1000, 2, {}),
    "tiny7": ("rwkv7", 2, 128, 1000, 2, dict(head_size=32)),
}
# /work/shared/anchors/README.md (nvidia-h200, 2026-12-02): tok/s, peak GiB of the peers' step.
ANCHORS = {
    "rwkv4-1.6b": ("transformers + peft + BlinkDL CUDA", 23553, 18.7),
    "rwkv4-7.6b": ("transformers + peft + BlinkDL CUDA", 4630, 23.4),
    "rwkv7-1.5b": ("fla RWKV7ForCausalLM + peft", 12750, 19.5),
}
T0 = time.time()


def log(*a) -> None:
    print(*a, flush=True)


def build(shape: str, device: str):
    version, layers, width, vocab, _, extra = SHAPES[shape]
    if version == "rwkv4":
        config = rwkv_ft.Rwkv4Config(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, use_cache=False)
        cls = rwkv_ft.Rwkv4ForCausalLM
    else:
        config = rwkv_ft.Rwkv7Config(
            vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, use_cache=False, **extra
        )
        cls = rwkv_ft.Rwkv7ForCausalLM
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device=device)
    init_on_device(model)
    return model


@torch.no_grad()
def init_on_device(model) -> None:
    """Realistic random values (rwkv_ft.testing.randomize_'s ranges), drawn on the device, bf16
    except the tensors from_pretrained keeps fp32."""
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        fp32 = leaf in ("time_decay", "time_first", "w0")
        p.data = p.data.to(torch.float32 if fp32 else torch.bfloat16)
        if leaf == "time_decay":
            p.uniform_(-4, 2)
        elif leaf == "w0":
            p.uniform_(-6, 2)
        elif leaf.startswith(("time_mix", "x_")) or leaf in ("k_a",):
            p.uniform_(0, 1)
        elif leaf == "k_k":
            p.fill_(0.85)
        elif "ln" in name and leaf == "weight":
            p.fill_(1.0)
        elif "ln" in name and leaf == "bias":
            p.zero_()
        else:
            p.normal_(0, 1 / math.sqrt(p.shape[-1]))


def gib(x: int) -> float:
    return x / 2**30


def run_case(shape, variant, device, ctx, steps, warmup, batch=None, chunk=None, profile=False):
    version, *_, default_batch, _ = SHAPES[shape]
    batch = batch or default_batch
    torch.cuda.empty_cache() if device == "cuda" else None
    model = build(shape, device)
    if variant == "plain_head":
        model.loss_chunk_rows = None
    if variant == "grad_ckpt":
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0))
    set_chunk_len(model, chunk)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, ctx), device=device)
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    before = lora_b.detach().clone()
    use_autocast = variant == "autocast" and device == "cuda"

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        loss = step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    result = {
        "shape": shape,
        "variant": variant,
        "batch": batch,
        "ctx": ctx,
        "chunk_len": chunk,
        "step_s_median": median,
        "tok_s": batch * ctx / median,
        "peak_gib": gib(torch.cuda.max_memory_allocated()) if device == "cuda" else None,
        "loss": float(loss),
        "finite": bool(math.isfinite(float(loss))),
        "lora_moved": bool((lora_b.detach() != before).any()),
    }
    if profile:
        result["profile"] = profile_step(step, device)
    return result  # the model and optimizer go with this frame; main() collects between cases


FAMILIES = [
    ("wkv", ("_fwd_kernel", "_bwd_kernel", "_fwd_fused", "_bwd_fused", "wkv")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90", "xmma", "matmul", "cublas")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("loss/softmax", ("softmax", "cross_entropy", "nll", "logsumexp", "log_softmax")),
    ("norm", ("layer_norm", "group_norm", "norm")),
    ("copy/cast", ("copy", "cast", "to_copy", "convert")),
    ("reduction", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise")),
]


def profile_step(step, device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    wall = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        sync()
    wall = time.perf_counter() - wall
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"] if device == "cuda" else []
    by_family = defaultdict(lambda: [0.0, 0])
    by_name = defaultdict(float)
    for e in kernels:
        name = e.name.lower()
        family = next((f for f, keys in FAMILIES if any(k in name for k in keys)), "other")
        by_family[family][0] += e.device_time / 1e3  # us -> ms
        by_family[family][1] += 1
        by_name[e.name[:90]] += e.device_time / 1e3
    busy = sum(v[0] for v in by_family.values())
    return {
        "wall_ms_profiled": wall * 1e3,
        "gpu_busy_ms": busy,
        "launches": len(kernels),
        "families": {
            f: {"ms": round(ms, 3), "pct": round(100 * ms / busy, 1) if busy else 0, "count": n}
            for f, (ms, n) in sorted(by_family.items(), key=lambda kv: -kv[1][0])
        },  # fmt: skip
        "top": sorted(((round(ms, 3), n) for n, ms in by_name.items()), reverse=True)[:15],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="rwkv4-1.6b,rwkv7-1.5b")
    ap.add_argument("--variants", default="eager,plain_head,grad_ckpt,autocast")
    ap.add_argument("--profile", action="store_true", help="torch.profiler of one eager step per shape")
    ap.add_argument("--long-context", action="store_true", help="batch 1, T up to 131072, chunk 4096")
    ap.add_argument("--long-shapes", default="rwkv7-1.5b,rwkv4-1.6b")
    ap.add_argument("--lengths", default="4096,16384,65536,131072")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    chunk = 4096
    if args.tiny:
        args.shapes, args.long_shapes, args.lengths, args.ctx, args.steps, args.warmup = (
            "tiny4,tiny7", "tiny7,tiny4", "256,1024", 64, 2, 1)  # fmt: skip
        chunk = 128
    results = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if device == "cuda"
               else "cpu", "torch": torch.__version__, "cases": []}  # fmt: skip
    cases = [
        (s, v, None, None, args.profile and v == "eager")
        for s in args.shapes.split(",")
        for v in args.variants.split(",")
    ]
    if args.long_context:
        cases += [
            (s, "eager", int(T), chunk, False) for s in args.long_shapes.split(",") for T in args.lengths.split(",")
        ]
    for shape, variant, T, chunk_len, prof in cases:
        label = f"{shape} {variant}" + (f" T={T} chunk={chunk_len}" if T else "")
        if time.time() - T0 > args.budget_s:
            log(f"{label}: skipped (time budget)")
            results["cases"].append({"shape": shape, "variant": variant, "ctx": T, "skipped": "budget"})
            continue
        try:
            r = run_case(shape, variant, device, T or args.ctx, args.steps if not T else 2, args.warmup if not T else 1,
                         batch=1 if T else None, chunk=chunk_len, profile=prof)  # fmt: skip
            log(
                f"{label}: {r['tok_s']:.0f} tok/s, peak {r['peak_gib']} GiB, loss {r['loss']:.3f}, "
                + f"lora moved {r['lora_moved']}"
            )
            if "profile" in r:
                p = r["profile"]
                log(
                    f"  profile: wall {p['wall_ms_profiled']:.1f} ms, GPU busy {p['gpu_busy_ms']:.1f} ms, "
                    + f"{p['launches']} launches"
                )
                for f, v in p["families"].items():
                    log(f"    {f:14s} {v['ms']:8.2f} ms {v['pct']:5.1f}%  x{v['count']}")
                for ms, name in p["top"]:
                    log(f"    {ms:8.2f} ms  {name}")
        except torch.cuda.OutOfMemoryError:
            r = {"shape": shape, "variant": variant, "ctx": T, "error": "OOM"}
            log(f"{label}: OOM")
        except Exception as exc:  # noqa: BLE001  (one failing case must not end the run)
            r = {"shape": shape, "variant": variant, "ctx": T, "error": f"{type(exc).__name__}: {exc}"[:500]}
            log(f"{label}: FAILED {r['error']}")
        results["cases"].append(r)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_step.json"), "w") as f:
        json.dump(results, f, indent=1)
    log(f"\n{results['device']} {results['date']} torch {results['torch']}; wall {time.time() - T0:.0f} s")
    log("| shape | variant | ctx | tok/s | peak GiB | anchor tok/s, GiB | ours / anchor |")
    log("|---|---|---|---|---|---|---|")
    for r in results["cases"]:
        if "tok_s" not in r:
            log(f"| {r['shape']} | {r['variant']} | {r.get('ctx')} | {r.get('error', r.get('skipped'))} | | | |")
            continue
        anchor = ANCHORS.get(r["shape"]) if not r["chunk_len"] else None
        ratio = f"{r['tok_s'] / anchor[1]:.2f}x" if anchor else ""
        a = f"{anchor[1]}, {anchor[2]}" if anchor else ""
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        log(f"| {r['shape']} | {r['variant']} | {r['ctx']} | {r['tok_s']:.0f} | {peak} | {a} | {ratio} |")


if __name__ == "__main__":
    main()
