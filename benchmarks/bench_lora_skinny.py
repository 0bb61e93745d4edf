"""LoRA's skinny products at the training steps' shapes (r = 16; RWKV-4 7.6B at batch 1: M 1,024 x
K 4,096; 1.6B at batch 4: M 4,096 x K 2,048): the layouts cuBLAS can be handed against a one-kernel
Triton product (NOTES.md, queue item 14). cuBLAS runs x @ A^T as a split-K GEMM plus a reduce kernel.

    source .whl/prelude.sh && python -u benchmarks/bench_lora_skinny.py     # GPU, ~1 minute

CUDA-graph timings (do_bench_cudagraph: a kernel boundary's idle time included), microseconds;
the down-projections' relative error against an fp32 product. Writes $OUT/lora_skinny.json.
"""

import json
import os

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph


@triton.jit
def _skinny(x_ptr, a_ptr, c_ptr, M, K, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    rr = tl.arange(0, R)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, R), tl.float32)
    for k in range(0, K, BK):
        x = tl.load(x_ptr + rm[:, None] * K + (k + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        a = tl.load(a_ptr + rr[:, None] * K + (k + rk)[None, :])
        acc = tl.dot(x, tl.trans(a), acc)
    tl.store(c_ptr + rm[:, None] * R + rr[None, :], acc.to(c_ptr.dtype.element_ty), mask=rm[:, None] < M)


def skinny(x, a, BM=16, BK=128, warps=4, stages=4):
    M, K = x.shape
    R = a.shape[0]
    c = torch.empty(M, R, device=x.device, dtype=x.dtype)
    _skinny[(triton.cdiv(M, BM),)](x, a, c, M, K, R, BM, BK, num_warps=warps, num_stages=stages)
    return c


def cases_for(x: torch.Tensor, A: torch.Tensor, dy: torch.Tensor, xa: torch.Tensor) -> dict:
    """name -> a zero-argument call of one product (the LoRA A weight is (16, K); B stands in as A)."""
    cases = {
        "down x@A.T": lambda: x @ A.t(),
        "down (A@x.T).T": lambda: (A @ x.t()).t(),
        "down pad32": lambda: x @ torch.nn.functional.pad(A, (0, 0, 0, 16)).t(),
        "dA dxa.T@x": lambda: xa.t() @ x,
        "dA (x.T@dxa).T": lambda: (x.t() @ xa).t(),
        "dB dy.T@xa": lambda: dy.t() @ xa,
        "dB (xa.T@dy).T": lambda: (xa.t() @ dy).t(),
        "up xa@B.T": lambda: xa @ A,
    }
    for BM in (16, 32):
        for BK in (128, 256):
            cases[f"triton down BM{BM} BK{BK} w4"] = lambda BM=BM, BK=BK: skinny(x, A, BM, BK, 4)
    return cases


def main() -> None:
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    for name, M, K in (("7.6b", 1024, 4096), ("1.6b", 4096, 2048)):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        A = torch.randn(16, K, device="cuda", dtype=torch.bfloat16) / 64
        dy = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        xa = x @ A.t()
        reference = x.float() @ A.float().t()
        for label, fn in cases_for(x, A, dy, xa).items():
            try:
                out = fn()
                err = relative(out, reference) if label.startswith(("down", "triton")) else None
                us = do_bench_cudagraph(fn, rep=50) * 1e3
            except Exception as exc:  # a config Triton cannot build: say so, time the rest
                print(name, label, "failed:", str(exc)[:200], flush=True)
                continue
            results[f"{name} {label}"] = {"us": round(us, 2), "rel_err": err}
            print(f"{name:5} {label:28} {us:8.2f} us  rel err {err}", flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "lora_skinny.json"), "w") as f:
        json.dump(results, f, indent=1)


def relative(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference).norm() / reference.norm()).item()


if __name__ == "__main__":
    main()
