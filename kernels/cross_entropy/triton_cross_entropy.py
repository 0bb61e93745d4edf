"""Cross-entropy over rows of logits in one Triton kernel.

Each program takes BLOCK_R rows and walks the vocabulary BLOCK_V columns at a time:
- pass 1 keeps a running max m and a running sum s of exp(x - m) (online softmax), so
  lse = m + log(s) costs one read of the row; the target's logit is one gathered load;
- pass 2 (WRITE_GRAD) reads the row again and writes d(sum of losses)/d(logits) = softmax - onehot
  (zero on ignored rows) in the logits' dtype.
All arithmetic is fp32 (fp64 for fp64 logits). That is two reads and one write of the logits, where
the eager form (cast to fp32, logsumexp, then exp, scatter, scale and cast in the backward) moves
~10 times as many bytes. Rows are independent: no atomics, the same bits on every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rwkv_ft.kernels.launch_options import FIXED_LAUNCH_OPTIONS

from .reference import IGNORE_INDEX

# Test hook: every output the host code allocates starts as NaN, so an element the kernel forgets
# to write fails the comparison.
POISON_OUTPUTS = False


@triton.jit
def _rows_kernel(
    logits_ptr, stride_l, targets_ptr, loss_ptr, grad_ptr, stride_g, N, V, W,
    IGNORE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
    row_ok = rows < N
    acc_t = tl.float64 if logits_ptr.dtype.element_ty == tl.float64 else tl.float32
    line = logits_ptr + rows.to(tl.int64) * stride_l  # (R,) row starts
    t = tl.load(targets_ptr + rows, mask=row_ok, other=IGNORE)
    scored = row_ok & (t != IGNORE)
    in_range = (t >= 0) & (t < V)
    cols = tl.arange(0, BLOCK_V)

    m = tl.full((BLOCK_R,), float("-inf"), acc_t)
    s = tl.zeros((BLOCK_R,), acc_t)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        x = tl.load(line[:, None] + c[None, :], mask=row_ok[:, None] & (c < V)[None, :], other=float("-inf"))
        x = x.to(acc_t)  # (R, BLOCK_V)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # where nothing but -inf has been seen, shift by 0 instead (-inf - -inf would be NaN)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new).to(acc_t)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        m = m_new
    s = tl.where(row_ok, s, 1.0)  # rows past N: no log(0)
    lse = tl.where(m == float("-inf"), 0.0, m).to(acc_t) + tl.log(s)  # -inf for a row of -inf
    picked = tl.load(line + tl.where(in_range, t, 0), mask=scored & in_range, other=0.0).to(acc_t)
    loss = tl.where(in_range, lse - picked, float("nan"))  # a target outside the vocabulary: NaN
    tl.store(loss_ptr + rows, tl.where(scored, loss, 0.0).to(loss_ptr.dtype.element_ty), mask=row_ok)

    if WRITE_GRAD:  # over all W columns: those past the V classes (padding) get 0
        out = grad_ptr + rows.to(tl.int64) * stride_g
        for start in range(0, W, BLOCK_V):
            c = start + cols
            mask = row_ok[:, None] & (c < W)[None, :]
            x = tl.load(line[:, None] + c[None, :], mask=mask & (c < V)[None, :], other=float("-inf")).to(acc_t)
            p = tl.exp(x - lse[:, None])
            p = tl.where((c[None, :] == t[:, None]) & in_range[:, None], p - 1.0, p)
            p = tl.where(scored[:, None], p, 0.0)
            tl.store(out[:, None] + c[None, :], p.to(grad_ptr.dtype.element_ty), mask=mask)


def _config(V: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps). On a GPU two rows per program, 4,096 columns per step (H100,
    1,024 x 65,536 bf16 with the gradient: 0.176 ms, 2.3 TB/s; one row: 0.204 ms; 8,192 columns and
    16 warps: 0.173; benchmarks/NOTES.md). Under the interpreter (CPU), 16 rows per program: it
    runs programs one after another."""
    bv = triton.next_power_of_2(V)
    if device.type != "cuda":
        return 16, min(bv, 2048), 4
    return 2, min(bv, 4096), 8


def _new(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def cross_entropy_rows_fwd(
    logits: torch.Tensor, targets: torch.Tensor, with_grad: bool, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits: (N, W) with unit column stride, of which the first `num_classes` columns are the
    classes; targets: (N,) int64 contiguous. Returns the per-row losses (fp32; fp64 for fp64
    logits) and, with `with_grad`, the (N, W) gradient in logits' dtype (0 past the classes)."""
    N, W = logits.shape
    V = num_classes
    loss = _new((N,), torch.promote_types(logits.dtype, torch.float32), logits.device)
    grad = _new((N, W), logits.dtype, logits.device) if with_grad else None
    if N == 0:
        return loss, grad
    block_r, block_v, nw = _config(V, logits.device)
    _rows_kernel[(triton.cdiv(N, block_r),)](
        logits, logits.stride(0), targets, loss, loss if grad is None else grad,
        0 if grad is None else grad.stride(0), N, V, W,
        IGNORE=IGNORE_INDEX, BLOCK_R=block_r, BLOCK_V=block_v, WRITE_GRAD=with_grad, num_warps=nw,
        **FIXED_LAUNCH_OPTIONS,
    )  # fmt: skip
    return loss, grad
