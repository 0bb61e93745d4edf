"""Find which WKV-7 kernel configs run on this GPU: every config in its own process (a fault
poisons only that process's CUDA context), each kernel launched and synchronised on its own, the
result checked against the float64 reference. Prints one line per config and writes
DIR/wkv7_diag.json (DIR: --out, default $OUT or '.'): the passing configs, fastest-first order
unknown (this only checks).

    source .whl/prelude.sh && python -u benchmarks/wkv7_gpu_diag.py [--jobs 8] [--sanitize]

--sanitize also runs the rule's config once under compute-sanitizer (memcheck) and prints the
first report (kernel, source line).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys

CONFIGS = [  # in order of preference: the first passing one becomes the benchmark's base
    {},
    {"chunk": 32, "bv_scan": 32},
    {"chunk": 16},
    {"chunk": 16, "bv_scan": 32},
    {"chunk": 64},
    {"chunk": 64, "bv_scan": 32},
    {"bv_grad": 16},
    {"warps_grad": 8},
    {"warps_grad": 8, "bv_grad": 16},
    {"warps_prep": 8},
    {"warps_scan": 8},
    {"chunk": 16, "warps_grad": 8},
    {"keep_prep": True},
    {"stages_scan": 1},
    {"stages_scan": 3},
    {"chunk": 16, "bv_scan": 16, "bv_grad": 16},
]

CHILD = r"""
import json, math, os, sys, torch
dev = os.environ.get("DIAG_DEVICE", "cuda")
import rwkv_ft.kernels.rwkv7.triton_wkv7 as tw
from rwkv_ft.kernels import wkv7_reference
cfg = json.loads(sys.argv[1])
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
tw._CFG_OVERRIDE = cfg or None
B, T, H, N = 2, 100, 2, 64
g = torch.Generator(device=dev).manual_seed(0)
rn = lambda *s: torch.randn(*s, device=dev, generator=g)
r, k, v = rn(B, T, H, N), rn(B, T, H, N), rn(B, T, H, N)
kk = torch.nn.functional.normalize(rn(B, T, H, N), dim=-1)
a, b = -kk, kk * torch.sigmoid(rn(B, T, H, N))
w = -math.exp(-0.5) * torch.sigmoid(2 * rn(B, T, H, N))
xs = [x.bfloat16() for x in (r, w, k, v, a, b)]
s0 = 0.5 * rn(B, H, N, N)
c = tw._config(B, T, H, N, torch.bfloat16)
out = {"cfg": str(c)}
step = "prep"
try:
    qt, mm, yct, dd = tw._prep(*xs, None, c, True); sync()
    step = "fwd (prep + scan)"
    y, sT, saved = tw.wkv7_fwd(*xs, s0, None, c, True); sync()
    gy = rn(B, T, H, N).bfloat16()
    step = "bwd"
    grads = tw.wkv7_bwd(*xs, None, saved, gy, None, c, True); sync()
    step = "check"
    ps = [x.double().requires_grad_() for x in xs]; st = s0.double().requires_grad_()
    ry, rs = wkv7_reference(*ps, st)
    (ry * gy.double()).sum().backward()
    rel = lambda x, e: ((x.double() - e).norm() / e.norm()).item()
    floor = rel(ry.bfloat16(), ry.detach())
    out["y/floor"] = rel(y, ry.detach()) / floor
    out["state"] = rel(sT, rs.detach())
    for n, gg, p in zip(("dr", "dw", "dk", "dv", "da", "db"), grads[:6], ps):
        out[n + "/floor"] = rel(gg, p.grad) / rel(p.grad.bfloat16(), p.grad)
    out["dstate"] = rel(grads[6], st.grad)
    out["ok"] = all(v < 1.5 for kk_, v in out.items() if kk_.endswith("/floor")) and out["state"] < 1e-3
except Exception as e:
    out["ok"] = False
    out["failed_at"] = step
    out["error"] = repr(e)[:300]
print("DIAG_JSON " + json.dumps(out))
"""


def run_one(cfg: dict, timeout: float = 240) -> dict:
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    try:
        p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], env=env, capture_output=True, text=True,
                           timeout=timeout)  # fmt: skip
        line = [x for x in p.stdout.splitlines() if x.startswith("DIAG_JSON")]
        res = json.loads(line[0].split(" ", 1)[1]) if line else {"ok": False, "error": p.stderr[-800:]}
    except subprocess.TimeoutExpired:
        res = {"ok": False, "error": f"timeout {timeout} s"}
    res["override"] = cfg
    return res


def sanitize(cfg: dict) -> str:
    exe = "compute-sanitizer"
    try:
        p = subprocess.run([exe, "--tool", "memcheck", "--show-backtrace", "no", "--print-limit", "3", sys.executable,
                            "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, timeout=400)  # fmt: skip
        return (p.stdout + p.stderr)[-4000:]
    except Exception as e:  # noqa: BLE001
        return f"compute-sanitizer failed: {e!r}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--sanitize", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_one, CONFIGS))
    for r in results:
        status = "ok  " if r.get("ok") else "FAIL"
        detail = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k not in ("cfg", "ok")}
        print(f"{status} {json.dumps(detail)}", flush=True)
    out = {"results": results}
    best = next((r["override"] for r in results if r.get("ok")), None)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "wkv7_best.json"), "w") as f:  # the first passing config, in CONFIGS order
        json.dump(best, f)
    print(f"first passing config: {best}", flush=True)
    if args.sanitize:
        out["sanitizer"] = sanitize({})
        print(out["sanitizer"], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "wkv7_diag.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
