"""Plain-PyTorch RWKV-4 WKV in the numerically stable running-max form.

This is the reference the Triton kernel is tested against and the path used on CPU. It walks the
sequence one step at a time, exactly like the RNN formulation in BlinkDL's `rwkv` package, so it is
slow for long sequences but obviously right. Arithmetic is in fp32 (fp64 when the inputs are fp64).
"""

from __future__ import annotations

import torch

# The "max" slot of an empty state. exp(EMPTY_MAX - anything finite) is exactly 0, so an empty
# state contributes nothing, in fp32 and in fp64.
EMPTY_MAX = -1e38


def empty_wkv_state(batch: int, channels: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """A (B, 3, C) state holding no history: numerator 0, denominator 0, max -1e38."""
    state = torch.zeros(batch, 3, channels, device=device, dtype=dtype)
    state[:, 2] = EMPTY_MAX
    return state


def wkv4_reference(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference WKV. Same contract as `rwkv_ft.kernels.wkv4` (see its docstring).

    time_decay, time_first: (C,); k, v: (B, T, C); state: (B, 3, C) or None; reset: (B, T) bool or None.
    Returns y (B, T, C) in k's dtype and the final state (B, 3, C) in fp32 (fp64 for fp64 inputs).
    """
    compute_dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    in_dtype = k.dtype
    B, T, C = k.shape
    w = -torch.exp(time_decay.to(compute_dtype))  # (C,) log of the per-step decay
    u = time_first.to(compute_dtype)  # (C,)
    k = k.to(compute_dtype)
    v = v.to(compute_dtype)
    if state is None:
        state = empty_wkv_state(B, C, device=k.device, dtype=compute_dtype)
    num, den, max_ = state.to(compute_dtype).unbind(1)  # each (B, C)
    zero = torch.zeros((), dtype=compute_dtype, device=k.device)
    empty_max = torch.full((), EMPTY_MAX, dtype=compute_dtype, device=k.device)
    resets = reset.unsqueeze(-1).unbind(1) if reset is not None else [None] * T  # each (B, 1)

    ys = []
    # unbind, not k[:, t]: the backward of T separate selects would fill T full-size zero tensors.
    for kt, vt, reset_t in zip(k.unbind(1), v.unbind(1), resets):
        if reset_t is not None:  # a packed example starts: the empty state (no gradient flows back)
            num, den = torch.where(reset_t, zero, num), torch.where(reset_t, zero, den)
            max_ = torch.where(reset_t, empty_max, max_)
        # Output: history plus the current token with its bonus u.
        m = torch.maximum(max_, u + kt)
        e_hist, e_cur = torch.exp(max_ - m), torch.exp(u + kt - m)
        ys.append((e_hist * num + e_cur * vt) / (e_hist * den + e_cur))
        # State: decay the history by w and add the current token.
        m = torch.maximum(max_ + w, kt)
        e_hist, e_cur = torch.exp(max_ + w - m), torch.exp(kt - m)
        num = e_hist * num + e_cur * vt
        den = e_hist * den + e_cur
        max_ = m
    y = torch.stack(ys, dim=1) if ys else k.new_zeros(B, 0, C)  # (B, T, C)
    return y.to(in_dtype), torch.stack([num, den, max_], dim=1)
