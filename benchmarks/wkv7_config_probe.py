"""Which WKV-7 kernel configs run on this GPU: each (value block, warps) in its own process (a
faulting kernel poisons the CUDA context), forward + backward against the PyTorch reference.
Prints one line per config and, last, `MAX_BV <n>`: the largest value block that passed with the
rule's warps. Optionally re-runs the first failure under compute-sanitizer.

    source .whl/prelude.sh && python -u benchmarks/wkv7_config_probe.py [--sanitize]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CASE = r"""
import sys, torch
import rwkv_ft.kernels.rwkv7.triton_wkv7 as tw
from rwkv_ft.kernels import wkv7, wkv7_reference
from rwkv_ft.testing import relative_error
bv, warps, B, T, H = (int(x) for x in sys.argv[1:6])
tw._CFG_OVERRIDE = dict(bv_fwd=bv, bv_bwd=bv, warps_fwd=warps, warps_bwd=warps)
g = torch.Generator("cuda").manual_seed(0)
xs = [torch.randn(B, T, H, 64, device="cuda", generator=g) for _ in range(6)]
xs[1] = -0.6 * torch.rand(B, T, H, 64, device="cuda", generator=g)
kk = torch.nn.functional.normalize(xs[4], dim=-1); xs[4], xs[5] = -kk, kk * torch.rand_like(kk)
outs = []
for fn in (lambda *a: wkv7(*a, backend="triton"), wkv7_reference):
    leaves = [x.clone().requires_grad_() for x in xs]
    y, s = fn(*leaves)
    (y.square().sum() + s.sum()).backward()
    torch.cuda.synchronize()
    outs.append([y, s] + [x.grad for x in leaves])
err = max(relative_error(a, b) for a, b in zip(*outs))
print(f"RESULT {'ok' if err < 1e-4 else 'WRONG'} {err:.2e}")
"""


def run_case(bv, warps, shape, prefix=()):
    cmd = [*prefix, sys.executable, "-c", CASE, str(bv), str(warps), *map(str, shape)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        return "timeout", ""
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT")), None)
    return (line.split(" ", 1)[1] if line else f"crash (rc {p.returncode})"), p.stdout[-3000:] + p.stderr[-3000:]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sanitize", action="store_true")
    args = ap.parse_args()
    shape = (8, 96, 32)  # B * H = 256 programs of 64 rows: the rule's big-shape choice
    passed, first_failure = [], None
    for bv, warps in ((16, 4), (32, 4), (32, 8), (64, 4), (64, 8)):
        status, log = run_case(bv, warps, shape)
        print(f"bv={bv} warps={warps} {shape}: {status}", flush=True)
        if status.startswith("ok"):
            passed.append((bv, warps))
        elif first_failure is None:
            first_failure = (bv, warps, log)
    rule_warps = {16: 4, 32: 4, 64: 8}
    best = max([bv for bv, w in passed if w == rule_warps[bv]], default=16)
    if first_failure and args.sanitize:
        bv, warps, _ = first_failure
        env_prefix = ["compute-sanitizer", "--tool", "memcheck", "--print-limit", "5"]
        _, log = run_case(bv, warps, (8, 16, 32), prefix=env_prefix)
        print(f"compute-sanitizer bv={bv} warps={warps}:\n{log[-2500:]}", flush=True)
    print(f"MAX_BV {best}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
