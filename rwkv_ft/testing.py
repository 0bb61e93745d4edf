"""Shared numerical comparison for tests: one tolerance table, one assert."""

from __future__ import annotations

import torch

# (rtol, atol) per dtype. fp32 arithmetic lands far under 1e-5 relative for our ops; bf16 carries
# 8 mantissa bits, fp16 11.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff if denom == 0 else diff / denom


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    rel: float | None = None,
    name: str = "tensor",
) -> None:
    """Assert `actual` matches `expected`.

    Two checks, both from the tolerance table of `dtype` (default: actual's dtype): the norm-wise
    relative error is at most rtol (or `rel` when given), and every element is within
    atol + rtol * |expected| scaled by 10 (a loose elementwise bound that still catches a wrong
    element hidden in a large norm). NaN or inf in `actual` where `expected` is finite always fails.
    """
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[dtype]
    rel = rtol if rel is None else rel
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~torch.isfinite(a) & torch.isfinite(e)
    if bad.any():
        raise AssertionError(f"{name}: {int(bad.sum())} non-finite values where the reference is finite")
    err = relative_error(a, e)
    if err > rel:
        raise AssertionError(f"{name}: relative error {err:.3e} > {rel:.1e} ({dtype})")
    worst = ((a - e).abs() - 10 * (atol + rel * e.abs())).max().item() if a.numel() else 0.0
    if worst > 0:
        idx = int(((a - e).abs() - 10 * (atol + rel * e.abs())).argmax())
        raise AssertionError(
            f"{name}: element {idx} is {a.flatten()[idx].item():.6g}, expected {e.flatten()[idx].item():.6g}"
        )
