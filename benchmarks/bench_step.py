"""Full LoRA training steps on a GPU, the variants of issue 11 side by side in one run: tokens/s,
peak memory and compile time per (shape, variant), the HF Trainer path next to the bare loop, a
profile of where a step goes, and long-context runs (training.chunk_len).

    source .whl/prelude.sh && python -u benchmarks/bench_step.py [--profile] [--budget-s 330]
        [--shapes rwkv4-1.6b,rwkv7-1.5b,rwkv4-7.6b] [--variants baseline,eager,compile,...] [--long-context]
    python benchmarks/bench_step.py --tiny        # CPU: every variant on tiny models, in seconds

Random weights in bf16 built on the device (a step's speed does not depend on the values), LoRA
r=16 alpha=32 dropout 0 on the version's default targets, AdamW (fused) lr 1e-4, random tokens,
ctx 1024. Variants (all bf16 weights, no autocast):
  baseline           eager, peft's stock LoRA forward (fp32 adapter compute: the state before issue 11)
  eager              eager, LoRA in bf16 with fp32 master weights (the library's default now)
  eager_selective    eager + selective recompute
  compile            + model.compile_blocks() (inductor, fullgraph, per block)
  compile_selective  + selective recompute (large matmul outputs kept, the rest recomputed)
  compile_ckpt       + whole-block activation checkpointing
  plain_head         compile, with the logits materialised and transformers' loss (no chunked head)
  recipe             the real entry point (rwkv_ft.train.run: data pipeline, HF Trainer, clipping,
                     NaN checks) at the compile_selective settings, on rows filled to ctx
  recipe_shipped     the same with the shipped recipe's own settings (LoRA dropout 0.05, whole-block
                     checkpointing, no compile) - the issue's 10.6k tok/s path
Cases run in the order given until --budget-s is spent (model build and compilation included), so
the most important come first; skipped cases are listed. Each case reports the median step time
of --steps timed steps after --warmup, peak memory (allocated, after the warm-up), and the first
step's extra time (compilation, autotuning, allocator growth) separately. --profile adds, for the
--profile-variants, one profiled step: GPU time by kernel family, kernel launches, GPU busy time
(union of kernel intervals) and the CPU gap (wall time the GPU sat idle).
Prints a markdown table last and writes DIR/bench_step.json (DIR: --out, default $OUT or '.').
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import math
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import rwkv_ft
from rwkv_ft.adapters.fast_lora import enable_fast_lora
from rwkv_ft.testing import relative_error
from rwkv_ft.train import collector_paused, set_chunk_len

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
    # RWKV-7 7.2B (G1 7.2B: L32 D4096), for the NF4 long-context case
    "rwkv7-7.2b": (
        "rwkv7",
        32,
        4096,
        65536,
        1,
        dict(decay_low_rank=128, a_low_rank=128, v_low_rank=96, gate_low_rank=480),
    ),
    "tiny4": ("rwkv4", 2, 128, 65536, 2, {}),
    "tiny7": ("rwkv7", 2, 128, 1000, 2, dict(head_size=32)),
}
# /work/shared/anchors/README.md (nvidia-h200, 2026-12-02): tok/s, peak GiB of the peers' step.
ANCHORS = {
    "rwkv4-1.6b": ("transformers + peft + BlinkDL CUDA", 23553, 18.7),
    "rwkv4-7.6b": ("transformers + peft + BlinkDL CUDA", 4630, 23.4),
    "rwkv7-1.5b": ("fla RWKV7ForCausalLM + peft", 12750, 19.5),
}
# Issue 11's goals: tok/s, peak GiB.
GOALS = {"rwkv4-1.6b": (59000, 9.4), "rwkv4-7.6b": (11600, 16.0), "rwkv7-1.5b": (32000, 10.0)}
VARIANTS = {
    # name: (fast LoRA, compile, recompute, chunked head)
    "baseline": (False, False, "none", True),
    "eager": (True, False, "none", True),
    "eager_selective": (True, False, "selective", True),
    "compile": (True, True, "none", True),
    "compile_selective": (True, True, "selective", True),
    "compile_ckpt": (True, True, "full", True),
    "plain_head": (True, True, "none", False),
}
CKPT_GRAPHS = ["adapter.dropout=0.0", "training.compile=reduce-overhead", "training.gradient_checkpointing=true"]
RECIPE_VARIANTS = {
    # name: (recipe overrides, the bare-loop variant it is compared with)
    "recipe": (
        ["adapter.dropout=0.0", "training.compile=true", "training.gradient_checkpointing=selective"],
        "compile_selective",
    ),
    "recipe_shipped": ([], None),
    # the recipe path with CUDA graphs of each block (training.compile: reduce-overhead); compare with the
    # bare loop's compile_selective under --compile-mode reduce-overhead
    "recipe_graphs": (
        ["adapter.dropout=0.0", "training.compile=reduce-overhead", "training.gradient_checkpointing=selective"],
        "compile_selective",
    ),
    # whole-block checkpointing with CUDA graphs of each block (the 7.6B setting; --selective-blocks k turns
    # the last k blocks selective, as training.selective_blocks does); compare with the bare loop's
    # compile_ckpt under --compile-mode reduce-overhead
    "recipe_ckpt_graphs": (CKPT_GRAPHS, "compile_ckpt"),
    # the same with the gradient clipping the Trainer did before the twenty-fourth session (accelerate's
    # clip_grad_norm_ over the trained parameters: a Python-level call per tensor); see ACCELERATE_CLIP
    "recipe_ckpt_graphs_accelerate_clip": (CKPT_GRAPHS, "recipe_ckpt_graphs"),
    # long context on a 4-bit base (issue 12: RWKV-7 7.2B NF4 LoRA at 65,536 tokens in 24 GiB): whole-block
    # recompute inside each chunk, eager blocks; the sample length is the job's T
    "recipe_nf4_long": (
        [
            "adapter.dropout=0.0",
            "model.quantization=nf4",
            "training.compile=false",
            "training.gradient_checkpointing=true",
            "training.chunk_len=4096",
        ],
        None,
    ),  # fmt: skip
    # the recipe path with the batches prepared by two loader processes (ahead of the GPU)
    "recipe_workers": (
        [
            "adapter.dropout=0.0",
            "training.compile=true",
            "training.gradient_checkpointing=selective",
            "training.dataloader_workers=2",
        ],
        "compile_selective",
    ),  # fmt: skip
}
DEFAULT_CASES = (
    "rwkv4-1.6b:baseline,eager,compile,compile_selective,recipe,compile_ckpt,plain_head;"
    "rwkv7-1.5b:baseline,eager,compile,compile_selective;"
    "rwkv4-7.6b:eager,compile,compile_selective,compile_ckpt;"
    "rwkv4-1.6b:eager_selective,recipe_shipped"
)
TINY_CASES = (
    "tiny4:baseline,eager,eager_selective,compile,compile_selective,compile_ckpt,plain_head,recipe,recipe_shipped;"
    "tiny7:baseline,compile_selective"
)
# --tiny: the CPU path is the WKV reference, unrolled over T when compiled: short sequences (the
# recipe path needs rows long enough to hold an Alpaca prompt).
TINY_CTX = {"recipe": 24}
T0 = time.time()


def log(*a) -> None:
    print(*a, flush=True)


def build(shape: str, device: str):
    version, layers, width, vocab, _, extra = SHAPES[shape]
    if version == "rwkv4":
        config = rwkv_ft.Rwkv4Config(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, use_cache=False)
        cls = rwkv_ft.Rwkv4ForCausalLM
    else:
        config = rwkv_ft.Rwkv7Config(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, use_cache=False)
        cls = rwkv_ft.Rwkv7ForCausalLM
    for key, value in extra.items():
        setattr(config, key, value)
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


def fresh_dir(stem: Path) -> Path:
    """stem, or stem-2, stem-3, ... if taken: a case named twice in --cases gets a run of its own."""
    path, n = stem, 1
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}-{n}")
    return path


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bare_model(shape: str, variant: str, device: str, compile_kwargs: dict, selective_blocks: int = 0):
    """selective_blocks: under whole-block checkpointing, that many last blocks recompute selectively."""
    fast, compiled, recompute, chunked_head = VARIANTS[variant]
    model = build(shape, device)
    if not chunked_head:
        model.loss_chunk_rows = None
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0))
    if fast:
        enable_fast_lora(model)
    model.set_activation_recompute(recompute, selective_blocks=selective_blocks if recompute == "full" else 0)
    if compiled:
        model.compile_blocks(**compile_kwargs)
    return model.train()


def bare_step(model, device: str, batch: int, ctx: int, step_graph: bool = False):
    """The bare loop's training step on one fixed random batch: forward, backward, AdamW (fused on CUDA).
    With `step_graph` the forward and backward replay from one CUDA graph (`rwkv_ft.step_graph`); the
    step then has `.graphs` (the StepGraphs) and `.ids`."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    ids = torch.randint(1, model.config.vocab_size, (batch, ctx), device=device)
    graphs = None
    if step_graph:
        from rwkv_ft.step_graph import StepGraphs

        graphs = StepGraphs(lambda inputs: model(**inputs).loss, params, vocab_size=model.config.vocab_size)

    def step():
        with collector_paused():  # as rwkv_ft.train's steps
            if graphs is not None:
                loss = graphs({"input_ids": ids, "labels": ids})
            else:
                loss = model(ids, labels=ids).loss
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step.graphs, step.ids = graphs, ids
    return step


def step_graph_check(model, step) -> dict:
    """The replayed micro-step against eager ones on the same new batch (same compiled blocks): the
    losses, and per gradient tensor the relative difference replayed vs eager next to eager vs eager
    (the run-to-run noise of the same code: the WKV kernels' look-back and cuBLAS's split-K are not
    bitwise repeatable). Reports the worst tensor of each and the difference over all tensors."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ids = torch.randint_like(step.ids, 1, model.config.vocab_size)

    def grads_of(run) -> tuple[float, list[torch.Tensor]]:
        for _, p in named:
            p.grad = None
        loss = run()
        grads = [p.grad.float().clone() for _, p in named]
        for _, p in named:
            p.grad = None
        return float(loss), grads

    def eager():
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach()

    replayed_loss, replayed = grads_of(lambda: step.graphs({"input_ids": ids, "labels": ids}))
    eager_loss, first = grads_of(eager)
    _, second = grads_of(eager)

    def compare(a, b) -> dict:
        each = [relative_error(x, y) for x, y in zip(a, b)]
        worst = max(range(len(each)), key=each.__getitem__)
        overall = relative_error(torch.cat([x.flatten() for x in a]), torch.cat([y.flatten() for y in b]))
        return {"overall": overall, "worst": each[worst], "worst_tensor": named[worst][0]}

    return {
        "loss_replayed": replayed_loss,
        "loss_eager": eager_loss,
        "replayed_vs_eager": compare(replayed, first),
        "eager_vs_eager": compare(second, first),
    }


def run_case(
    shape, variant, device, ctx, steps, warmup, compile_kwargs, batch=None, chunk=None, profile=False, step_graph=False,
    selective_blocks=0,
):  # fmt: skip
    batch = batch or SHAPES[shape][4]
    model = bare_model(shape, variant, device, compile_kwargs, selective_blocks)
    set_chunk_len(model, chunk)
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    before = lora_b.detach().clone()
    step = bare_step(model, device, batch, ctx, step_graph=step_graph)

    warm_times = []
    for _ in range(warmup):
        t = time.perf_counter()
        loss = step()
        sync(device)
        warm_times.append(time.perf_counter() - t)
    check = step_graph_check(model, step) if step_graph else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t)
    median = sorted(times)[len(times) // 2]
    result = {
        "shape": shape,
        "variant": variant,
        "batch": batch,
        "ctx": ctx,
        "chunk_len": chunk,
        "step_s_median": median,
        "step_s_all": times,
        "tok_s": batch * ctx / median,
        "first_step_extra_s": warm_times[0] - median if warm_times else None,  # compilation, autotuning
        "peak_gib": gib(torch.cuda.max_memory_allocated()) if device == "cuda" else None,
        "reserved_gib": gib(torch.cuda.max_memory_reserved()) if device == "cuda" else None,
        "loss": float(loss.detach()),
        "finite": bool(math.isfinite(float(loss.detach()))),
        "lora_moved": bool((lora_b.detach() != before).any()),
        "step_graph": check,
    }
    if profile:
        result["profile"] = profile_step(step, device)
    return result  # the model and optimizer go with this frame; main() collects between cases


# --------------------------------------------------------------------------------------------------
# The recipe path (rwkv_ft.train.run: data pipeline, Trainer), on the same shapes


class StepTimer:
    """A Trainer callback: wall time and tokens of `count` steps after the first `skip`, stopped at
    the end of the last of them (not after the final save); with `profile`, one more step runs
    under torch.profiler (from on_step_begin: the data loading before it is not in the profile)."""

    def __init__(self, skip: int, count: int, device: str, profile: bool = False):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                timer.first_started = time.perf_counter()

            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == 1:
                    timer.first_step_s = time.perf_counter() - timer.first_started
                if state.global_step == timer.skip:
                    sync(device)
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    timer.started, timer.tokens0 = time.perf_counter(), state.num_input_tokens_seen
                if profile and state.global_step == timer.skip + timer.count:
                    timer.profiler = Profiler(device)

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == timer.skip + timer.count:
                    sync(device)
                    timer.seconds = time.perf_counter() - timer.started
                    timer.tokens = state.num_input_tokens_seen - timer.tokens0
                if timer.profiler is not None and state.global_step == timer.skip + timer.count + 1:
                    timer.profile = timer.profiler.stop()

        self.skip, self.count, self.callback = skip, count, Callback()
        self.started = self.first_started = self.first_step_s = self.seconds = None
        self.profiler = self.profile = None


ACCELERATE_CLIP = {"recipe_ckpt_graphs_accelerate_clip"}


@contextlib.contextmanager
def trainer_clipping_with_accelerate(enabled: bool):
    """While on, rwkv_ft.train's Trainer clips as accelerate does (the baseline of its own clip)."""
    import rwkv_ft.train as train_module

    make = train_module._make_trainer_class
    if enabled:

        def make_with_accelerate_clip():
            class AccelerateClip(make()):
                def _clip_grad_norm(self, model):
                    return self.accelerator.clip_grad_norm_(self.trained_parameters(), self.args.max_grad_norm)

            return AccelerateClip

        train_module._make_trainer_class = make_with_accelerate_clip
    try:
        yield
    finally:
        train_module._make_trainer_class = make


def recipe_variant(variant: str, selective_blocks: int = 0) -> tuple[list[str], str | None]:
    """A recipe variant's overrides, with `training.selective_blocks` where it checkpoints whole blocks,
    and the bare-loop variant it is compared with."""
    overrides, compared_with = RECIPE_VARIANTS[variant]
    if selective_blocks and "training.gradient_checkpointing=true" in overrides:
        overrides = [*overrides, f"training.selective_blocks={selective_blocks}"]
    return overrides, compared_with


def run_recipe_case(
    shape, variant, device, ctx, steps, warmup, work: Path, profile: bool = False, selective_blocks: int = 0
) -> dict:
    """rwkv_ft.train.run on a random bf16 model of `shape` saved to disk, rows filled to `ctx`;
    `selective_blocks` applies to the variants with whole-block checkpointing."""
    from bench_recipe import long_rows

    from rwkv_ft.recipe import load_recipe
    from rwkv_ft.train import run

    version, *_, batch, _ = SHAPES[shape]
    base = work / f"base-{shape}"
    if not base.exists():
        build(shape, device).save_pretrained(base)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()  # the run's reserved memory is measured without the built model's blocks
    recipe_file = Path(__file__).resolve().parents[1] / "recipes" / f"{version}_alpaca_lora.yaml"
    total = warmup + steps + int(profile)
    # rows whose prompt does not fit in ctx are skipped by the data pipeline: room for that
    data = long_rows(work / f"rows-{ctx}.jsonl", rows=4 * total * batch, answers_per_row=max(ctx // 16, 3))
    overrides, compared_with = recipe_variant(variant, selective_blocks)
    recipe = load_recipe(
        recipe_file,
        [
            f"model.path={base}", "model.dtype=bf16", "tokenizer=world", f"data.path={data}",
            f"data.max_length={ctx}", "data.eval_fraction=null", "data.pack=false",
            f"training.output_dir={fresh_dir(work / f'out-{shape}-{variant}')}", f"training.max_steps={total}",
            f"training.batch_size={batch}", "training.grad_accum=1", "training.lr=1e-4",
            "training.schedule=constant", "training.warmup_ratio=0", "training.save_steps=100000",
            f"training.logging_steps={total}", "merge.enabled=false", "generate.prompt=null",
            *overrides,
        ],
    )  # fmt: skip
    timer = StepTimer(warmup, steps, device, profile)
    with trainer_clipping_with_accelerate(variant in ACCELERATE_CLIP):
        summary = run(recipe, callbacks=[timer.callback])
    median = timer.seconds / steps
    result = {
        "shape": shape,
        "variant": variant,
        "compared_with": compared_with,
        "batch": batch,
        "ctx": ctx,
        "chunk_len": None,
        "overrides": overrides,
        "step_s_median": median,  # the mean over the timed steps: the Trainer gives no per-step times
        "tok_s": timer.tokens / timer.seconds,
        "first_step_extra_s": timer.first_step_s - median if timer.first_step_s else None,
        "peak_gib": gib(torch.cuda.max_memory_allocated()) if device == "cuda" else None,
        "reserved_gib": gib(torch.cuda.max_memory_reserved()) if device == "cuda" else None,
        "loss": summary["train_loss"],
        "finite": bool(math.isfinite(summary["train_loss"])),
        "lora_moved": True,
    }
    if timer.profile is not None:
        result["profile"] = timer.profile
    return result


# --------------------------------------------------------------------------------------------------
# Profile


FAMILIES = [
    ("wkv", ("_fwd_kernel", "_bwd_kernel", "_fwd_fused", "_bwd_fused", "wkv")),
    ("fused (inductor)", ("triton_poi", "triton_red", "triton_per", "triton_tem")),
    ("matmul fp32", ("f32f32", "sgemm", "tf32", "gemm_f32")),
    ("matmul bf16/fp16", ("gemm", "cutlass", "nvjet", "xmma", "matmul", "cublas")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("loss/softmax", ("softmax", "cross_entropy", "nll", "logsumexp", "log_softmax")),
    ("norm", ("layer_norm", "group_norm", "norm")),
    ("copy/cast", ("copy", "cast", "to_copy", "convert")),
    ("reduction", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise")),
]


def family_of(name: str) -> str:
    name = name.lower()
    return next((f for f, keys in FAMILIES if any(k in name for k in keys)), "other")


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals in us, as ms."""
    total, end = 0.0, -math.inf
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1e3


class Profiler:
    """torch.profiler around what runs between construction and `stop()`."""

    def __init__(self, device: str):
        from torch.profiler import ProfilerActivity, profile

        self.device = device
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        sync(device)
        self.prof = profile(activities=activities, acc_events=True)
        self.prof.__enter__()
        self.wall = time.perf_counter()

    def stop(self) -> dict:
        sync(self.device)
        wall = (time.perf_counter() - self.wall) * 1e3
        self.prof.__exit__(None, None, None)
        return summarize(self.prof.events(), wall, self.device)


def profile_step(step, device) -> dict:
    profiler = Profiler(device)
    step()
    return profiler.stop()


def summarize(events, wall: float, device: str) -> dict:
    """GPU time by kernel family, launches, GPU busy time and the CPU gap of a profiled span."""
    kernels = [e for e in events if e.device_type.name == "CUDA"] if device == "cuda" else []
    by_family = defaultdict(lambda: [0.0, 0])
    by_name = defaultdict(float)
    intervals = []
    for e in kernels:
        family = family_of(e.name)
        by_family[family][0] += e.device_time / 1e3  # us -> ms
        by_family[family][1] += 1
        by_name[e.name[:90]] += e.device_time / 1e3
        intervals.append((e.time_range.start, e.time_range.end))
    summed = sum(v[0] for v in by_family.values())
    busy = busy_ms(intervals)
    cpu_ops = defaultdict(int)
    for e in events:
        if e.device_type.name == "CPU" and e.name.startswith("aten::"):
            cpu_ops[e.name] += 1
    return {
        "wall_ms_profiled": wall,
        "gpu_kernel_ms_summed": summed,
        "gpu_busy_ms": busy,
        "cpu_gap_ms": max(wall - busy, 0.0) if kernels else None,  # the GPU idle, waiting for the host
        "launches": len(kernels),
        "families": {
            f: {"ms": round(ms, 3), "pct": round(100 * ms / summed, 1) if summed else 0, "count": n}
            for f, (ms, n) in sorted(by_family.items(), key=lambda kv: -kv[1][0])
        },  # fmt: skip
        "top": sorted(((round(ms, 3), n) for n, ms in by_name.items()), reverse=True)[:15],
        "aten_calls": sum(cpu_ops.values()),
        "aten_top": sorted(((c, n) for n, c in cpu_ops.items()), reverse=True)[:12],
    }


def log_profile(p: dict) -> None:
    gap = f"{p['cpu_gap_ms']:.1f}" if p["cpu_gap_ms"] is not None else "-"
    log(
        f"  profile: wall {p['wall_ms_profiled']:.1f} ms, GPU busy {p['gpu_busy_ms']:.1f} ms "
        f"(kernels summed {p['gpu_kernel_ms_summed']:.1f}), CPU gap {gap} ms, {p['launches']} launches, "
        f"{p['aten_calls']} aten calls"
    )
    for f, v in p["families"].items():
        log(f"    {f:18s} {v['ms']:8.2f} ms {v['pct']:5.1f}%  x{v['count']}")
    for ms, name in p["top"]:
        log(f"    {ms:8.2f} ms  {name}")
    log("    aten calls: " + ", ".join(f"{name.removeprefix('aten::')} {n}" for n, name in p["aten_top"]))


# --------------------------------------------------------------------------------------------------
# Driver


def parse_cases(spec: str) -> list[tuple[str, str]]:
    """ "shape:v1,v2;shape2:v3" -> [(shape, v1), (shape, v2), (shape2, v3)]."""
    cases = []
    for group in filter(None, spec.split(";")):
        shape, variants = group.split(":")
        cases += [(shape.strip(), v.strip()) for v in variants.split(",") if v.strip()]
    for shape, variant in cases:
        if shape not in SHAPES or (variant not in VARIANTS and variant not in RECIPE_VARIANTS):
            raise SystemExit(f"unknown case {shape}:{variant} (shapes: {', '.join(SHAPES)}; variants: "
                             f"{', '.join([*VARIANTS, *RECIPE_VARIANTS])})")  # fmt: skip
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=None, help=f"'shape:variant,...;shape:...' (default: {DEFAULT_CASES})")
    ap.add_argument("--shapes", default=None, help="with --variants: their product instead of --cases")
    ap.add_argument("--variants", default=None)
    ap.add_argument("--profile", action="store_true", help="one profiled step for --profile-variants")
    ap.add_argument("--profile-variants", default="baseline,compile,compile_selective,recipe")
    ap.add_argument("--long-context", action="store_true", help="batch 1, T up to 131072, chunk 4096")
    ap.add_argument("--long-shapes", default="rwkv7-1.5b,rwkv4-1.6b")
    ap.add_argument("--long-variant", default="eager", help="the bare-loop variant of the long-context jobs")
    ap.add_argument("--nf4-long", default=None, help="'shape:T,...': recipe_nf4_long jobs (e.g. rwkv7-7.2b:65536)")
    ap.add_argument("--profile-long", action="store_true", help="one profiled step of each long-context job")
    ap.add_argument("--lengths", default="4096,16384,65536,131072")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--long-steps", type=int, default=2, help="timed steps of each long-context job")
    ap.add_argument("--long-warmup", type=int, default=1, help="warm-up steps of each long-context job (under "
                    "CUDA graphs: 2, the graphs are recorded at a node's second call)")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=330, help="start no case after this many seconds "
                    "(a case takes up to ~90 s: build, compilation, steps)")  # fmt: skip
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --tiny: "
                    "eager: dynamo's fullgraph capture, the graphs run as they are; tests/test_compile.py covers "
                    "AOTAutograd and inductor)")  # fmt: skip
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for the compiled variants (e.g. "
                    "reduce-overhead: CUDA graphs of each block's forward and backward)")  # fmt: skip
    ap.add_argument("--step-graph", action="store_true", help="the bare loop's forward and backward replayed "
                    "from one CUDA graph per step (rwkv_ft.step_graph; training.compile: step-graph), checked "
                    "against an eager micro-step first; blocks compiled without graphs of their own")  # fmt: skip
    ap.add_argument(
        "--selective-blocks",
        type=int,
        default=0,
        help="with whole-block checkpointing (compile_ckpt, recipe_ckpt_graphs), this many last blocks recompute "
        "selectively instead",
    )
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument(
        "--composed-lora",
        action="store_true",
        help="an adapted Linear as torch.addmm(LoRA term, x, W.T) instead of the linear_plus_low_rank op "
        "(the form before 2026-12-06: the A side of that change's A/B)",
    )
    ap.add_argument(
        "--wkv4-config",
        default=None,
        metavar="BLOCK_C,L,WARPS,BWD_L",
        help="force the WKV-4 kernels' config in both directions (512,32,4,64: the rule before 2026-12-06 at "
        "the steps' shapes, the A side of that change's A/B)",
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.wkv4_config:
        import rwkv_ft.kernels.rwkv4.triton_wkv4 as tw

        block_c, L, warps, bwd_L = map(int, args.wkv4_config.split(","))
        tw._CFG_OVERRIDE, tw._BWD_L = (block_c, L, warps), bwd_L
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    chunk = 4096
    if args.tiny:
        args.long_shapes, args.lengths, args.ctx, args.steps, args.warmup = "tiny4", "24", 8, 2, 1
        args.compile_backend = args.compile_backend or "eager"
        chunk = 8
    compile_kwargs = {"backend": args.compile_backend} if args.compile_backend else {}
    if args.compile_mode:
        compile_kwargs["mode"] = args.compile_mode
    if compile_kwargs:  # the recipe path compiles through model.compile_blocks(): the same backend there
        from rwkv_ft.models.modeling_utils import RwkvPreTrainedModelMixin

        compile_blocks = RwkvPreTrainedModelMixin.compile_blocks
        RwkvPreTrainedModelMixin.compile_blocks = lambda self, **kw: compile_blocks(self, **{**compile_kwargs, **kw})
    if args.step_graph and args.compile_mode in ("reduce-overhead", "max-autotune"):
        ap.error("--step-graph records the whole step: the blocks compile without CUDA graphs (no --compile-mode)")
    if args.composed_lora:
        from gpu_lora_op_check import composed

        from rwkv_ft.adapters import fast_lora

        fast_lora.linear_plus_low_rank = composed
    if args.shapes or args.variants:
        shapes = (args.shapes or "rwkv4-1.6b").split(",")
        variants = (args.variants or "baseline,eager,compile,compile_selective").split(",")
        cases = [(s, v) for s in shapes for v in variants]
    else:
        default = TINY_CASES if args.tiny else DEFAULT_CASES
        cases = parse_cases(default if args.cases is None else args.cases)  # --cases "": long context only
    profiled = set(args.profile_variants.split(",")) if args.profile else set()
    results = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "compile_backend": args.compile_backend or "inductor",
        "compile_mode": args.compile_mode,
        "composed_lora": args.composed_lora,
        "step_graph": args.step_graph,
        "selective_blocks": args.selective_blocks,
        "cases": [],
    }
    work = Path(tempfile.mkdtemp(prefix="bench_step_"))
    jobs = [(s, v, None, None) for s, v in cases]
    if args.long_context:
        jobs += [
            (s, args.long_variant, int(T), chunk) for s in args.long_shapes.split(",") for T in args.lengths.split(",")
        ]
    if args.nf4_long:
        nf4_jobs = [item.split(":") for item in args.nf4_long.split(",")]
        jobs = [(s, "recipe_nf4_long", int(T), chunk) for s, T in nf4_jobs] + jobs
    for shape, variant, T, chunk_len in jobs:
        label = f"{shape} {variant}" + (f" T={T} chunk={chunk_len}" if T else "")
        if time.time() - T0 > args.budget_s:
            log(f"{label}: skipped (time budget)")
            results["cases"].append({"shape": shape, "variant": variant, "ctx": T or args.ctx, "skipped": "budget"})
            continue
        started = time.time()
        ctx = T or (TINY_CTX.get(variant.split("_")[0], args.ctx) if args.tiny else args.ctx)
        try:
            if variant in RECIPE_VARIANTS:
                r = run_recipe_case(
                    shape, variant, device, ctx, args.steps if not T else args.long_steps,
                    args.warmup if not T else args.long_warmup, work,
                    variant in profiled, args.selective_blocks,
                )  # fmt: skip
            else:
                case = functools.partial(
                    run_case, shape, variant, device, ctx, args.steps if not T else args.long_steps,
                    args.warmup if not T else args.long_warmup,
                    batch=1 if T else None, chunk=chunk_len,
                    profile=(variant in profiled and not T) or bool(T and args.profile_long),
                    step_graph=args.step_graph and not T, selective_blocks=args.selective_blocks,
                )  # fmt: skip
                try:
                    r = case(compile_kwargs)
                except torch._dynamo.exc.TorchDynamoException as exc:
                    if not VARIANTS[variant][1]:
                        raise
                    # Should a block ever break the graph (a kernel that is not a custom op), measure
                    # with the breaks, and say so.
                    log(f"{label}: fullgraph failed ({type(exc).__name__}: {str(exc)[:200]}); again without")
                    torch._dynamo.reset()
                    gc.collect()
                    r = case({**compile_kwargs, "fullgraph": False})
                    r["fullgraph_error"] = f"{type(exc).__name__}: {exc}"[:500]
            r["case_s"] = time.time() - started
            peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
            log(
                f"{label}: {r['tok_s']:.0f} tok/s, step {1e3 * r['step_s_median']:.1f} ms, peak {peak} GiB, "
                f"first step +{r['first_step_extra_s'] or 0:.1f} s, loss {r['loss']:.3f}, lora moved "
                f"{r['lora_moved']}, case {r['case_s']:.0f} s"
            )
            if "profile" in r:
                log_profile(r["profile"])
        except torch.cuda.OutOfMemoryError:
            r = {"shape": shape, "variant": variant, "ctx": T or args.ctx, "error": "OOM"}
            log(f"{label}: OOM")
        except Exception as exc:  # noqa: BLE001  (one failing case must not end the run)
            r = {
                "shape": shape,
                "variant": variant,
                "ctx": T or args.ctx,
                "error": f"{type(exc).__name__}: {exc}"[:500],
            }
            log(f"{label}: FAILED {r['error']}")
        results["cases"].append(r)
        torch._dynamo.reset()  # each case compiles its own graphs (inductor's on-disk cache still applies)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_step.json"), "w") as f:
        json.dump(results, f, indent=1)
    print_table(results, time.time() - T0)


def print_table(results: dict, wall: float) -> None:
    log(f"\n{results['device']} {results['date']} torch {results['torch']}, compile backend "
        f"{results['compile_backend']}; wall {wall:.0f} s")  # fmt: skip
    log("| shape | variant | ctx | tok/s | step ms | peak GiB | 1st step + s | vs anchor | goal tok/s, GiB | note |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    by_key = {(r["shape"], r["variant"]): r for r in results["cases"] if "tok_s" in r and not r.get("chunk_len")}
    for r in results["cases"]:
        if "tok_s" not in r:
            log(f"| {r['shape']} | {r['variant']} | {r.get('ctx')} | {r.get('error', r.get('skipped'))} | | | | | | |")
            continue
        anchor = ANCHORS.get(r["shape"]) if not r["chunk_len"] else None
        ratio = f"{r['tok_s'] / anchor[1]:.2f}x" if anchor else ""
        goal = GOALS.get(r["shape"]) if not r["chunk_len"] else None
        goal_txt = f"{goal[0]}, {goal[1]}" if goal else ""
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        extra = f"{r['first_step_extra_s']:.1f}" if r.get("first_step_extra_s") is not None else "-"
        note = "graph breaks (fullgraph failed)" if r.get("fullgraph_error") else ""
        if r.get("compared_with") and (r["shape"], r["compared_with"]) in by_key:
            bare = by_key[(r["shape"], r["compared_with"])]
            note = f"{r['tok_s'] / bare['tok_s']:.2f}x {r['compared_with']}"
        ms = 1e3 * r["step_s_median"]
        log(f"| {r['shape']} | {r['variant']} | {r['ctx']} | {r['tok_s']:.0f} | {ms:.1f} | {peak} | {extra} | "
            f"{ratio} | {goal_txt} | {note} |")  # fmt: skip


if __name__ == "__main__":
    main()
