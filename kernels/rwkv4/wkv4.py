"""Public entry point of the RWKV-4 WKV operator: validation and backend dispatch.

The Triton backend lives in `triton_wkv4.py` (chunked over time, see its module docstring) and is
called through the custom ops of `ops.py` (opaque to torch.compile); triton is imported on the first
launch, so CPU-only use of the reference never imports it.
"""

from __future__ import annotations

import torch

from rwkv_ft.kernels.custom_ops import runs_kernel

from .ops import wkv4_op
from .reference import wkv4_reference

_BACKENDS = ("auto", "triton", "torch")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_shapes(time_decay, time_first, k, v, state, reset) -> None:
    if k.dim() != 3:
        raise ValueError(f"wkv4: k must be (B, T, C), got shape {tuple(k.shape)}")
    B, T, C = k.shape
    if v.shape != k.shape:
        raise ValueError(f"wkv4: v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    if v.dtype != k.dtype:
        raise ValueError(f"wkv4: v dtype {v.dtype} != k dtype {k.dtype}")
    if T < 1:
        raise ValueError("wkv4: the sequence must hold at least one token (T >= 1)")
    for name, p in (("time_decay", time_decay), ("time_first", time_first)):
        if p.shape != (C,):
            raise ValueError(f"wkv4: {name} must be (C,) = ({C},), got shape {tuple(p.shape)}")
        if not p.is_floating_point():
            raise ValueError(f"wkv4: {name} must be a float tensor, got {p.dtype}")
    if state is not None and state.shape != (B, 3, C):
        raise ValueError(f"wkv4: state must be (B, 3, C) = ({B}, 3, {C}), got shape {tuple(state.shape)}")
    if reset is not None:
        if reset.shape != (B, T):
            raise ValueError(f"wkv4: reset must be (B, T) = ({B}, {T}), got shape {tuple(reset.shape)}")
        if reset.dtype != torch.bool:
            raise ValueError(f"wkv4: reset must be a bool tensor, got {reset.dtype}")
    devices = {t.device for t in (time_decay, time_first, k, v, state, reset) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"wkv4: all tensors must be on one device, got {sorted(map(str, devices))}")


def wkv4(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None = None,
    *,
    reset: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-4 WKV over a whole sequence.

    Args:
        time_decay: (C,) as stored in checkpoints; the per-step decay factor is exp(-exp(time_decay)).
        time_first: (C,) the bonus u given to the current token.
        k, v: (B, T, C) fp32, bf16 or fp16. All arithmetic is fp32.
        state: None (empty history) or (B, 3, C) fp32 holding (numerator / e^max, denominator / e^max, max).
        reset: None or (B, T) bool; where true the state is set to the empty state (numerator 0,
            denominator 0, max `EMPTY_MAX`: what `state=None` starts from) before that token, so
            several examples packed in one row see nothing of each other. A reset discards the
            incoming `state` from that token on, and no gradient flows back across it.
        backend: "auto", "triton" or "torch".

    Returns:
        y: (B, T, C) in k's dtype; new_state: (B, 3, C) fp32, the state after the last token (with
        resets: that of the row's last segment).

    Differentiable w.r.t. time_decay, time_first, k, v and state; the loss may depend on new_state.
    Resets cost no host synchronisation: the kernel reads the flags as it walks the sequence.
    "auto" runs Triton on CUDA tensors of the three kernel dtypes (and the kernel op's shape-only
    implementation on meta tensors) and the reference otherwise; "triton" on CPU tensors needs
    TRITON_INTERPRET=1 (set before triton is imported).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"wkv4: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    _check_shapes(time_decay, time_first, k, v, state, reset)
    if backend == "torch":
        return wkv4_reference(time_decay, time_first, k, v, state, reset)
    if backend == "auto" and not ((k.is_cuda or k.is_meta) and k.dtype in _KERNEL_DTYPES):
        return wkv4_reference(time_decay, time_first, k, v, state, reset)
    if k.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"wkv4: the triton backend takes fp32, bf16 or fp16 k/v, got {k.dtype}")
    if not runs_kernel(k):
        raise RuntimeError(
            "wkv4: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 (set before triton is "
            "imported) to run on CPU under the Triton interpreter"
        )
    return wkv4_op(time_decay, time_first, k, v, state, reset)
