"""LoRA's skinny products at the training steps' shapes (r = 16): cuBLAS (a split-K GEMM and a reduce
kernel) against a one-kernel Triton product, one program per BP rows of the result walking all of K
(NOTES.md, twenty-first session: cuBLAS won where x is row-major, the kernel only for the weight
gradients, and the whole adapted Linear with it ran the 7.6B step 0.975x: not adopted).

    source .whl/prelude.sh && python -u benchmarks/bench_lora_skinny.py     # GPU, ~1-2 minutes

Shapes: RWKV-4 7.6B at batch 1 (1,024 tokens, D 4,096), 1.6B and RWKV-7 1.5B at batch 4 (4,096
tokens, D 2,048). The four products of an adapted Linear (x: (N, D) activations, A: (r, D),
B: (D, r), dY: (N, D), xa = x @ A^T): x @ A^T, dY @ B, dY^T @ xa (B's gradient), x^T @ dxa (A's).
CUDA-graph timings (do_bench_cudagraph: a kernel boundary's idle time included), microseconds, and
each result's relative error against an fp32 product. Writes $OUT/lora_skinny.json.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph


@dataclasses.dataclass(frozen=True)
class SkinnyConfig:
    """BP rows of C per program, K in steps of BK, with `warps` warps and `stages` loads in flight."""

    bp: int
    bk: int
    warps: int = 4
    stages: int = 4


@triton.jit
def _skinny_kernel(
    x_ptr, z_ptr, c_ptr, P, K, R, s_xp, s_xk, s_zk, s_zr, s_cp,
    BP: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BP + tl.arange(0, BP)  # (BP,)
    ks = tl.arange(0, BK)
    cols = tl.arange(0, BR)
    row_ok = rows < P
    col_ok = cols < R
    x_at = x_ptr + rows.to(tl.int64)[:, None] * s_xp + ks.to(tl.int64)[None, :] * s_xk  # (BP, BK)
    z_at = z_ptr + ks.to(tl.int64)[:, None] * s_zk + cols[None, :] * s_zr  # (BK, BR)
    acc = tl.zeros((BP, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + ks) < K
        x = tl.load(x_at, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        z = tl.load(z_at, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x, z, acc)
        x_at += BK * s_xk
        z_at += BK * s_zk
    c_at = c_ptr + rows.to(tl.int64)[:, None] * s_cp + cols[None, :]
    tl.store(c_at, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _padded_rank(R: int) -> int:
    """The MMA's column count: R rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(R))


def default_config(x: torch.Tensor, R: int) -> SkinnyConfig:
    """The rule. Rows of X contiguous (x @ A^T, dY @ B): 16 rows a program, so a 1,024-token batch
    still gives 64 programs, and K in steps of 256. P contiguous (the weight gradients, X a transposed
    view): 64 rows, a 128-byte line per load, and K in steps of 64."""
    if x.stride(0) == 1 and x.stride(1) != 1:
        return SkinnyConfig(bp=64, bk=64)
    return SkinnyConfig(bp=16, bk=256 if _padded_rank(R) <= 32 else 128)


def skinny_matmul_triton(x: torch.Tensor, z: torch.Tensor, config: SkinnyConfig | None = None) -> torch.Tensor:
    """x (P, K) @ z (K, R) -> (P, R) contiguous in x's dtype, fp32 accumulation; any strides."""
    P, K = x.shape
    R = z.shape[1]
    cfg = config or default_config(x, R)
    c = torch.empty((P, R), dtype=x.dtype, device=x.device)
    _skinny_kernel[(triton.cdiv(P, cfg.bp),)](
        x, z, c, P, K, R, x.stride(0), x.stride(1), z.stride(0), z.stride(1), c.stride(0),
        BP=cfg.bp, BK=cfg.bk, BR=_padded_rank(R), num_warps=cfg.warps, num_stages=cfg.stages,
        enable_fp_fusion=True,
    )  # fmt: skip
    return c


SHAPES = {"7.6b": (1024, 4096), "1.6b": (4096, 2048)}  # tokens, hidden size
RANK = 16
CONFIGS = [SkinnyConfig(bp, bk) for bp in (16, 32, 64) for bk in (64, 128, 256)]


def products(N: int, D: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (x, z) of each skinny product of one adapted Linear, laid out as LoRA has them."""
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    x = torch.randn(N, D, **bf16)
    A = torch.randn(RANK, D, **bf16) / D**0.5
    B = torch.randn(D, RANK, **bf16) / RANK**0.5
    dy = torch.randn(N, D, **bf16)
    xa = x @ A.t()
    return {"x@A^T": (x, A.t()), "dY@B": (dy, B), "dY^T@xa": (dy.t(), xa), "x^T@dxa": (x.t(), xa)}


def time_us(fn) -> float:
    return do_bench_cudagraph(fn, rep=50) * 1e3


def relative(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference).norm() / reference.norm()).item()


def bench_products(results: dict) -> None:
    for shape, (N, D) in SHAPES.items():
        for name, (x, z) in products(N, D).items():
            reference = x.float() @ z.float()
            rule = default_config(x, RANK)
            rows = {"cuBLAS": lambda x=x, z=z: x @ z, f"rule {rule}": lambda x=x, z=z: skinny_matmul_triton(x, z)}
            for cfg in CONFIGS:
                rows[str(cfg)] = lambda x=x, z=z, cfg=cfg: skinny_matmul_triton(x, z, cfg)
            for label, fn in rows.items():
                try:
                    err = relative(fn(), reference)
                    us = time_us(fn)
                except Exception as exc:  # a config Triton cannot build: say so, time the rest
                    print(shape, name, label, "failed:", str(exc)[:160], flush=True)
                    continue
                results[f"{shape} {name} {label}"] = {"us": round(us, 2), "rel_err": err}
                print(f"{shape:5} {name:9} {label:58} {us:8.2f} us  rel err {err:.2e}", flush=True)


def main() -> None:
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    bench_products(results)
    with open(os.path.join(os.environ.get("OUT", "."), "lora_skinny.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
