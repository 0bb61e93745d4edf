"""Check and time the RWKV-7 WKV Triton kernel on a CUDA GPU (ours vs fla vs BlinkDL anchors vs floor).

    source .whl/prelude.sh && python -u benchmarks/bench_wkv7.py [--quick] [--profile] [--out DIR]

Order: (1) first-call compile time of forward + backward in a fresh subprocess with an empty
Triton cache (goal < 10 s); (2) correctness on the GPU against the float64 reference: fp32 and bf16,
with state and resets, our relative errors next to the bf16 rounding floor; fla's `chunk_rwkv7`
on the same inputs (when it imports and agrees); the final state after 16384 tokens; extreme w;
(3) medians of triton.testing.do_bench (eager and CUDA-graph), forward and forward+backward, at
the five goal shapes, fla at its anchor shapes, and every variant knob of `triton_wkv7` at three
shapes; (4) a table and DIR/bench_wkv7.json (DIR defaults to $OUT or '.'). One failing case is
recorded and skipped; a time budget keeps the whole run under ~7 minutes.

--baseline-file PATH loads a second copy of the kernel module from PATH (e.g. the main branch's:
`git show main:kernels/rwkv7/triton_wkv7.py > /tmp/base_wkv7.py`) and adds the section "baseline":
both copies at BASELINE_SHAPES in the same process, fwd and fwd+bwd CUDA-graph medians (timed
alternately, best of two each), and both copies' bf16 errors over the rounding floor:

    python -u benchmarks/bench_wkv7.py --sections baseline --baseline-file /tmp/base_wkv7.py
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import rwkv_ft.kernels.rwkv7.triton_wkv7 as tw
import torch
import triton
from triton.testing import do_bench

from rwkv_ft.kernels import wkv7, wkv7_reference
from rwkv_ft.testing import relative_error

DEV = "cuda"  # a module constant so that the script logic can be exercised elsewhere
N = 64
GOAL_SHAPES = [(8, 4096, 32), (4, 4096, 64), (4, 1024, 16), (8, 1024, 64), (1, 16384, 32)]
# /work/shared/anchors/README.md (H200, bf16 fwd+bwd ms): BlinkDL clampw_v3, fla chunk_rwkv7; goal.
ANCHORS = {
    (8, 4096, 32): (7.43, 9.29, 3.0),
    (4, 4096, 64): (7.44, None, 3.0),
    (4, 1024, 16): (1.71, 2.77, 0.7),
    (8, 1024, 64): (3.03, None, 1.2),
    (1, 16384, 32): (27.14, None, 10.0),
}
ACC_SHAPES = [(2, 1024, 4), (1, 4096, 2)]
BASELINE_SHAPES = [(8, 4096, 32), (4, 1024, 16), (8, 1024, 64), (1, 16384, 32)]
# fla at every goal shape, its anchor shapes first (each new shape may autotune again: the budget decides).
FLA_SHAPES = [(8, 4096, 32), (4, 1024, 16), (4, 4096, 64), (8, 1024, 64), (1, 16384, 32)]
VARIANT_SHAPES = [(8, 4096, 32), (4, 1024, 16), (1, 16384, 32)]
# Knobs of triton_wkv7._CFG_OVERRIDE compared at VARIANT_SHAPES (the rule's choice is "default").
VARIANTS = [  # names without spaces or commas: --variants takes a comma list
    ("default", {}),
    ("chunk16", {"chunk": 16}),
    ("chunk32", {"chunk": 32}),
    ("chunk64", {"chunk": 64}),
    ("warps8_grad", {"warps_grad": 8}),
    ("warps8_prep", {"warps_prep": 8}),
    ("warps8_scan", {"warps_scan": 8}),
    ("bv_grad16", {"bv_grad": 16}),
    ("bv_scan64", {"bv_scan": 64}),
    ("bv_scan32", {"bv_scan": 32}),
    ("bv_scan16", {"bv_scan": 16}),
    ("keep_prep", {"keep_prep": True}),
    ("stages1", {"stages_scan": 1}),
    ("stages3", {"stages_scan": 3}),
    ("stages4", {"stages_scan": 4}),
    ("regs168_prep", {"regs_prep": 168}),  # 3 programs per SM instead of 2
    ("regs128_prep", {"regs_prep": 128}),  # 4
    ("regs168_grad", {"regs_grad": 168}),
    ("regs168_scan", {"regs_scan": 168}),
    ("tf32_algebra(inexact)", {"prec": "tf32"}),
    ("tf32x3", {"prec": "tf32x3", "prec_scan": "tf32x3"}),
]
HBM_TBPS = 4.24  # copy rate measured on the H200 (anchors README); re-measured below
BF16_TFLOPS = 790.0
BUDGET_S = 400.0  # the whole run, compiles included
T0 = time.time()


def log(*a):
    print(*a, flush=True)


def left() -> float:
    return BUDGET_S - (time.time() - T0)


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in this (main) thread after `seconds` (first calls that may compile)."""

    def handler(signum, frame):
        raise TimeoutError(f"over {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# Fields every run starts from (e.g. the first config wkv7_gpu_diag.py found working): a JSON file
# named by $WKV7_BASE_CONFIG; variants are applied on top.
BASE = json.load(open(os.environ["WKV7_BASE_CONFIG"])) if os.environ.get("WKV7_BASE_CONFIG") else None
BASE = BASE or {}


@contextlib.contextmanager
def config(fields: dict | None):
    saved = tw._CFG_OVERRIDE
    tw._CFG_OVERRIDE = {**BASE, **(fields or {})} or None
    try:
        yield
    finally:
        tw._CFG_OVERRIDE = saved


def inputs(B, T, H, dtype, *, state=False, resets=0, w=None, seed=0):
    """The model's distribution (as in tests/test_wkv7.py): r, k, v ~ randn, a = -kk,
    b = kk * sigmoid(.), kk unit-norm per head, w = -exp(-0.5) * sigmoid(.) unless given."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, device=DEV, generator=g)
    shape = (B, T, H, N)
    r, k, v = rn(*shape), rn(*shape), rn(*shape)
    kk = torch.nn.functional.normalize(rn(*shape), dim=-1)
    a, b = -kk, kk * torch.sigmoid(rn(*shape))
    if w is None:
        wt = -math.exp(-0.5) * torch.sigmoid(2 * rn(*shape))
    elif w == "mixed":
        wt = -30 * torch.rand(*shape, device=DEV, generator=g)
    else:
        wt = torch.full(shape, float(w), device=DEV)
    s = 0.5 * rn(B, H, N, N) if state else None
    reset = None
    if resets:
        reset = torch.zeros(B, T, dtype=torch.bool, device=DEV)
        idx = torch.randint(0, T, (B, resets), device=DEV, generator=g)
        reset.scatter_(1, idx, True)
        reset[:, 0] = True
    return [x.to(dtype) for x in (r, wt, k, v, a, b)], s, reset


def fwd_bwd(fn, xs, s, reset, gy_dtype, seed=1, leaf_dtype=None):
    """y, new_state and the gradients of sum(y * gy) + sum(new_state * gs) (gy in the inputs'
    dtype, the same values for every implementation). leaf_dtype: the dtype the inputs are
    differentiated in (float64 for the reference, so its gradients are not rounded)."""
    ps = [x.detach().to(leaf_dtype or x.dtype).clone().requires_grad_() for x in xs]
    st = None if s is None else s.detach().to(leaf_dtype or s.dtype).clone().requires_grad_()
    y, ns = fn(*ps, st, reset)
    g = torch.Generator(device=DEV).manual_seed(seed)
    gy = torch.randn(y.shape, device=DEV, generator=g).to(gy_dtype).to(y.dtype)
    gs = torch.randn(ns.shape, device=DEV, generator=g).to(ns.dtype)
    ((y * gy).sum() + (ns * gs).sum()).backward()
    return y, ns, [p.grad for p in ps] + [None if st is None else st.grad]


def ours(*args):
    *xs, s, reset = args
    return wkv7(*xs, s, reset=reset, backend="triton")


def reference64(*args):
    *xs, s, reset = args
    return wkv7_reference(*(x.double() for x in xs), None if s is None else s.double(), reset)


def load_baseline(path: str):
    """A second copy of the kernel module from `path`, under its own module name (its kernels are
    distinct JIT functions: no clash in Triton's caches or in sys.modules)."""
    spec = importlib.util.spec_from_file_location("triton_wkv7_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    mod._CFG_OVERRIDE = BASE or None
    return mod


def module_fn(mod):
    """A differentiable call of a kernel module's host functions (wkv7_fwd / wkv7_bwd, as ops.py
    calls them), with the calling convention of `ours`."""

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, r, w, k, v, a, b, s, reset):
            xs = mod._shared_strides([r, w, k, v, a, b])
            rs = None if reset is None else reset.contiguous().view(torch.uint8)
            cfg = mod._config(*r.shape, r.dtype)
            s0 = None if s is None else s.float().contiguous()
            y, ns, saved = mod.wkv7_fwd(*xs, s0, rs, cfg, True)
            ctx.save_for_backward(*xs, *saved)
            ctx.cfg, ctx.rs, ctx.has_state = cfg, rs, s is not None
            return y, ns

        @staticmethod
        def backward(ctx, gy, gs):
            xs, saved = ctx.saved_tensors[:6], list(ctx.saved_tensors[6:])
            dy = None if gy is None else gy.to(xs[0].dtype).contiguous()
            dsT = None if gs is None else gs.float().contiguous()
            *grads, g_state = mod.wkv7_bwd(*xs, ctx.rs, saved, dy, dsT, ctx.cfg, ctx.has_state)
            return (*grads, g_state, None)

    def run(*args):
        *xs, s, reset = args
        return Fn.apply(*xs, s, reset)

    return run


def fla_fn():
    """fla's chunk_rwkv7 mapped to our conventions (its state is [K, V]: ours transposed), or None."""
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except Exception as e:  # not installed / broken
        log(f"fla: not available ({e!r})")
        return None
    params = inspect.signature(chunk_rwkv7).parameters
    extra = {}
    if "safe_gate" in params:
        extra["safe_gate"] = True  # the anchor's setting (w >= -0.6065 here)
    if "chunk_size" in params:
        extra["chunk_size"] = 64
    wname = "log_w" if "log_w" in params else "w"  # versions differ: `w` is the log decay unless log_w exists
    log(f"fla: chunk_rwkv7{inspect.signature(chunk_rwkv7)}; passing {wname}=w, {extra}")

    def run(r, w, k, v, a, b, s, reset):
        if reset is not None:
            raise ValueError("fla comparison runs without resets")
        s0 = None if s is None else s.transpose(-1, -2).contiguous()
        o, sT = chunk_rwkv7(
            r=r, k=k, v=v, a=a, b=b, scale=1.0, initial_state=s0, output_final_state=True,
            **{wname: w}, **extra,
        )  # fmt: skip
        return o, sT.transpose(-1, -2).float()

    return run


# ----------------------------------------------------------------------------------------------
# (1) compile time


COMPILE_SNIPPET = r"""
import os, time, torch, json
import rwkv_ft.kernels.rwkv7.triton_wkv7 as tw
from rwkv_ft.kernels import wkv7
base = os.environ.get("WKV7_BASE_CONFIG")
tw._CFG_OVERRIDE = (json.load(open(base)) if base else None) or None
out = {}
for B, H in ((8, 32), (4, 16)):  # two goal shapes: 64-row and smaller scan value blocks
    xs = [torch.randn(B, 64, H, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(6)]
    with torch.no_grad():
        xs[1].copy_(-torch.rand_like(xs[1]) * 0.6)
    torch.cuda.synchronize()
    t0 = time.time()
    y, s = wkv7(*xs, backend="triton")
    torch.cuda.synchronize()
    t1 = time.time()
    y.float().sum().backward()
    torch.cuda.synchronize()
    out[f"B{B} H{H}"] = {"fwd_s": t1 - t0, "bwd_s": time.time() - t1}
print("COMPILE_JSON", json.dumps(out))
"""


def compile_time(res):
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        t0 = time.time()
        try:
            p = subprocess.run(
                [sys.executable, "-c", COMPILE_SNIPPET], env=env, capture_output=True, text=True, timeout=150
            )
            line = [x for x in p.stdout.splitlines() if x.startswith("COMPILE_JSON")]
            out = json.loads(line[0].split(" ", 1)[1]) if line else {"error": p.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            out = {"error": "timeout (150 s)"}
        out["process_s"] = time.time() - t0
    res["compile"] = out
    log(f"(1) first call, fresh Triton cache: {out}")


# ----------------------------------------------------------------------------------------------
# (2) correctness


def accuracy_case(res, name, B, T, H, dtype, fla=None, ours_too=True, others=(), **kw):
    xs, s, reset = inputs(B, T, H, dtype, **kw)
    ref = fwd_bwd(reference64, xs, s, reset, dtype, leaf_dtype=torch.float64)
    names = ["y", "state_T"] + [f"d{n}" for n in ("r", "w", "k", "v", "a", "b", "state")]
    refs = [ref[0], ref[1], *ref[2]]
    row = {"case": name, "shape": [B, T, H], "dtype": str(dtype), "errors": {}}
    impls = ([("ours", ours)] if ours_too else []) + ([("fla", fla)] if fla is not None and reset is None else [])
    impls += list(others)
    for impl, fn in impls:
        try:
            # fla's first call autotunes for ~170 s (over 120 s on an H100, 2026-12-05): give it longer
            with time_limit(240 if impl == "fla" else 120):
                out = fwd_bwd(fn, xs, s, reset, dtype)
            got = [out[0], out[1], *out[2]]
            errs = {}
            for n, g, e in zip(names, got, refs):
                if e is None or g is None:
                    continue
                err = relative_error(g, e) if bool(torch.isfinite(g).all()) else float("nan")
                fp32_out = n in ("state_T", "dstate")  # fp32 outputs: no rounding floor
                floor = relative_error(e.to(dtype), e) if dtype != torch.float32 and not fp32_out else None
                ratio = None if not floor else err / floor
                rms = e.double().pow(2).mean().sqrt().item()
                errs[n] = {"err": err, "floor": floor, "ratio": ratio, "ref_rms": rms}
                if rms < 1e-9:  # e.g. dw for w far below the clamp: compare absolutely
                    errs[n]["max_abs"] = (g.double() - e.double()).abs().max().item()
            row["errors"][impl] = errs
            log(f"(2) {name:34s} {impl:4s} {str(dtype):15s} " + " ".join(_cell(n, v) for n, v in errs.items()))
        except Exception as e:
            row["errors"][impl] = {"exception": repr(e)[:400]}
            log(f"(2) {name} {impl}: FAILED {e!r}")
    res["accuracy"].append(row)


def drift(res):
    """Final state after 16384 tokens vs float64 (forward only)."""
    for dtype in (torch.float32, torch.bfloat16):
        xs, s, _ = inputs(1, 16384, 2, dtype, state=True, seed=5)
        with torch.no_grad():
            _, ns = ours(*xs, s, None)
            _, rns = reference64(*xs, s, None)
        err = relative_error(ns, rns)
        res["drift"].append({"dtype": str(dtype), "state_rel_err": err})
        log(f"(2) state after 16384 tokens, {dtype}: rel err {err:.2e}")


def correctness(res):
    for B, T, H in ACC_SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            accuracy_case(res, "plain (as the anchors)", B, T, H, dtype)
            accuracy_case(res, "state + resets", B, T, H, dtype, state=True, resets=3)
    for w in (-30.0, "mixed"):
        accuracy_case(res, f"w={w}", 2, 1024, 4, torch.float32, state=True, w=w)
    drift(res)


# ----------------------------------------------------------------------------------------------
# (3) timings


def bench_ms(fn, rep=100):
    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def graph_ms(step):
    """Median of CUDA-graph replays of `step`: device time without the host's launch costs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    return bench_ms(g.replay)


def steps(fn, B, T, H, dtype=torch.bfloat16):
    """(forward step, forward+backward step) on fresh inputs, no state, loss on y."""
    xs, _, _ = inputs(B, T, H, dtype, seed=2)
    ps = [x.requires_grad_() for x in xs]
    gy = torch.randn(B, T, H, N, device=DEV).to(dtype)

    def fwd():  # inputs require grad: the forward stores what the backward needs, as in training
        fn(*ps, None, None)

    def fwdbwd():
        y, _ = fn(*ps, None, None)
        torch.autograd.grad([y], ps, [gy])

    return fwd, fwdbwd


def time_impl(fn, shape, *, eager=True, first_limit=90):
    fwd, fwdbwd = steps(fn, *shape)
    t = time.time()
    with time_limit(first_limit):  # the first calls compile (and fla's autotune, per shape)
        fwd()
        fwdbwd()
        torch.cuda.synchronize()
    out = {"first_s": time.time() - t, "fwd_graph": graph_ms(fwd), "fwdbwd_graph": graph_ms(fwdbwd)}
    if eager:
        out["fwd"] = bench_ms(fwd)
        out["fwdbwd"] = bench_ms(fwdbwd)
    torch.cuda.reset_peak_memory_stats()
    fwdbwd()
    torch.cuda.synchronize()
    out["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def floors(B, T, H):
    """Minimum HBM bytes (bf16: read the 6 inputs, write y; backward: read 6 + dy, write 6
    gradients); minimum FLOP (4 N^2 MACs per token and head forward: S a, the rank-2 update, S r;
    backward ~3x) at bf16 MMA peak."""
    elems = B * T * H * N
    fwd_b, bwd_b = 7 * 2 * elems, 13 * 2 * elems
    flop_fwd = 8 * N * N * B * T * H
    return {"bytes_ms": (fwd_b + bwd_b) / HBM_TBPS / 1e9, "flop_ms_bf16": 4 * flop_fwd / BF16_TFLOPS / 1e9}


def timings(res):
    for shape in GOAL_SHAPES:
        if left() < 60:
            log(f"(3) {shape}: skipped (time budget)")
            continue
        row = {"shape": list(shape), "cfg": str(tw._config(*shape, N, torch.bfloat16)), "floor": floors(*shape)}
        try:
            row["ours"] = time_impl(ours, shape)
        except Exception as e:
            row["ours"] = {"exception": repr(e)[:400]}
        res["timings"].append(row)
        log(f"(3) {shape}: {json.dumps({k: v for k, v in row.items() if k != 'cfg'})}")


def variants(res, quick):
    """Every knob at VARIANT_SHAPES (CUDA-graph device time), with a cheap accuracy check each."""
    for name, fields in VARIANTS:
        with config(fields):
            try:
                with time_limit(60):
                    acc = variant_accuracy()
            except Exception as e:
                acc = {"exception": repr(e)[:300]}
            for shape in VARIANT_SHAPES[: 2 if quick else 3]:
                if left() < 25:
                    log(f"(3) variant {name} {shape}: skipped (time budget)")
                    continue
                try:
                    cfg = str(tw._config(*shape, N, torch.bfloat16))
                    out = time_impl(ours, shape, eager=False, first_limit=60)
                except Exception as e:
                    cfg, out = None, {"exception": repr(e)[:400]}
                res["variants"].append({"shape": list(shape), "variant": name, "cfg": cfg, "accuracy": acc, **out})
                log(f"(3) variant {str(shape):15s} {name:20s} {json.dumps(out)} accuracy {acc}")


def baseline_section(res, base_mod):
    """This kernel module against the baseline copy in one process: accuracy (bf16 error / floor),
    then fwd and fwd+bwd CUDA-graph medians at BASELINE_SHAPES, alternating base, ours, base, ours
    (best of two each)."""
    base = module_fn(base_mod)
    for B, T, H in ACC_SHAPES[:1]:
        accuracy_case(res, "baseline: plain", B, T, H, torch.bfloat16, others=[("base", base)])
        accuracy_case(res, "baseline: state + resets", B, T, H, torch.bfloat16, others=[("base", base)], state=True,
                      resets=3)  # fmt: skip
        accuracy_case(res, "baseline: fp32 w mixed", 2, 256, 4, torch.float32, others=[("base", base)], state=True,
                      w="mixed")  # fmt: skip
    for shape in BASELINE_SHAPES:
        if left() < 40:
            log(f"(b) {shape}: skipped (time budget)")
            continue
        row = {"shape": list(shape)}
        try:
            runs = {"base": [], "ours": []}
            for impl in ("base", "ours", "base", "ours"):
                runs[impl].append(time_impl(base if impl == "base" else ours, shape, eager=False, first_limit=90))
            for impl, outs in runs.items():
                row[impl] = {k: min(o[k] for o in outs) for k in ("fwd_graph", "fwdbwd_graph")}
                row[impl]["peak_GiB"] = outs[-1]["peak_GiB"]
            row["ratio_fwdbwd"] = row["ours"]["fwdbwd_graph"] / row["base"]["fwdbwd_graph"]
            row["ratio_fwd"] = row["ours"]["fwd_graph"] / row["base"]["fwd_graph"]
        except Exception as e:
            row["exception"] = repr(e)[:400]
        res["baseline"].append(row)
        log(f"(b) {shape}: {json.dumps(row)}")


def fla_section(res, fla):
    """Last (its first call autotunes for minutes): agreement with the reference on the accuracy
    inputs, then timings at its anchor shapes with whatever time is left."""
    if fla is None:
        return
    try:
        with time_limit(max(left() - 30, 10)):
            t = time.time()  # fla's first call in this process: its autotuning
            accuracy_case(res, "plain (as the anchors)", 2, 1024, 4, torch.bfloat16, fla=fla, ours_too=False)
            res["fla_first_case_s"] = time.time() - t
            log(f"fla: first accuracy case (first call, autotuning) {res['fla_first_case_s']:.0f} s")
            accuracy_case(
                res, "state (fla [K, V] layout)", 2, 1024, 4, torch.bfloat16, fla=fla, ours_too=False, state=True
            )
    except Exception as e:
        log(f"fla accuracy: FAILED {e!r}")
    res["fla_agrees"] = fla_agrees(res)
    if not res["fla_agrees"]:
        return
    for shape in FLA_SHAPES:
        if left() < 20:
            log(f"fla {shape}: skipped (time budget)")
            continue
        row = next((r for r in res["timings"] if tuple(r["shape"]) == shape), None)
        try:
            out = time_impl(fla, shape, first_limit=max(left() - 10, 10))
        except Exception as e:
            out = {"exception": repr(e)[:400]}
        if row is not None:
            row["fla"] = out
        log(f"fla {shape}: {json.dumps(out)}")


def variant_accuracy():
    """bf16 y and dw error / bf16 rounding floor at a small shape (cheap: catches a variant that is
    fast because it is wrong)."""
    xs, s, reset = inputs(1, 512, 2, torch.bfloat16, state=True, resets=2, seed=7)
    got = fwd_bwd(ours, xs, s, reset, torch.bfloat16)
    ref = fwd_bwd(reference64, xs, s, reset, torch.bfloat16, leaf_dtype=torch.float64)
    out = {}
    for n, g, e in (("y", got[0], ref[0]), ("dw", got[2][1], ref[2][1]), ("dk", got[2][2], ref[2][2])):
        out[n] = relative_error(g, e) / relative_error(e.to(torch.bfloat16), e)
    return out


def profile(res):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    _, fwdbwd = steps(ours, 8, 4096, 32)
    for _ in range(2):
        fwdbwd()
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fwdbwd()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            out[e.key] = t / 3 / 1e3
    for name, ms in sorted(out.items(), key=lambda x: -x[1])[:12]:
        log(f"  profile 8,4096,32 bf16 {ms:8.3f} ms  {name[:80]}")
    res["profile"] = out


def copy_tbps():
    x = torch.empty(2**28, device=DEV, dtype=torch.float32)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / bench_ms(lambda: y.copy_(x), rep=50) / 1e9


# ----------------------------------------------------------------------------------------------
# (4) report


def fmt(x, nd=3):
    return "—" if x is None else f"{x:.{nd}f}"


def _cell(name, v):
    if "max_abs" in v:
        return f"{name}: |ref|~{v['ref_rms']:.0e}, max abs diff {v['max_abs']:.0e}"
    return f"{name}={v['ratio']:.2f}x" if v["ratio"] else f"{name}={v['err']:.1e}"


def report(res):
    log(
        f"\n{res['device']} {res['date']} torch {res['torch']} triton {res['triton']}; copy {res['copy_TBps']:.2f} TB/s"
    )
    log(f"compile (fresh cache, first fwd / bwd, s): {res.get('compile')}")
    if "fla_first_case_s" in res:
        log(f"fla's first call in this process (autotuning, B2 T1024 H4): {res['fla_first_case_s']:.0f} s")
    log(
        "\n| B, T, H | ours fwd | ours fwd+bwd eager | ours fwd+bwd graph | fla fwd+bwd eager | fla fwd+bwd graph "
        "| ours / fla (graph) | BlinkDL v3 | fla (anchor) | goal | bytes floor | peak GiB |"
    )
    log("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in res["timings"]:
        o, f = row.get("ours", {}), row.get("fla", {})
        blink, fla_anchor, goal = ANCHORS[tuple(row["shape"])]
        ratio = o["fwdbwd_graph"] / f["fwdbwd_graph"] if "fwdbwd_graph" in o and "fwdbwd_graph" in f else None
        log(
            f"| {', '.join(map(str, row['shape']))} | {fmt(o.get('fwd'))} | {fmt(o.get('fwdbwd'))} | "
            f"**{fmt(o.get('fwdbwd_graph'))}** | {fmt(f.get('fwdbwd'))} | {fmt(f.get('fwdbwd_graph'))} | "
            f"{fmt(ratio, 2)} | {blink} | {fmt(fla_anchor, 2)} | {goal} | "
            f"{row['floor']['bytes_ms']:.3f} | {fmt(o.get('peak_GiB'), 2)} |"
        )
    log("\nAccuracy (bf16: error / bf16 rounding floor; fp32: relative error)")
    for row in res["accuracy"]:
        for impl, errs in row["errors"].items():
            if "exception" in errs:
                log(f"  {row['case']:30s} {row['shape']} {row['dtype']:15s} {impl}: {errs['exception'][:120]}")
                continue
            vals = " ".join(_cell(n, v) for n, v in errs.items())
            log(f"  {row['case']:30s} {str(row['shape']):15s} {row['dtype']:15s} {impl:4s} {vals}")
    for d in res["drift"]:
        log(f"  state after 16384 tokens {d['dtype']}: {d['state_rel_err']:.2e}")
    if res["baseline"]:
        log(f"\nAgainst the baseline copy {res.get('baseline_file')} (CUDA-graph ms, bf16; ours / base)")
        log("| B, T, H | base fwd | ours fwd | base fwd+bwd | ours fwd+bwd | ours / base fwd+bwd |")
        log("|---|---|---|---|---|---|")
        for row in res["baseline"]:
            if "exception" in row:
                log(f"| {', '.join(map(str, row['shape']))} | FAILED {row['exception'][:100]} |")
                continue
            b, o = row["base"], row["ours"]
            log(
                f"| {', '.join(map(str, row['shape']))} | {b['fwd_graph']:.3f} | {o['fwd_graph']:.3f} | "
                f"{b['fwdbwd_graph']:.3f} | **{o['fwdbwd_graph']:.3f}** | {row['ratio_fwdbwd']:.3f} |"
            )
    log("\nVariants (CUDA-graph ms; accuracy = bf16 error / floor for y, dw, dk)")
    for v in res["variants"]:
        if "exception" in v:
            log(f"  {str(v['shape']):15s} {v['variant']:20s} FAILED {v['exception'][:100]}")
            continue
        acc = " ".join(f"{k}={x:.2f}x" if isinstance(x, float) else f"{k}={x}" for k, x in v["accuracy"].items())
        times = f"fwd {v['fwd_graph']:.3f} fwd+bwd {v['fwdbwd_graph']:.3f}"
        log(f"  {str(v['shape']):15s} {v['variant']:20s} {times}  {acc}")


def main():
    global VARIANTS, BUDGET_S
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="fewer variant shapes")
    ap.add_argument("--profile", action="store_true", help="torch.profiler of one fwd+bwd at 8,4096,32")
    ap.add_argument("--skip-fla", action="store_true")
    ap.add_argument(
        "--sections",
        default="compile,correctness,timings,variants,fla",
        help="comma list of compile, correctness, timings, profile, variants, fla (a config that faults poisons "
        "the CUDA context: run risky sections in separate invocations)",
    )
    ap.add_argument("--variants", default=None, help="comma list of variant names (default: all)")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S)
    ap.add_argument(
        "--baseline-file", default=None, help="a second copy of triton_wkv7.py to time and check side by side"
    )
    args = ap.parse_args()
    BUDGET_S = args.budget_s
    if args.variants:
        wanted = args.variants.split(",")
        VARIANTS = [(n, kw) for n, kw in VARIANTS if n in wanted]
    want = set(args.sections.split(","))
    base_mod = None
    if args.baseline_file:
        base_mod = load_baseline(args.baseline_file)
        want.add("baseline")
    res = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "accuracy": [],
        "drift": [],
        "timings": [],
        "variants": [],
        "baseline": [],
        "baseline_file": args.baseline_file,
        "errors": [],
    }
    if args.profile:
        want.add("profile")
    fla = None if args.skip_fla or "fla" not in want else fla_fn()
    sections = [
        ("compile", lambda: compile_time(res)),
        ("copy", lambda: res.__setitem__("copy_TBps", copy_tbps())),
        ("correctness", lambda: correctness(res)),
        ("baseline", lambda: baseline_section(res, base_mod)),
        ("timings", lambda: timings(res)),
        ("profile", lambda: profile(res)),
        ("variants", lambda: variants(res, args.quick)),
        ("fla", lambda: fla_section(res, fla)),
    ]
    sections = [(n, f) for n, f in sections if n in want or n == "copy"]
    tw._CFG_OVERRIDE = BASE or None
    res["base_config"] = BASE
    for name, fn in sections:
        try:
            fn()
        except Exception:
            res["errors"].append({"section": name, "traceback": traceback.format_exc()[-3000:]})
            log(f"section {name} FAILED:\n{traceback.format_exc()[-3000:]}")
    res.setdefault("copy_TBps", float("nan"))
    res["wall_s"] = time.time() - T0
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_wkv7{args.tag}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)
    report(res)
    log(f"\nwall {res['wall_s']:.0f} s; JSON: {path}")


def fla_agrees(res) -> bool:
    """fla is timed only if it matched the reference on the accuracy inputs (y within 2e-2)."""
    for row in res["accuracy"]:
        e = row["errors"].get("fla")
        if e and "y" in e and e["y"]["err"] == e["y"]["err"] and e["y"]["err"] < 2e-2:
            log("fla agrees with the reference: timing it")
            return True
    log("fla: no agreeing accuracy run, not timed")
    return False


if __name__ == "__main__":
    main()
