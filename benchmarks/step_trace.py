"""Where the GPU waits in one training step: a chrome trace of one profiled step of
`bench_step.py`'s bare loop, its GPU idle gaps with the host work running during each, and the
copy and memset kernels with their neighbours (which op issued a copy inside a CUDA graph).

    source .whl/prelude.sh && python -u benchmarks/step_trace.py rwkv4-7.6b:compile_ckpt,compile_selective \\
        [--compile-mode reduce-overhead] [--out DIR]

Writes DIR/trace_<shape>_<variant>.json.gz (open in chrome://tracing or Perfetto) and prints the
summary. `--analyze FILE.json.gz` prints the summary of a trace written before (no GPU needed).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def analyze(path: str | Path, copies: tuple[str, ...] = ("memcpy", "Memcpy", "Memset")) -> None:
    """Print the compute stream's gaps and their causes (`long_context_host.stream_report`) and the
    copy and memset kernels, each with the kernels around it (in a CUDA graph, what issued it)."""
    from long_context_host import stream_report

    events = json.load(gzip.open(path))["traceEvents"]
    print(path)
    print(json.dumps(stream_report(events), indent=1))
    kernels = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"]
    )
    for name in sorted({e["name"] for e in kernels if e["name"].startswith(copies)}):
        places = [i for i, e in enumerate(kernels) if e["name"] == name]
        neighbours = Counter(
            (kernels[i - 1]["name"][:50] if i else "-", kernels[i + 1]["name"][:50] if i + 1 < len(kernels) else "-")
            for i in places
        )
        print(f"{name}: {len(places)} calls, {sum(kernels[i]['dur'] for i in places) / 1e3:.2f} ms")
        for (before, after), count in neighbours.most_common(3):
            print(f"    {count} x after {before} | before {after}")


def trace_step(shape: str, variant: str, compile_mode: str | None, out: Path) -> Path:
    """Warm up, time five steps, then write the trace of one more."""
    import torch
    from bench_step import SHAPES, bare_model, bare_step
    from torch.profiler import ProfilerActivity, profile

    model = bare_model(shape, variant, "cuda", {"mode": compile_mode} if compile_mode else {})
    step = bare_step(model, "cuda", SHAPES[shape][4], 1024)

    times = []
    for i in range(10):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(time.perf_counter() - start)
    print(f"{shape} {variant}: step {sorted(times)[2] * 1e3:.1f} ms unprofiled (median of 5)", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    plain = out / f"trace_{shape}_{variant}.json"
    prof.export_chrome_trace(str(plain))
    path = plain.with_suffix(".json.gz")
    with open(plain, "rb") as f, gzip.open(path, "wb") as g:
        g.write(f.read())
    plain.unlink()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="?", help="shape:variant[,variant...] (bench_step.py's names)")
    ap.add_argument("--compile-mode", default="reduce-overhead")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--analyze", default=None, help="a trace written before: print its summary only")
    args = ap.parse_args()
    if args.analyze:
        analyze(args.analyze)
        return
    if not args.cases:
        ap.error("give shape:variant,... or --analyze FILE")
    shape, variants = args.cases.split(":")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for variant in variants.split(","):
        analyze(trace_step(shape, variant, args.compile_mode or None, out))


if __name__ == "__main__":
    main()
