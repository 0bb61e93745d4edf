"""Where a long-context (chunked) LoRA step's wall time goes beyond the GPU's work (issue 12).

    source .whl/prelude.sh && python -u benchmarks/long_context_host.py rwkv4-1.6b TAG \
        [--lengths 4096,16384,65536,131072] [--gc on|freeze|pause|freeze_pause] [--steps 3] \
        [--offload 0,0.25,0.5] [--check 16384] [--streams] [--compile-mode reduce-overhead]
    python benchmarks/long_context_host.py tiny4 cpu --device cpu --variant eager --lengths 24,64 --chunk 16

One model per process (a process that built other models first walks their objects in every full
garbage collection: the bench_step.py long-context table of the tenth session was slowed that way),
batch 1, `training.chunk_len` = --chunk, the bare loop of bench_step.py at --variant. Per length,
after two warm-up steps: wall time of each timed step, the time the host took to enqueue it (with
host syncs inside, the two meet), the garbage collector's collections and time during the timed
steps, peak memory, the host syncs of one step (torch.cuda.set_sync_debug_mode, with where they
happen), and one profiled step (GPU busy time, launches). The GPU-busy time per chunk against the
unchunked run's is the ceiling of the tokens/s ratio that issue 12 measures.

--gc: on (Python's default), freeze (objects existing after the warm-up frozen, as rwkv_ft.train
does for the whole run), pause (the collector off inside each forward+backward, as rwkv_ft.train's
steps), freeze_pause (both: what a recipe run does). Inductor's C++ wrapper: TORCHINDUCTOR_CPP_WRAPPER=1.
--offload: the `training.chunk_offload` shares to run each length with (rwkv_ft.models.offload: that
share of the chunks keeps its activations in pinned host memory instead of recomputing them); a run
with a share other than 0 is keyed "T_offloadSHARE" and records the pinned host memory it used.
"SHARE@GIB" runs that share with the prefetch window (`offload.PREFETCH_BYTES`, what the backward may
hold copied back ahead of use) set to GIB GiB, keyed "T_offloadSHARE@GIB".
--compile-mode reduce-overhead: the blocks replay CUDA graphs, and the chunks are replayed instead of
checkpointed (rwkv_ft.models.chunk_replay); the peak to read is then the reserved one (the graphs'
memory is not in the allocated figure).
--check T: before timing, one step at T per share against share 0: loss, gradients, peak memory.
--streams: one more profiled step per length, read per CUDA stream, with the compute stream's gaps
put down to a late host or a waiting stream (`stream_breakdown`, `gap_causes`). Exporting and reading
its trace takes 1-2 minutes per length and share at 65,536 tokens: budget for it.
Writes DIR/long_context_host_TAG.json (DIR: $OUT or '.').
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_step import bare_model, busy_ms, profile_step  # noqa: E402

from rwkv_ft.models import offload as offload_module  # noqa: E402
from rwkv_ft.models.modeling_utils import CUDAGRAPH_COMPILE_MODES  # noqa: E402
from rwkv_ft.models.offload import host_memory_pool  # noqa: E402
from rwkv_ft.train import collector_paused, set_chunk_len  # noqa: E402


class CollectorClock:
    """Collections of Python's garbage collector and the time they took, since the last reset."""

    def __init__(self):
        self.seconds, self.count, self._start, self.each = 0.0, 0, 0.0, []
        gc.callbacks.append(self._on_collection)

    def _on_collection(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            seconds = time.perf_counter() - self._start
            self.seconds += seconds
            self.count += 1
            self.each.append((info["generation"], info["collected"], round(seconds, 4)))

    def reset(self) -> None:
        self.seconds, self.count, self.each = 0.0, 0, []


def host_syncs(step, device: str) -> list[str]:
    """Where the host waited on the device during one step (CUDA only)."""
    if device != "cuda":
        return []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [f"{w.filename}:{w.lineno}" for w in caught if "called a synchronizing" in str(w.message)]


# The offload's host-side work, named in a profiled step (`annotated_offload`).
OFFLOAD_METHODS = ("pack", "flush", "_bound_in_flight", "unpack", "_fetch", "prefetch", "block_output_hook", "drain")


@contextlib.contextmanager
def annotated_offload():
    """Each of the offload's hooks runs inside a profiler range named after it ("offload.pack", ...),
    so that a profile can say how much of the host's time went to them. Only for profiled steps:
    the ranges cost host time of their own."""
    from torch.profiler import record_function

    from rwkv_ft.models.offload import ChunkOffload

    originals = {name: getattr(ChunkOffload, name) for name in OFFLOAD_METHODS}

    def wrap(name, fn):
        def annotated(*args, **kwargs):
            with record_function(f"offload.{name}"):
                return fn(*args, **kwargs)

        return annotated

    for name, fn in originals.items():
        setattr(ChunkOffload, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(ChunkOffload, name, fn)


def stream_breakdown(step) -> dict:
    """One more profiled step (the offload's hooks annotated), read per CUDA stream from its trace:
    each stream's busy time by kind (kernels, copies each way), the gaps between kernels on the
    compute stream (the one with the most kernel time), and what caused them (`gap_causes`). With the
    offload's copies on a side stream, the GPU-busy time of `profile_step` counts the copies too;
    only the compute stream's gaps say whether it waited."""
    from torch.profiler import ProfilerActivity, profile

    with annotated_offload(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return stream_report(events)


def stream_report(events: list[dict]) -> dict:
    """`stream_breakdown`'s reading of a chrome trace's events (also `step_trace.py`'s)."""
    spans = defaultdict(list)  # stream -> (start us, end us, category, name, correlation)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            args = e.get("args", {})
            span = (e["ts"], e["ts"] + e["dur"], e["cat"], e["name"], args.get("correlation"))
            spans[args.get("stream")].append(span)
    kernel_us = {s: sum(b - a for a, b, cat, *_ in v if cat == "kernel") for s, v in spans.items()}
    compute = max(kernel_us, key=kernel_us.get)
    streams = {}
    for stream, v in spans.items():
        by_kind = defaultdict(float)
        for a, b, cat, name, _ in v:
            by_kind[name.split(" (")[0] if cat == "gpu_memcpy" else cat] += (b - a) / 1e3
        streams[str(stream)] = {
            "busy_ms": busy_ms([(a, b) for a, b, *_ in v]),
            "ms_by_kind": {k: round(ms, 1) for k, ms in by_kind.items()},
        }
    gaps = defaultdict(lambda: [0, 0.0])  # size bucket -> [count, ms]
    ordered = sorted(spans[compute])
    end = ordered[0][1]
    for a, b, *_ in ordered[1:]:
        gap = a - end
        if gap > 5:
            bucket = "5-50us" if gap < 50 else "50us-1ms" if gap < 1000 else ">1ms"
            gaps[bucket][0] += 1
            gaps[bucket][1] += gap / 1e3
        end = max(end, b)
    return {
        "compute_stream": str(compute),
        "streams": streams,
        "compute_gaps": {k: [n, round(ms, 1)] for k, (n, ms) in gaps.items()},
        "gap_causes": gap_causes(events, ordered),
    }


def gap_causes(events: list[dict], ordered: list[tuple]) -> dict:
    """Why the compute stream (`ordered`: its (start, end, category, name, correlation) spans, by
    start) sat idle, gap by gap (over 20 us). The host launched the op that ends a gap either after
    the gap began ("host_late": the host was busy elsewhere; what it ran meanwhile is summed by
    profiler range, the offload's annotated hooks included) or before ("device_wait": the op was
    queued but waited, on another stream's event: the copies back)."""
    launch = {}  # correlation -> host launch (start, end) us
    ranges = []  # (start, end, name) of host-side ops and annotations
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat")
        if cat in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            launch[e["args"]["correlation"]] = (e["ts"], e["ts"] + e["dur"])
        if cat in ("cpu_op", "user_annotation", "python_function", "cuda_runtime"):
            ranges.append((e["ts"], e["ts"] + e["dur"], e["name"][:80]))
    ranges.sort()
    late = {"n": 0, "ms": 0.0}
    wait = {"n": 0, "ms": 0.0}
    host_ms = defaultdict(float)  # name -> ms of host time overlapping host-late gaps
    end = ordered[0][1]
    starts = [r[0] for r in ranges]
    for a, b, _, _, corr in ordered[1:]:
        gap = a - end
        launched = launch.get(corr)
        if gap > 20 and launched is not None:
            if launched[0] > end:
                late["n"] += 1
                late["ms"] += gap / 1e3
                lo, hi = end, min(a, launched[0])
                first = bisect.bisect_left(starts, lo - 2e6)  # ranges that began up to 2 s before
                for s, e, name in ranges[first : bisect.bisect_right(starts, hi)]:
                    overlap = min(e, hi) - max(s, lo)
                    if overlap > 0:
                        host_ms[name] += overlap / 1e3
            else:
                wait["n"] += 1
                wait["ms"] += gap / 1e3
        end = max(end, b)
    top = sorted(host_ms.items(), key=lambda kv: -kv[1])[:25]
    return {
        "host_late": {"n": late["n"], "ms": round(late["ms"], 1)},
        "device_wait": {"n": wait["n"], "ms": round(wait["ms"], 1)},
        # nested ranges overlap: each figure is the time spent inside that range, not a share of a sum
        "host_ms_inside_late_gaps": {name: round(ms, 2) for name, ms in top},
    }


def check_offload(model, args, shares: list[float]) -> dict:
    """Loss and trained gradients of one step at each offload share against share 0 (max relative
    difference of each), and each one's peak memory: the offload must change neither. Run with
    torch's deterministic algorithms: the WKV-4 kernels' default mode rounds differently from run to
    run (its decoupled look-back), so two RWKV-4 steps differ by ~3% of a bf16 gradient even without
    the offload (H100, 2026-12-06)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _check_offload(model, args, shares)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _check_offload(model, args, shares: list[float]) -> dict:
    ids = torch.randint(1, model.config.vocab_size, (1, args.check), device=args.device)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    results, reference = {}, None
    for share in [0.0, *[s for s in shares if s]]:
        set_chunk_len(model, args.chunk, share)
        model.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in trained if p.grad is not None}
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
        if reference is None:
            reference = (loss.item(), grads)
        worst = max(
            (g - reference[1][n]).abs().max().item() / max(reference[1][n].abs().max().item(), 1e-30)
            for n, g in grads.items()
        )
        results[share] = {
            "loss": loss.item(),
            "loss_diff": abs(loss.item() - reference[0]),
            "grad_max_rel_diff": worst,
            "peak_gib": peak,
            "grads": len(grads),
        }
        print(f"check T={args.check} offload {share}: {results[share]}", flush=True)
    model.zero_grad(set_to_none=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shape", help="a bench_step.py shape: rwkv4-1.6b, rwkv7-1.5b, tiny4, ...")
    ap.add_argument("tag", help="names the output file")
    ap.add_argument("--gc", default="freeze_pause", choices=["on", "freeze", "pause", "freeze_pause"])
    ap.add_argument("--lengths", default="4096,16384,65536,131072")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variant", default="compile_selective")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--offload", default="0", help="comma-separated training.chunk_offload shares")
    ap.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode of the blocks: reduce-overhead replays CUDA graphs (the chunks then replay "
        "instead of checkpointing: rwkv_ft.models.chunk_replay); each step marks a graph generation",
    )
    ap.add_argument(
        "--streams",
        action="store_true",
        help="one more profiled step per length, read per CUDA stream (compute-stream gaps, copies)",
    )
    ap.add_argument(
        "--check",
        type=int,
        default=0,
        help="first compare one step's loss and gradients at each share with share 0, at this T",
    )
    args = ap.parse_args()

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    clock = CollectorClock()
    graphs = args.compile_mode in CUDAGRAPH_COMPILE_MODES
    model = bare_model(args.shape, args.variant, args.device, {"mode": args.compile_mode} if args.compile_mode else {})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=args.device == "cuda")
    pause = args.gc in ("pause", "freeze_pause")
    out = {
        "shape": args.shape,
        "variant": args.variant,
        "gc": args.gc,
        "chunk": args.chunk,
        "compile_mode": args.compile_mode,
        "cpp_wrapper": os.environ.get("TORCHINDUCTOR_CPP_WRAPPER") == "1",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "lengths": {},
    }
    path = Path(os.environ.get("OUT", ".")) / f"long_context_host_{args.tag}.json"
    settings = args.offload.split(",")  # "share" or "share@prefetch GiB"
    shares = sorted({float(x.split("@")[0]) for x in settings})
    out["offload"] = settings
    if args.check:
        out["check"] = check_offload(model, args, shares)
    default_window = offload_module.PREFETCH_BYTES
    for T, setting in [(int(x), setting) for x in args.lengths.split(",") for setting in settings]:
        share = float(setting.split("@")[0])
        if share and T <= args.chunk:
            continue  # one chunk: nothing to offload
        set_chunk_len(model, args.chunk, share)
        window_gib = setting.split("@")[1] if "@" in setting else None
        offload_module.PREFETCH_BYTES = int(float(window_gib) * 2**30) if window_gib else default_window
        ids = torch.randint(1, model.config.vocab_size, (1, T), device=args.device)

        def step(ids=ids):
            if graphs:  # a new step, as rwkv_ft.train marks it: the graphs may reuse the last step's memory
                torch.compiler.cudagraph_mark_step_begin()
            with collector_paused() if pause else contextlib.nullcontext():
                loss = model(ids, labels=ids).loss
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        start = time.perf_counter()
        for _ in range(2):
            step()
        sync()
        warm = time.perf_counter() - start
        if args.gc.startswith("freeze"):
            gc.collect()
            gc.freeze()
        clock.reset()
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        walls, enqueued = [], []
        for _ in range(args.steps):
            sync()
            start = time.perf_counter()
            step()
            enqueued.append(time.perf_counter() - start)
            sync()
            walls.append(time.perf_counter() - start)
        gc_s, gc_n, gc_each = clock.seconds, clock.count, list(clock.each)  # the timed steps only
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
        reserved = torch.cuda.max_memory_reserved() / 2**30 if args.device == "cuda" else None
        syncs = host_syncs(step, args.device)
        prof = profile_step(step, args.device)
        streams = stream_breakdown(step) if args.streams and args.device == "cuda" else None
        if streams:
            print(f"streams T={T} offload {setting}: {json.dumps(streams)}", flush=True)
        gc.unfreeze()
        median = sorted(walls)[len(walls) // 2]
        out["lengths"][f"{T}_offload{setting}" if share else T] = {
            "offload": share,
            "prefetch_gib": offload_module.PREFETCH_BYTES / 2**30,
            "host_pinned_gib": host_memory_pool(pin=args.device == "cuda").total_bytes / 2**30,
            "tok_s": T / median,
            "wall_s": walls,
            "enqueued_s": enqueued,
            "warmup_s": warm,
            "gc_s": gc_s,
            "gc_collections": gc_n,
            "gc_each": gc_each,  # (generation, objects collected, seconds) per collection
            "peak_gib": peak,
            "peak_reserved_gib": reserved,
            "host_syncs": len(syncs),
            "host_sync_sites": sorted(set(syncs)),
            "gpu_busy_ms": prof["gpu_busy_ms"],
            "wall_ms_profiled": prof["wall_ms_profiled"],
            "launches": prof["launches"],
            "families": prof["families"],
            "streams": streams,
        }
        busy = f"{prof['gpu_busy_ms']:.0f} ms" if prof["gpu_busy_ms"] else "-"
        print(
            f"{args.shape} T={T} offload {setting}: {T / median:,.0f} tok/s; step s {[round(x, 3) for x in walls]} "
            f"(enqueued {[round(x, 3) for x in enqueued]}); gc {gc_s:.3f} s in {gc_n}; host syncs {len(syncs)}; "
            f"peak {peak or 0:.2f} GiB (reserved {reserved or 0:.2f}); GPU busy {busy}, {prof['launches']} launches; "
            f"warm-up {warm:.1f} s",
            flush=True,
        )
        path.write_text(json.dumps(out, indent=1))  # after every setting: a call cut short keeps what ran
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
