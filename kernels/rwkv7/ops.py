"""The RWKV-7 WKV Triton kernels as custom ops (`rwkv_ft.kernels.custom_ops` describes the pattern):

    torch.ops.rwkv_ft.wkv7_forward(r, w, k, v, a, b, state, reset, store, backward)
        -> y, new_state, states, qt, m
    torch.ops.rwkv_ft.wkv7_backward(r, w, k, v, a, b, state, reset, states, qt, m, gy, g_new_state,
                                    want_g_state)
        -> gr, gw, gk, gv, ga, gb, g_state (or absent)

`states` is the fp32 state entering every chunk and `qt`, `m` the chunk maps the forward kept
(`keep_prep`), each absent when not stored (`store=False`: inference, or `backward=True` too: the
backward runs the forward again from `state` to get them, see `wkv7(recompute_states=...)`).
`wkv7_op` is the
differentiable entry that `wkv7(..., backend="triton")` calls; torch.compile sees one opaque node per
direction, and selective recompute keeps the forward's outputs (it is the slow kernel of a block).
Triton is imported when a kernel first runs, not here.
"""

from __future__ import annotations

import math

import torch

from rwkv_ft.kernels.custom_ops import absent, kernel_op, optional, register_backward


def _config(r: torch.Tensor):
    from .triton_wkv7 import _config

    B, T, H, N = r.shape
    return _config(B, T, H, N, r.dtype)


def _forward_fake(r, w, k, v, a, b, state, reset, store, backward):
    B, T, H, N = r.shape
    f32 = torch.float32
    y, new_state = r.new_empty(B, T, H, N), r.new_empty(B, H, N, N, dtype=f32)
    if not store:
        return y, new_state, absent(r, f32), absent(r, f32), absent(r, f32)
    cfg = _config(r)
    nc = math.ceil(T / cfg.chunk)
    states = r.new_empty(B, H, nc, N, N, dtype=f32)
    if not cfg.keep_prep:
        return y, new_state, states, absent(r, f32), absent(r, f32)
    return (
        y,
        new_state,
        states,
        r.new_empty(B * H, nc, N, cfg.chunk, dtype=f32),
        r.new_empty(B * H, nc, N, N, dtype=f32),
    )


@kernel_op("wkv7_forward", fake=_forward_fake, keep_outputs=True)
def wkv7_forward(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None,
    reset: torch.Tensor | None,
    store: bool,
    backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_wkv7 import _shared_strides, wkv7_fwd

    xs = _shared_strides([r, w, k, v, a, b])
    s0 = None if state is None else state.float().contiguous()
    rs = None if reset is None else reset.contiguous().view(torch.uint8)
    y, new_state, saved = wkv7_fwd(*xs, s0, rs, _config(r), store, backward)
    saved = saved + [absent(r, torch.float32) for _ in range(3 - len(saved))]  # distinct: no aliasing
    return (y, new_state, *saved)


def _backward_fake(r, w, k, v, a, b, state, reset, states, qt, m, gy, g_new_state, want_g_state):
    B, T, H, N = r.shape
    g_state = r.new_empty(B, H, N, N, dtype=torch.float32) if want_g_state else absent(r, torch.float32)
    return (*(x.new_empty(x.shape) for x in (r, w, k, v, a, b)), g_state)


@kernel_op("wkv7_backward", fake=_backward_fake)
def wkv7_backward(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None,
    reset: torch.Tensor | None,
    states: torch.Tensor,
    qt: torch.Tensor,
    m: torch.Tensor,
    gy: torch.Tensor | None,
    g_new_state: torch.Tensor | None,
    want_g_state: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_wkv7 import _shared_strides, wkv7_bwd

    xs = _shared_strides([r, w, k, v, a, b])
    rs = None if reset is None else reset.contiguous().view(torch.uint8)
    saved = ([states] if states.numel() else []) + ([qt, m] if qt.numel() else [])
    s0 = None if state is None or saved else state.float().contiguous()  # only to run the forward again
    dy = None if gy is None else gy.to(r.dtype).contiguous()
    dsT = None if g_new_state is None else g_new_state.float().contiguous()
    *grads, g_state = wkv7_bwd(*xs, rs, saved, dy, dsT, _config(r), want_g_state, s0)
    return (*grads, absent(r, torch.float32) if g_state is None else g_state)


def _setup_context(ctx, inputs, output) -> None:
    r, w, k, v, a, b, state, reset, store, _ = inputs
    _, _, states, qt, m = output
    # The initial state only when the backward will run the forward again (it is small: B x H x N x N).
    ctx.save_for_backward(r, w, k, v, a, b, None if store else state, reset, states, qt, m)
    ctx.state_dtype = None if state is None else state.dtype


def _backward(ctx, gy, g_new_state):
    if gy is None and g_new_state is None:
        return (None,) * 10
    r, w, k, v, a, b, state, reset, states, qt, m = ctx.saved_tensors
    want_g_state = ctx.state_dtype is not None and ctx.needs_input_grad[6]
    *grads, g_state = torch.ops.rwkv_ft.wkv7_backward(
        r, w, k, v, a, b, state, reset, states, qt, m, gy, g_new_state, want_g_state
    )
    g_state = optional(g_state)
    return (*grads, None if g_state is None else g_state.to(ctx.state_dtype), None, None, None)


register_backward(wkv7_forward, _backward, _setup_context, aux_outputs=(2, 3, 4))


def wkv7_op(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    recompute_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of `rwkv_ft.kernels.wkv7` (validation happens there): y, new_state. The
    forward stores what the backward needs only when a gradient can flow, and not then either
    with recompute_states (the backward runs the forward again)."""
    inputs = (r, w, k, v, a, b) + (() if state is None else (state,))
    backward = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    store = backward and not recompute_states
    y, new_state, *_ = torch.ops.rwkv_ft.wkv7_forward(r, w, k, v, a, b, state, reset, store, backward)
    return y, new_state
