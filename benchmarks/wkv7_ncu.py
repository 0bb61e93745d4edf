"""Nsight Compute counters of the WKV-7 Triton kernels: why each one runs at the speed it does.

    source .whl/prelude.sh && python -u benchmarks/wkv7_ncu.py [--shape 8,1024,32] [--out DIR]

Runs itself under `ncu` (clocks left alone, as the device notes ask) around one bf16 forward +
backward after a warm-up call, so that only the timed call's kernels are profiled and none of
Triton's compilation. Per kernel: duration, achieved occupancy and what limits it (registers,
shared memory), issue-slot use, warp cycles per issued instruction and the stall reasons behind
them, memory throughput. Writes DIR/wkv7.ncu-rep, DIR/wkv7_ncu_details.txt (ncu's own tables)
and DIR/wkv7_ncu_raw.csv (every collected metric), DIR defaulting to $OUT or '.'.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys

SECTIONS = (
    "SpeedOfLight",
    "LaunchStats",
    "Occupancy",
    "SchedulerStats",
    "WarpStateStats",
    "InstructionStats",
    "MemoryWorkloadAnalysis",
)


def profiled_call(shape: str) -> None:
    """One warm-up fwd+bwd (compilation), then one between cudaProfilerStart and Stop."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_wkv7 import fwd_bwd, inputs, ours

    B, T, H = (int(x) for x in shape.split(","))
    xs, s, reset = inputs(B, T, H, torch.bfloat16)
    fwd_bwd(ours, xs, s, reset, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    fwd_bwd(ours, xs, s, reset, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def run_ncu(shape: str, out: str) -> int:
    installed = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu") + glob.glob("/usr/local/cuda*/bin/ncu"))
    ncu = shutil.which("ncu") or (installed[-1] if installed else None)
    if ncu is None:
        print("wkv7_ncu: no `ncu` on PATH (Nsight Compute is needed)", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    report = os.path.join(out, "wkv7")
    sections = [arg for name in SECTIONS for arg in ("--section", name)]
    cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--kernel-name", "regex:_prep|_scan|_grad"]
    cmd += [*sections, "--force-overwrite", "--export", report]
    cmd += [sys.executable, "-u", __file__, "--child", "--shape", shape]
    print(" ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        return rc
    for page, suffix in (("details", "_ncu_details.txt"), ("raw", "_ncu_raw.csv")):
        extra = ["--csv"] if page == "raw" else []
        with open(report + suffix, "w") as f:
            subprocess.call([ncu, "--import", report + ".ncu-rep", "--page", page, *extra], stdout=f)
    with open(report + "_ncu_details.txt") as f:
        print(f.read(), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="8,1024,32", help="B,T,H (N = 64)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        profiled_call(args.shape)
        return 0
    return run_ncu(args.shape, args.out)


if __name__ == "__main__":
    sys.exit(main())
