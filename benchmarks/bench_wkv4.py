"""Check and time the RWKV-4 WKV Triton kernel on a CUDA GPU (ours vs fla vs the HBM floor).

    source .whl/prelude.sh && python benchmarks/bench_wkv4.py [--sweep] [--resets N [--resets-only]] [--out DIR]

Correctness first (fp64 reference on the same GPU, fresh random inputs, extreme values, outputs
poisoned with NaN), then medians of triton.testing.do_bench (CUDA events). Prints a table last and
writes everything to DIR/bench_wkv4.json (DIR defaults to $OUT or '.').

--resets N: also check the kernel with reset flags (packed examples of N tokens on average) and
time it with and without them at every shape (bf16, CUDA graphs); --resets-only: only that.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import rwkv_ft.kernels.rwkv4.triton_wkv4 as tw
import torch
import triton
from triton.testing import do_bench

from rwkv_ft.kernels import empty_wkv_state, wkv4, wkv4_reference
from rwkv_ft.testing import relative_error

SHAPES = [(8, 1024, 2048), (4, 4096, 2048), (16, 1024, 768), (8, 4096, 4096)]
ANCHORS = {  # /work/shared/anchors/README.md, H100, bf16 fwd+bwd ms: (BlinkDL CUDA, fla)
    (8, 1024, 2048): (0.738, 1.455),
    (4, 4096, 2048): (2.658, 5.165),
    (16, 1024, 768): (0.704, 1.393),
    (8, 4096, 4096): (3.635, None),
}
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def inputs(B, T, C, dtype, *, state=True, k_scale=1.0, td=None, pads=0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    time_decay = r(C)
    if td is not None:  # the extreme decay on every other channel (all-extreme grads underflow fp32)
        time_decay[::2] = float(td) + 0.1 * r(C)[::2]
    time_first = r(C)
    k = (r(B, T, C) * k_scale).clamp(-80, 80)
    v = r(B, T, C)
    if pads:
        k[:, -pads:] = -1e4
    s = None
    if state:
        s = empty_wkv_state(B, C, device="cuda")
        s[:, 0], s[:, 1], s[:, 2] = r(B, C), r(B, C).abs() + 0.5, 3 * r(B, C)
    return time_decay, time_first, k.to(dtype), v.to(dtype), s


def packed_resets(B, T, every, seed=0):
    """(B, T) bool reset flags of rows packed with examples of `every` tokens on average (lengths
    uniform in [every/2, 3*every/2], drawn per row: every row has its own pattern). A row's first
    example continues the incoming state (no reset at t = 0)."""
    g = torch.Generator().manual_seed(seed)
    length = lambda: int(torch.randint(every // 2, every + every // 2 + 1, (1,), generator=g))
    reset = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        t = length()
        while t < T:
            reset[b, t] = True
            t += length()
    return reset.cuda()


def grads(fn, td, tf, k, v, s, gy, gs, reset=None):
    xs = [x.detach().clone().requires_grad_() for x in (td, tf, k, v)]
    st = None if s is None else s.detach().clone().requires_grad_()
    y, ns = fn(*xs, st) if reset is None else fn(*xs, st, reset=reset)
    torch.autograd.backward([y, ns], [gy.to(y.dtype), gs.to(ns.dtype)])
    return [y, ns] + [x.grad for x in xs] + ([st.grad] if st is not None else [])


_REFERENCE_CACHE: dict = {}


def check(case, B, T, C, dtype, reset_every=None, cache_reference=False, **kw):
    """Relative errors of the Triton kernel against float64 on fresh inputs. cache_reference: reuse
    the float64 results of an earlier call with the same arguments (config sweeps)."""
    td, tf, k, v, s = inputs(B, T, C, dtype, **kw)
    reset = None if reset_every is None else packed_resets(B, T, reset_every, seed=B * T)
    g = torch.Generator(device="cuda").manual_seed(7)
    gy = torch.randn(B, T, C, device="cuda", generator=g)
    gs = torch.randn(B, 3, C, device="cuda", generator=g)
    d = lambda x: None if x is None else x.double()
    key = (B, T, C, dtype, reset_every, tuple(sorted(kw.items())))
    if cache_reference and key in _REFERENCE_CACHE:
        ref = _REFERENCE_CACHE[key]
    else:
        ref = grads(wkv4_reference, d(td), d(tf), d(k), d(v), d(s), gy.to(dtype).double(), gs.double(), reset)
        if cache_reference:
            _REFERENCE_CACHE[key] = ref
    tw.POISON_OUTPUTS = True
    try:
        out = grads(lambda *a, **r: wkv4(*a, backend="triton", **r), td, tf, k, v, s, gy.to(dtype), gs, reset)
    finally:
        tw.POISON_OUTPUTS = False
    names = ["y", "state", "g_td", "g_tf", "g_k", "g_v", "g_state"]
    errs = {}
    for n, a, e in zip(names, out, ref, strict=False):
        if n == "state":  # compare in the reference's max representation (p itself is rounded)
            sc = torch.exp(a[:, 2].double() - e[:, 2])
            a = torch.stack([a[:, 0] * sc, a[:, 1] * sc, a[:, 2]], 1)
        finite = bool(torch.isfinite(a).all())
        errs[n] = relative_error(a, e) if finite else float("nan")
    print(f"check {case:28s} {str(dtype):15s} " + " ".join(f"{n}={x:.1e}" for n, x in errs.items()), flush=True)
    return {"case": case, "shape": [B, T, C], "dtype": str(dtype), "rel_err": errs}


def bench_ms(fn, rep=200):
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def graph_ms(step):
    """Median of CUDA-graph replays of `step`: device time without the host's launch costs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    return bench_ms(g.replay)


def time_ours(B, T, C, dtype, fwd_only=False, graph=False, reset_every=None):
    td, tf, k, v, s = inputs(B, T, C, dtype, state=False, seed=1)
    reset = None if reset_every is None else packed_resets(B, T, reset_every)
    timer = graph_ms if graph else bench_ms
    if fwd_only:
        return timer(lambda: wkv4(td, tf, k, v, reset=reset, backend="triton"))
    xs = [x.requires_grad_() for x in (td, tf, k, v)]
    gy = torch.randn(B, T, C, device="cuda").to(dtype)

    def step():
        y, _ = wkv4(*xs, reset=reset, backend="triton")
        torch.autograd.grad([y], xs, [gy])

    return timer(step)


def time_fla(B, T, C, dtype, fwd_only=False, graph=False):
    from fla.ops.rwkv4 import fused_recurrent_rwkv4

    td, tf, k, v, _ = inputs(B, T, C, dtype, state=False, seed=1)
    s = torch.zeros(B, 3, 1, C, device="cuda", dtype=dtype)
    s[:, 2] = -1e38 if dtype == torch.float32 else -6e4
    timer = graph_ms if graph else bench_ms
    if fwd_only:
        return timer(lambda: fused_recurrent_rwkv4(td, tf, k, v, s))
    xs = [x.requires_grad_() for x in (td, tf, k, v)]
    gy = torch.randn(B, T, C, device="cuda").to(dtype)

    def step():
        y, _ = fused_recurrent_rwkv4(*xs, s)
        torch.autograd.grad([y], xs, [gy])

    return timer(step)


def profile_kernels(B, T, C, dtype):
    """Device time per kernel of one forward+backward (torch.profiler), to see where time goes."""
    from torch.profiler import ProfilerActivity, profile

    td, tf, k, v, _ = inputs(B, T, C, dtype, state=False, seed=1)
    xs = [x.requires_grad_() for x in (td, tf, k, v)]
    gy = torch.randn(B, T, C, device="cuda").to(dtype)
    for _ in range(3):
        y, _ = wkv4(*xs, backend="triton")
        torch.autograd.grad([y], xs, [gy])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            y, _ = wkv4(*xs, backend="triton")
            torch.autograd.grad([y], xs, [gy])
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            out[e.key] = t / 5 / 1e3  # ms per step
    for name, ms in sorted(out.items(), key=lambda x: -x[1])[:14]:
        print(f"  profile {B},{T},{C} {str(dtype):15s} {ms:8.4f} ms  {name[:70]}", flush=True)
    return out


def host_overhead_us(n=200):
    """Host time per forward and per forward+backward at a tiny shape (device work is negligible)."""
    import time

    td, tf, k, v, _ = inputs(1, 16, 64, torch.bfloat16, state=False, seed=2)
    xs = [x.requires_grad_() for x in (td, tf, k, v)]
    gy = torch.randn(1, 16, 64, device="cuda").to(torch.bfloat16)
    out = {}
    for name, bwd in (("fwd", False), ("fwd+bwd", True)):
        for _ in range(2):  # the first round warms up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                y, _ = wkv4(*xs, backend="triton")
                if bwd:
                    torch.autograd.grad([y], xs, [gy])
            torch.cuda.synchronize()
            out[name] = (time.perf_counter() - t0) / n * 1e6
    return out


def host_profile(n=30):
    """cProfile of the host side of forward+backward at a tiny shape: where the launch time goes."""
    import cProfile
    import io
    import pstats

    td, tf, k, v, _ = inputs(1, 16, 64, torch.bfloat16, state=False, seed=2)
    xs = [x.requires_grad_() for x in (td, tf, k, v)]
    gy = torch.randn(1, 16, 64, device="cuda").to(torch.bfloat16)
    for _ in range(5):
        y, _ = wkv4(*xs, backend="triton")
        torch.autograd.grad([y], xs, [gy])
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        y, _ = wkv4(*xs, backend="triton")
        torch.autograd.grad([y], xs, [gy])
    torch.cuda.synchronize()
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(14)
    print("\n".join(line[:150] for line in out.getvalue().splitlines()[:40]), flush=True)


def kernel_resources():
    """Registers and spills of every compiled variant (from triton's cache; best effort)."""
    res = {}
    for fn in (tw._fwd_fused, tw._bwd_fused):
        try:
            for cache in fn.device_caches.values():
                for key, kern in cache[0].items():
                    res.setdefault(fn.__name__, []).append((kern.n_regs, kern.n_spills, str(key)[-60:]))
        except Exception as e:  # internals differ across triton versions
            res[fn.__name__] = repr(e)
    return res


# (name, FAST, chunk length (None: default), backward chunk length (None: the forward's), prefetch
# distances of (pass 1, pass 2) forward, backward, L2 eviction hints). The first is timed twice (its
# spread is the noise).
V4 = ("v4", False, 64, None, (1, 1), (1, 1), False)
VARIANTS = [
    V4,
    ("v5", True, None, None, (1, 1), (1, 1), {"fwd": True, "bwd": False}),
]


def set_variant(fast, L, bwd_L, pf_fwd, pf_bwd, evict):
    tw._FAST, tw._L_OVERRIDE, tw._BWD_L = fast, L, bwd_L
    tw._EVICT = evict if isinstance(evict, dict) else {"fwd": evict, "bwd": evict}
    tw._PF = {"fwd": pf_fwd, "bwd": pf_bwd}


def determinism(res):
    """time_decay / time_first gradients: bitwise equal over repeated runs with
    torch.use_deterministic_algorithms(True); close to the atomic path; and the time it costs."""
    B, T, C = SHAPES[3]
    td, tf, k, v, _ = inputs(B, T, C, torch.bfloat16, state=False, seed=3)
    gy = torch.randn(B, T, C, device="cuda").to(torch.bfloat16)
    xs = [x.requires_grad_() for x in (td, tf)]

    def g():
        y, _ = wkv4(xs[0], xs[1], k, v, backend="triton")
        return torch.autograd.grad([y], xs, [gy])

    atomic = [torch.cat(g()) for _ in range(3)]
    torch.use_deterministic_algorithms(True)
    try:
        det = [torch.cat(g()) for _ in range(3)]
        det_ms = time_ours(B, T, C, torch.bfloat16, graph=True)
    finally:
        torch.use_deterministic_algorithms(False)
    out = {
        "atomic_runs_bitwise_equal": all(torch.equal(atomic[0], a) for a in atomic[1:]),
        "det_runs_bitwise_equal": all(torch.equal(det[0], d) for d in det[1:]),
        "det_vs_atomic_rel": relative_error(det[0].double(), atomic[0].double()),
        "det_fwdbwd_graph_ms": det_ms,
    }
    res["determinism"] = out
    print(f"determinism {SHAPES[3]}: {out}", flush=True)
    return out["det_runs_bitwise_equal"] and out["det_vs_atomic_rel"] < 1e-5


def variants(res):
    """Check each variant (fp64 reference, quick cases) and time fwd and fwd+bwd (graph, bf16) on
    every shape, interleaved, the baseline first and last (its spread is the noise)."""
    saved = (tw._FAST, tw._L_OVERRIDE, tw._BWD_L, tw._PF["fwd"], tw._PF["bwd"], dict(tw._EVICT))
    for name, *v in VARIANTS[1:]:
        set_variant(*v)
        try:
            for args, kw in (
                (("random+state", 2, 1000, 300, torch.bfloat16), {}),
                (("random+state", 2, 1000, 300, torch.float32), {}),
                (("|k|=80", 2, 600, 96, torch.float32), {"k_scale": 40.0}),
                (("exp(td)=e^5", 2, 600, 96, torch.float32), {"td": 5.0}),
                (("pads k=-1e4", 2, 600, 96, torch.bfloat16), {"pads": 40, "state": False}),
            ):
                c = check(f"{name}: {args[0]}", *args[1:], **kw)
                res["checks"].append(c)
            tw.LOOKBACK_SUMMARIES_ONLY = True
            res["checks"].append(check(f"{name}: look-back summaries", 2, 1000, 300, torch.float32))
        finally:
            tw.LOOKBACK_SUMMARIES_ONLY = False
            set_variant(*saved)
    for shape in SHAPES:
        for name, *v in VARIANTS + VARIANTS[:1]:
            set_variant(*v)
            try:
                ms = time_ours(*shape, torch.bfloat16, graph=True)
                msf = time_ours(*shape, torch.bfloat16, graph=True, fwd_only=True)
            finally:
                set_variant(*saved)
            res["variants"].append({"shape": shape, "variant": name, "fwdbwd_graph_ms": ms, "fwd_graph_ms": msf})
            print(f"variant {str(shape):18s} {name:12s} fwd {msf:.3f} fwd+bwd {ms:.3f} ms (graph)", flush=True)


def resets(res, every):
    """Reset flags (packed examples of `every` tokens on average): checks against the fp64
    reference, then fwd and fwd+bwd (bf16, CUDA graphs) with and without them at every shape,
    interleaved, the plain run first and last (its spread is the noise)."""
    for args, kw in (
        (("resets", 2, 1000, 300, torch.float32), {}),
        (("resets", 2, 1000, 300, torch.bfloat16), {}),
        (("resets, no state", 2, 1025, 130, torch.float32), {"state": False}),
        (("resets every ~40", 3, 1000, 96, torch.float32), {"reset_every": 40}),
    ):
        res["checks"].append(check(args[0], *args[1:], **{"reset_every": every, **kw}))
    tw.LOOKBACK_SUMMARIES_ONLY = True
    try:
        res["checks"].append(check("resets, look-back summaries", 2, 1000, 300, torch.float32, reset_every=every))
    finally:
        tw.LOOKBACK_SUMMARIES_ONLY = False
    torch.use_deterministic_algorithms(True)
    try:
        res["checks"].append(check("resets, deterministic", 2, 1000, 300, torch.float32, reset_every=every))
    finally:
        torch.use_deterministic_algorithms(False)
    for shape in SHAPES:
        for name, reset_every in (("plain", None), ("resets", every), ("plain", None)):
            ms = time_ours(*shape, torch.bfloat16, graph=True, reset_every=reset_every)
            msf = time_ours(*shape, torch.bfloat16, graph=True, fwd_only=True, reset_every=reset_every)
            row = {"shape": shape, "run": name, "reset_every": reset_every, "fwdbwd_graph_ms": ms, "fwd_graph_ms": msf}
            res["resets"].append(row)
            print(f"resets {str(shape):18s} {name:7s} fwd {msf:.3f} fwd+bwd {ms:.3f} ms (graph)", flush=True)


# The layers' WKV shapes in the training steps (bench_step.py, long_context_host.py): B, T, C
SMALL_GRID_SHAPES = [(1, 1024, 4096), (4, 1024, 2048), (1, 4096, 2048), (8, 1024, 2048)]
SMALL_GRID_BLOCKS = [(512, 4), (256, 2), (256, 4), (128, 4), (128, 2), (128, 1), (64, 2)]


def small_grids(res):
    """Each (BLOCK_C, num_warps) with chunks of 16, 32 and 64 tokens in both directions: the
    forward timed alone, the backward as fwd+bwd minus it (CUDA graphs, bf16). Each config is
    checked against float64 first at the shape it is timed on (a wrong config is reported, not
    timed)."""
    for shape in SMALL_GRID_SHAPES:
        print(f"small grid {shape}: default config {tw._config(*shape)}", flush=True)
        for block_c, nw in SMALL_GRID_BLOCKS:
            for L in (16, 32, 64):
                tw._CFG_OVERRIDE = (block_c, L, nw)
                try:
                    c = check(f"cfg {block_c},{L},{nw}", *shape, torch.bfloat16, cache_reference=True)
                    ok = all(x < 5e-3 for x in c["rel_err"].values())
                    row = {"shape": shape, "block_c": block_c, "L": L, "num_warps": nw, "check": c, "ok": ok}
                    if ok:
                        row["fwd_ms"] = time_ours(*shape, torch.bfloat16, graph=True, fwd_only=True)
                        row["fwdbwd_ms"] = time_ours(*shape, torch.bfloat16, graph=True)
                        row["bwd_ms"] = row["fwdbwd_ms"] - row["fwd_ms"]
                finally:
                    tw._CFG_OVERRIDE = None
                res["small_grids"].append(row)
                if ok:
                    print(
                        f"  BLOCK_C {block_c:3d} warps {nw} L {L:2d}: fwd {row['fwd_ms']:.4f} bwd {row['bwd_ms']:.4f}"
                        f" fwd+bwd {row['fwdbwd_ms']:.4f} ms",
                        flush=True,
                    )
        rows = [r for r in res["small_grids"] if r["shape"] == shape and r["ok"]]
        if rows:
            bf = min(rows, key=lambda r: r["fwd_ms"])
            bb = min(rows, key=lambda r: r["bwd_ms"])
            print(
                f"  best fwd {bf['block_c']},{bf['L']},{bf['num_warps']} {bf['fwd_ms']:.4f}; best bwd"
                f" {bb['block_c']},{bb['L']},{bb['num_warps']} {bb['bwd_ms']:.4f}",
                flush=True,
            )


def copy_bw():
    x = torch.empty(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x), rep=100)
    return 2 * x.numel() * 4 / ms / 1e9  # TB/s, read + write


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also time (BLOCK_C, L, num_warps) configs")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-fla", action="store_true")
    ap.add_argument("--variants", action="store_true", help="check and time the VARIANTS list")
    ap.add_argument("--quick", action="store_true", help="bf16 only, no host profile")
    ap.add_argument("--resets", type=int, metavar="N", help="check and time with resets every ~N tokens")
    ap.add_argument("--resets-only", action="store_true", help="with --resets: only the reset checks and timings")
    ap.add_argument("--small-grids", action="store_true", help="only the training steps' shapes, every config")
    args = ap.parse_args()
    res = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "checks": [],
        "timings": [],
        "sweep": [],
        "variants": [],
        "resets": [],
        "small_grids": [],
    }
    if args.small_grids:
        default = {
            str(s): [
                time_ours(*s, torch.bfloat16, graph=True, fwd_only=True),
                time_ours(*s, torch.bfloat16, graph=True),
            ]
            for s in SMALL_GRID_SHAPES
        }
        res["small_grid_default_fwd_fwdbwd_ms"] = default
        print("default config, fwd / fwd+bwd ms:", default, flush=True)
        small_grids(res)
        return finish(res, [], args.out, det_ok=True)
    if args.resets_only:
        if not args.resets:
            ap.error("--resets-only needs --resets N")
        resets(res, args.resets)
        return finish(res, [], args.out, det_ok=True)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        res["checks"].append(check("random+state", 2, 1000, 300, dt))
    if args.resets:
        resets(res, args.resets)
    res["checks"].append(check("T=1", 3, 1, 77, torch.float32))
    res["checks"].append(check("no state, chunk edge", 2, 1025, 130, torch.float32, state=False))
    res["checks"].append(check("|k|=80", 2, 600, 96, torch.float32, k_scale=40.0))
    res["checks"].append(check("exp(td)=e^5", 2, 600, 96, torch.float32, td=5.0))
    res["checks"].append(check("exp(td)=e^-8", 2, 600, 96, torch.float32, td=-8.0))
    res["checks"].append(check("pads k=-1e4", 2, 600, 96, torch.bfloat16, pads=40, state=False))
    res["checks"].append(check("big shape", 8, 1024, 2048, torch.bfloat16, state=False))
    res["copy_TBps"] = copy_bw()
    print(f"device-to-device copy: {res['copy_TBps']:.2f} TB/s", flush=True)

    tw.LOOKBACK_SUMMARIES_ONLY = True
    res["checks"].append(check("look-back over summaries", 2, 1000, 300, torch.float32))
    tw.LOOKBACK_SUMMARIES_ONLY = False
    res["host_us"] = host_overhead_us()
    print(f"host time per call, tiny shape: {res['host_us']}", flush=True)
    if not args.quick:
        host_profile()
        res["profile"] = {str(s): profile_kernels(*s, torch.bfloat16) for s in (SHAPES[0], SHAPES[3])}
    if args.variants:
        variants(res)
    det_ok = determinism(res)

    if args.sweep:
        for shape in (SHAPES[0], SHAPES[2], SHAPES[3]):
            for cfg in [
                (256, 64, 2),
                (256, 64, 4),
                (512, 48, 4),
                (512, 64, 4),
                (512, 64, 8),
            ]:
                tw._CFG_OVERRIDE = cfg
                try:
                    ms = time_ours(*shape, torch.bfloat16, graph=True)
                    msf = time_ours(*shape, torch.bfloat16, graph=True, fwd_only=True)
                finally:
                    tw._CFG_OVERRIDE = None
                res["sweep"].append({"shape": shape, "cfg": cfg, "fwdbwd_graph_ms": ms, "fwd_graph_ms": msf})
                print(
                    f"sweep {shape} cfg(BLOCK_C,L,warps)={cfg}: fwd {msf:.3f} fwd+bwd {ms:.3f} ms (graph)",
                    flush=True,
                )

    rows = []
    for shape in SHAPES:
        B, T, C = shape
        for name in ("bf16", "fp16", "fp32"):
            dt = DT[name]
            if name != "bf16" and (args.quick or shape not in (SHAPES[0], SHAPES[3])):
                continue
            esz = torch.finfo(dt).bits // 8
            floor = 9 * esz * B * T * C / 3.0e12 * 1e3  # fwd: k v y; bwd: k v y gy gk gv
            r = {"shape": shape, "dtype": name, "cfg": tw._config(B, T, C), "floor_ms": floor}
            r["ours_fwd"] = time_ours(B, T, C, dt, fwd_only=True)
            r["ours_fwdbwd"] = time_ours(B, T, C, dt)
            r["ours_fwd_graph"] = time_ours(B, T, C, dt, fwd_only=True, graph=True)
            r["ours_fwdbwd_graph"] = time_ours(B, T, C, dt, graph=True)
            r["fla_fwdbwd"] = r["fla_fwdbwd_graph"] = None
            if not args.skip_fla and name == "bf16" and shape != SHAPES[3]:
                try:
                    r["fla_fwdbwd"] = time_fla(B, T, C, dt)
                    r["fla_fwdbwd_graph"] = time_fla(B, T, C, dt, graph=True)
                except Exception as e:  # record, keep timing ours
                    r["fla_error"] = repr(e)
            res["timings"].append(r)
            rows.append(r)
            print(f"time {r}", flush=True)

    finish(res, rows, args.out, det_ok)


def finish(res, rows, out_dir, det_ok):
    """Resources, the JSON file, the table and the verdict; exits non-zero when a check failed."""
    res["kernel_resources"] = kernel_resources()
    print(
        "regs/spills:",
        {k: [x[:2] for x in v] if isinstance(v, list) else v for k, v in res["kernel_resources"].items()},
        flush=True,
    )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_wkv4.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n{res['device']} {res['date']} torch {res['torch']} triton {res['triton']}")
    if rows:
        print("eager = do_bench of the Python call; graph = CUDA-graph replay (device time only)")
        print(
            "| B, T, C | dtype | ours fwd | ours fwd+bwd | ours fwd+bwd graph | fla fwd+bwd | fla graph "
            "| BlinkDL fwd+bwd | floor |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        blink, _ = ANCHORS[tuple(r["shape"])]
        fla = "—" if r["fla_fwdbwd"] is None else f"{r['fla_fwdbwd']:.3f}"
        flag = "—" if r["fla_fwdbwd_graph"] is None else f"{r['fla_fwdbwd_graph']:.3f}"
        print(
            f"| {', '.join(map(str, r['shape']))} | {r['dtype']} | {r['ours_fwd']:.3f} "
            f"| {r['ours_fwdbwd']:.3f} | {r['ours_fwdbwd_graph']:.3f} | {fla} | {flag} "
            f"| {blink if r['dtype'] == 'bf16' else '—'} | {r['floor_ms']:.3f} |"
        )
    if res["resets"]:
        print("\nreset flags (bf16, CUDA graphs, ms; plain: the mean of the runs before and after)")
        print("| B, T, C | resets every | fwd plain | fwd resets | fwd+bwd plain | fwd+bwd resets |")
        print("|---|---|---|---|---|---|")
        for shape in SHAPES:
            runs = [r for r in res["resets"] if r["shape"] == shape]
            plain = [r for r in runs if r["reset_every"] is None]
            flagged = [r for r in runs if r["reset_every"] is not None]
            if not plain or not flagged:
                continue
            fwd, fwdbwd = (sum(r[key] for r in plain) / len(plain) for key in ("fwd_graph_ms", "fwdbwd_graph_ms"))
            print(
                f"| {', '.join(map(str, shape))} | ~{flagged[0]['reset_every']} | {fwd:.3f} "
                f"| {flagged[0]['fwd_graph_ms']:.3f} | {fwdbwd:.3f} "
                f"| {flagged[0]['fwdbwd_graph_ms']:.3f} |"
            )
    bad = [c for c in res["checks"] if not all(e == e and e < 2e-2 for e in c["rel_err"].values())]
    print("checks:", "ALL OK" if not bad else f"FAILED {[c['case'] for c in bad]}", "determinism:", det_ok)
    sys.exit(1 if bad or not det_ok else 0)


if __name__ == "__main__":
    main()
