"""Which products of the WKV-7 Triton kernel could take one tf32 MMA instead of the fp32-grade
bf16x3 split, and stay at the bf16 rounding floor? A CPU study (no GPU needed).

    TRITON_INTERPRET=1 python benchmarks/wkv7_precision_study.py [--T 512] [--H 2] [--sites all]

It runs the kernel under the Triton interpreter on bf16 inputs and replaces `_mm` (every product
of fp32 operands in `kernels/rwkv7/triton_wkv7.py`) by a dispatcher that knows its call site (the
caller's source line). At the chosen sites it emulates one tf32 MMA: both operands truncated to
tf32's 10-bit mantissa (the conservative reading of what the tensor cores do with fp32 registers),
products accumulated in fp32. Every output (y, the final state, the six input gradients and the
state's) is compared with the float64 reference and, for the bf16 outputs, divided by the error
that rounding the float64 result to bf16 alone gives (the issue's "floor"; goal <= 1.2x).

Order: the exact kernel; each call site made tf32 alone; then all the sites whose own worst ratio
stayed under --keep (default 1.02x) together (or only a given set: --together SITE,SITE...). The
instructions a change would save come from `wkv7_compile_report.py` (sm_90a, no GPU), the time
only from a GPU run.
"""

from __future__ import annotations

import argparse
import json
import linecache
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import bench_wkv7 as bench  # noqa: E402  (benchmarks/ is on sys.path when this script runs)
import rwkv_ft.kernels.rwkv7.triton_wkv7 as tw  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from rwkv_ft.testing import relative_error  # noqa: E402

bench.DEV = "cpu"

OUTPUTS = ["y", "state_T", "dr", "dw", "dk", "dv", "da", "db", "dstate"]
FP32_OUTPUTS = {"state_T", "dstate"}  # fp32 whatever the inputs: no bf16 floor


@triton.jit
def _mm_tf32(x, y):
    """x @ y with both operands truncated to tf32 (sign, 8 exponent bits, 10 mantissa bits)."""
    xt = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    yt = (y.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return tl.dot(xt, yt, input_precision="ieee")


class SiteDispatch:
    """Stands in for `triton_wkv7._mm`: records each call site, emulates tf32 at `fast` ones."""

    def __init__(self, exact):
        self.exact = exact
        self.fast: set[str] = set()
        self.seen: dict[str, str] = {}

    def __call__(self, x, y, PREC, XE, YE):
        caller = sys._getframe(1)
        site = f"{caller.f_code.co_name}:{caller.f_lineno}"
        if site not in self.seen:
            self.seen[site] = linecache.getline(caller.f_code.co_filename, caller.f_lineno).strip()
        if site in self.fast:
            return _mm_tf32(x, y)
        return self.exact(x, y, PREC, XE, YE)


def study_inputs(B, T, H, resets=2, seed=0):
    """bench_wkv7's inputs (the model's distribution) in bf16 with a random fp32 state, and
    `resets` resets after the first token (one at token 0 would cut the state's gradient off)."""
    xs, s, _ = bench.inputs(B, T, H, torch.bfloat16, state=True, seed=seed)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, torch.randint(1, T, (resets,), generator=torch.Generator().manual_seed(seed))] = True
    return xs, s, reset


def outputs(fn, xs, s, reset, leaf_dtype=None) -> list[torch.Tensor]:
    """y, the final state and the gradients of r, w, k, v, a, b and the state (bench_wkv7.fwd_bwd)."""
    y, ns, grads = bench.fwd_bwd(fn, xs, s, reset, xs[0].dtype, leaf_dtype=leaf_dtype)
    return [y, ns, *grads]


def ratios(got, ref, dtype) -> dict[str, float]:
    out = {}
    for name, g, e in zip(OUTPUTS, got, ref):
        err = relative_error(g, e)
        out[name] = err if name in FP32_OUTPUTS else err / relative_error(e.to(dtype), e)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--H", type=int, default=2)
    ap.add_argument("--keep", type=float, default=1.02, help="a site is kept when all its ratios stay under this")
    ap.add_argument("--sites", default="all", help="comma list of sites (function:line) to try, or all")
    ap.add_argument("--together", default=None, help="comma list of sites to run as one set (no single-site runs)")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (the study replaces the kernel's product on the interpreter)")
    dtype = torch.bfloat16
    xs, s, reset = study_inputs(args.B, args.T, args.H)
    ref = outputs(bench.reference64, xs, s, reset, torch.float64)
    dispatch = SiteDispatch(tw._mm)
    tw._mm = dispatch

    def run(fast: set[str]) -> dict[str, float]:
        dispatch.fast = fast
        t0 = time.time()
        got = outputs(bench.ours, xs, s, reset)
        res = ratios(got, ref, dtype)
        print(f"  ({time.time() - t0:.0f} s) " + " ".join(f"{k}={v:.3g}" for k, v in res.items()), flush=True)
        return res

    print(f"B{args.B} T{args.T} H{args.H} N{bench.N} bf16 inputs, state and resets; bf16 outputs: error / floor")
    print("exact (bf16x3 everywhere):")
    results = {"exact": run(set())}
    if args.together:  # one given set, no single-site runs
        kept = set(args.together.split(","))
    else:
        sites = list(dispatch.seen) if args.sites == "all" else args.sites.split(",")
        for site in sites:
            print(f"{site}  {dispatch.seen.get(site, '')}")
            results[site] = run({site})
        worst = {site: max(v for k, v in results[site].items() if k not in FP32_OUTPUTS) for site in sites}
        kept = {site for site, w in worst.items() if w <= args.keep}
    print(f"together: {sorted(kept)}")
    results["together"] = run(kept)
    results["kept"] = sorted(kept)
    results["source"] = dispatch.seen
    unknown = kept - set(dispatch.seen)
    if unknown:
        print(f"(never called: {sorted(unknown)})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
