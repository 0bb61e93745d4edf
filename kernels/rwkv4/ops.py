"""The RWKV-4 WKV Triton kernels as custom ops (`rwkv_ft.kernels.custom_ops` describes the pattern):

    torch.ops.rwkv_ft.wkv4_forward(time_decay, time_first, k, v, state, reset)
        -> y, y32, z, new_state, idx     (y32: fp32 y for the backward, or absent; z, idx: for the backward)
    torch.ops.rwkv_ft.wkv4_backward(time_decay, time_first, k, v, y_saved, z, state, reset, new_state, idx,
                                    gy, g_new_state)
        -> g_decay_first (2, C) fp32, gk, gv, g_state (or absent)

`state` and `reset` (the (B, T) bool packed-example starts) may be None.

`wkv4_op` is the differentiable entry that `wkv4(..., backend="triton")` calls; torch.compile sees
one opaque node per direction. Triton is imported when a kernel first runs, not here.
"""

from __future__ import annotations

import torch

from rwkv_ft.kernels.custom_ops import absent, kernel_op, optional, register_backward


def _stores_fp32_y(dtype: torch.dtype) -> bool:
    """Whether the forward also writes y in fp32 for the backward (half inputs; triton_wkv4's flag)."""
    if dtype == torch.float32:
        return False
    try:
        from . import triton_wkv4
    except ImportError:  # shape-only use (meta tensors) where triton is not installed: the default
        return True
    return triton_wkv4.FP32_Y_FOR_BACKWARD


def _forward_fake(time_decay, time_first, k, v, state, reset):
    B, T, C = k.shape
    f32 = torch.float32
    y32 = k.new_empty(B, T, C, dtype=f32) if _stores_fp32_y(k.dtype) else absent(k, f32)
    return (
        k.new_empty(B, T, C),
        y32,
        k.new_empty(B, T, C, dtype=f32),
        k.new_empty(B, 3, C, dtype=f32),
        k.new_empty(B, C, dtype=torch.int32),
    )


@kernel_op("wkv4_forward", fake=_forward_fake)
def wkv4_forward(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None,
    reset: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_wkv4 import wkv4_fwd

    s0 = None if state is None else state.float().contiguous()
    y, y_saved, z, sT, idxT, _ = wkv4_fwd(
        time_decay.contiguous(), time_first.contiguous(), k.contiguous(), v.contiguous(), s0, _reset_bytes(reset)
    )
    return y, (absent(z) if y_saved is y else y_saved), z, sT, idxT


def _reset_bytes(reset: torch.Tensor | None) -> torch.Tensor | None:
    """The (B, T) bool flags as the kernels read them: contiguous bytes (a view, no copy)."""
    return None if reset is None else reset.contiguous().view(torch.uint8)


def _backward_fake(time_decay, time_first, k, v, y_saved, z, state, reset, new_state, idx, gy, g_new_state):
    C = k.shape[-1]
    g_state = k.new_empty(state.shape, dtype=torch.float32) if state is not None else absent(k, torch.float32)
    return k.new_empty(2, C, dtype=torch.float32), k.new_empty(k.shape), v.new_empty(v.shape), g_state


@kernel_op("wkv4_backward", fake=_backward_fake)
def wkv4_backward(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    y_saved: torch.Tensor,
    z: torch.Tensor,
    state: torch.Tensor | None,
    reset: torch.Tensor | None,
    new_state: torch.Tensor,
    idx: torch.Tensor,
    gy: torch.Tensor,
    g_new_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_wkv4 import _config, wkv4_bwd

    B, T, C = k.shape
    _, bwd_config = _config(B, T, C)  # what the forward chose for the backward (shape-only)
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    s0 = None if state is None else state.float().contiguous()
    gsT = None if g_new_state is None else g_new_state.float().contiguous()
    gtdf, gk, gv, gs0 = wkv4_bwd(
        c(time_decay), c(time_first), c(k), c(v), c(y_saved), c(z), s0, _reset_bytes(reset), c(new_state),
        c(idx), gy.to(k.dtype).contiguous(), gsT, bwd_config,
    )  # fmt: skip
    # gtdf may be a view into the kernel's zeroed flag buffer: an op returns its own (2, C) tensor
    return gtdf.clone(), gk, gv, (absent(gtdf) if gs0 is None else gs0)


def _setup_context(ctx, inputs, output) -> None:
    time_decay, time_first, k, v, state, reset = inputs
    y, y32, z, new_state, idx = output
    y_saved = y if y32.numel() == 0 else y32
    ctx.save_for_backward(time_decay, time_first, k, v, y_saved, z, state, reset, new_state, idx)
    ctx.dtypes = (time_decay.dtype, time_first.dtype, None if state is None else state.dtype)


def _backward(ctx, gy, g_new_state):
    if gy is None and g_new_state is None:
        return None, None, None, None, None, None
    time_decay, time_first, k, v, y_saved, z, state, reset, new_state, idx = ctx.saved_tensors
    td_dtype, tf_dtype, s_dtype = ctx.dtypes
    gy = torch.zeros_like(k) if gy is None else gy
    gtdf, gk, gv, gs0 = torch.ops.rwkv_ft.wkv4_backward(
        time_decay, time_first, k, v, y_saved, z, state, reset, new_state, idx, gy, g_new_state
    )
    gs0 = optional(gs0)
    g_state = None if gs0 is None else gs0.to(s_dtype)
    return gtdf[0].to(td_dtype), gtdf[1].to(tf_dtype), gk, gv, g_state, None


register_backward(wkv4_forward, _backward, _setup_context, aux_outputs=(1, 2, 4))


def wkv4_op(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of `rwkv_ft.kernels.wkv4` (validation happens there): y, new_state."""
    y, _, _, new_state, _ = torch.ops.rwkv_ft.wkv4_forward(time_decay, time_first, k, v, state, reset)
    return y, new_state
