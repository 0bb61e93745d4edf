"""Plain-PyTorch RWKV-7 WKV: the per-token recurrence, exactly as written in the contract.

This is the oracle the Triton kernel and the chunked PyTorch path (`chunked.py`) are tested
against, and the "torch" backend for sequences shorter than a chunk. It walks the sequence one token
at a time (obviously right, slow for long sequences). Arithmetic is fp32, or fp64 when the inputs
are fp64.

Per head, with S the (N, N) state in BlinkDL's [value, key] layout (rows: value index, columns:
key index):

    S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T,     y_t = S_t r_t
"""

from __future__ import annotations

import torch


def wkv7_reference(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference WKV-7. Same contract as `rwkv_ft.kernels.wkv7` (see its docstring).

    r, w, k, v, a, b: (B, T, H, N); state: (B, H, N, N) or None; reset: (B, T) bool or None.
    Returns y (B, T, H, N) in r's dtype and the state after the last token, (B, H, N, N) in fp32
    (fp64 for fp64 inputs).
    """
    compute = torch.float64 if r.dtype == torch.float64 else torch.float32
    B, T, H, N = r.shape
    in_dtype = r.dtype
    r, w, k, v, a, b = (x.to(compute) for x in (r, w, k, v, a, b))
    S = r.new_zeros(B, H, N, N) if state is None else state.to(compute)
    decay = torch.exp(w)  # (B, T, H, N)
    zero = torch.zeros((), dtype=compute, device=S.device)
    resets = reset.unbind(1) if reset is not None else [None] * T
    ys = []
    # unbind, not x[:, t]: the backward of T separate selects would fill T full-size zero tensors.
    steps = zip(r.unbind(1), decay.unbind(1), k.unbind(1), v.unbind(1), a.unbind(1), b.unbind(1), resets)
    for rt, dt, kt, vt, at, bt, reset_t in steps:
        if reset_t is not None:
            S = torch.where(reset_t.view(B, 1, 1, 1), zero, S)
        sa = S @ at.unsqueeze(-1)  # (B, H, N, 1)
        S = S * dt.unsqueeze(-2) + sa * bt.unsqueeze(-2) + vt.unsqueeze(-1) * kt.unsqueeze(-2)
        ys.append((S @ rt.unsqueeze(-1)).squeeze(-1))  # (B, H, N)
    y = torch.stack(ys, dim=1)  # (B, T, H, N)
    return y.to(in_dtype), S
