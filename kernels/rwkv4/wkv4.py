"""Public entry point of the RWKV-4 WKV operator (backend dispatch).

The Triton backend is being written (issue 3); until it lands, every backend runs the reference.
"""

from __future__ import annotations

import torch

from .reference import wkv4_reference


def wkv4(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-4 WKV over a whole sequence.

    Args:
        time_decay: (C,) as stored in checkpoints; the per-step decay factor is exp(-exp(time_decay)).
        time_first: (C,) the bonus u given to the current token.
        k, v: (B, T, C) fp32, bf16 or fp16. All arithmetic is fp32.
        state: None (empty history) or (B, 3, C) fp32 holding (numerator / e^max, denominator / e^max, max).
        backend: "auto", "triton" or "torch".

    Returns:
        y: (B, T, C) in k's dtype; new_state: (B, 3, C) fp32, the state after the last token.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"wkv4: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return wkv4_reference(time_decay, time_first, k, v, state)
