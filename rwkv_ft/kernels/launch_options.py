"""Triton launch options that every rwkv_ft kernel passes explicitly, so that its results and its
speed do not move with Triton's defaults."""

from __future__ import annotations

import torch

# Floating-point contraction (a * b + c as one FMA) on. Triton 3.9 warns that its default turns off
# in 3.10; the kernels' accuracy and timings (benchmarks/NOTES.md) were measured with it on.
FIXED_LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def register_cap(cap: int | None) -> dict:
    """Launch options for a cap on registers per thread (ptxas' maxnreg): more programs per SM for
    some spills. NVIDIA only: Triton's AMD backend rejects the option. None: the compiler's choice."""
    return {"maxnreg": cap} if cap is not None and torch.version.hip is None else {}
