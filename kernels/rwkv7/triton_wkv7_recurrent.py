"""Token-by-token Triton kernels for RWKV-7 WKV (forward and backward): the recurrence as written,
one program per (head, block of BV value rows), fp32 state in registers.

Per head, S is (N, N) in BlinkDL's [value, key] layout, decay d_t = exp(w_t) (w <= 0, per key channel):

    S_t = S_{t-1} diag(d_t) + sa_t b_t^T + v_t k_t^T,   sa_t = S_{t-1} a_t,   y_t = S_t r_t

Rows of S (value index i) evolve independently, so the forward needs no communication between
programs: per token two row sums (sa, y) over the key axis. Where the chunked kernels
(`triton_wkv7.py`) spend most of their instructions on the chunk algebra, this path does ~10 N^2
fp32 operations per token and head, in a sequential loop of T steps: it wins where B x H alone
fills the GPU, loses where it does not (few, long sequences).

Backward, tokens last first, with dS the adjoint of S_t (dy_t r_t^T added first):

    dv_t = dS k_t   dsa = dS b_t   dr_t = S_t^T dy_t   dk_t = dS^T v_t   db_t = dS^T sa_t
    dw_t = d_t * colsum(dS * S_{t-1})   da_t = S_{t-1}^T dsa   dS <- dS diag(d_t) + dsa a_t^T

The column sums (dr, dk, dw, da, db) run over the value rows: complete in one program when BV = N,
else per value block (fp32 partials summed after the kernel). S_{t-1} is rebuilt from S_t by
undoing the step, S_{t-1} = (S_t - v_t k_t^T - sa_t b_t^T) diag(1 / d_t), with sa_t stored by the
forward (fp32, 256 bytes per token and head at N = 64), the exact state reloaded at every CH-token
boundary (stored by the forward: 1 KB per token and head at CH = 16) and rebuilt exactly half-way
(`replay`: run forward from the block's stored state), so rounding is amplified over at most
replay - 1 = 7 undone steps, by at most (1 / d_min)^7 = 69 (15 steps without the replay: 8,700,
1.4e-4 fp32 relative error in dr, dw, da at the fastest decay; 1.7e-6 with it). That is why this path
requires the decay bounded away from 0: w >= W_MIN_RECURRENT = -exp(-0.5) (per-step decay >= 0.545),
the range of the RWKV-7 model (its w is -exp(-0.5) * sigmoid(.)); not checked (that would cost a
host sync); the chunked kernels take any w. (BlinkDL's `rwkv7_clampw` CUDA kernels rebuild the
state by undoing steps too, under the same clamp.)

Resets (packed sequences) zero the state before a token. Undoing a step cannot cross one (S_t does
not depend on the state before the reset), so the backward at a reset token inside a block runs
the forward again from the block's stored state up to the token before it (resets are rare: a few
per row).

The loads of the next token (its inputs, reset flag and, in the backward, sa and dy) are issued
before this token's arithmetic and carried in registers: the loop waits on global memory once, not
once per token (also in the backward's replays).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from .triton_wkv7 import _to  # fp32 -> bf16 rounding to nearest, also under the interpreter

# The smallest w this path takes: the RWKV-7 model's clamp, per-step decay exp(-exp(-0.5)) = 0.545.
W_MIN_RECURRENT = -math.exp(-0.5)

# Test hook: when True the host code fills every buffer it allocates with NaN, so a test can prove
# that the kernels write every element they return.
POISON_OUTPUTS = False
# Test / benchmark hook: a dict of `RecurrentConfig` fields that replace the rule's choice.
_CFG_OVERRIDE: dict | None = None


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
    bv: int  # value rows per program (N / bv programs per head)
    ch: int  # tokens between the exact states the forward stores for the backward
    replay: int  # tokens between the states the backward rebuilds exactly (by replaying from ch's)
    warps: int
    join_sums: bool = False  # the backward's four column sums as one joined reduction


def _config(B: int, T: int, H: int, N: int) -> RecurrentConfig:
    """By rule (sm_90a compiles, `benchmarks/wkv7_compile_report.py --kernels rec_fwd,rec_bwd`):
    tiles of at most 4,096 state elements, a whole head per program up to N = 64 (the backward's
    column sums then complete in registers), 32 value rows at N = 128; 8 warps per 4,096 elements
    (with 4 at 64 x 64 the backward spills: 255 registers and a 392-byte stack; with 8, 245
    registers and no stack)."""
    bv = min(N, 64) if N <= 64 else 32
    cfg = RecurrentConfig(bv=bv, ch=16, replay=8, warps=max(1, min(8, bv * N // 512)))
    return dataclasses.replace(cfg, **_CFG_OVERRIDE) if _CFG_OVERRIDE else cfg


def _new(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _inside(idx, t, T):
    """A mask shaped like idx: whether 0 <= t < T (a prefetch past either end loads nothing)."""
    return (idx * 0 + t >= 0) & (idx * 0 + t < T)


@triton.jit
def _load_vec(ptr, off, idx, mask):
    return tl.load(ptr + off + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_token(r, w, k, v, a, b, base, t, T, s_t, rows, cols):
    """Token t's r, w, k, a, b (N key channels) and v (BV value rows), fp32; zeros outside [0, T)."""
    off = base + t * s_t
    kc = _inside(cols, t, T)
    rt = _load_vec(r, off, cols, kc)
    wt = _load_vec(w, off, cols, kc)
    kt = _load_vec(k, off, cols, kc)
    at = _load_vec(a, off, cols, kc)
    bt = _load_vec(b, off, cols, kc)
    vt = _load_vec(v, off, rows, _inside(rows, t, T))
    return rt, wt, kt, at, bt, vt


@triton.jit
def _load_reset(reset, i_b, t, T, HAS_RESET: tl.constexpr):
    """Whether the state is zeroed before token t (read at t mod T: a prefetch past an end reads a
    flag it does not use, inside the tensor)."""
    if HAS_RESET:
        return tl.load(reset + i_b * T + (t + T) % T) != 0
    else:
        return t != t


@triton.jit
def _step(S, wt, kt, at, bt, vt):
    """S_{t-1} -> (S_t, sa_t): one token of the recurrence for the program's value rows."""
    sa = tl.sum(S * at[None, :], axis=1)  # (BV,)
    S = S * tl.exp(wt)[None, :] + sa[:, None] * bt[None, :] + vt[:, None] * kt[None, :]
    return S, sa


@triton.jit
def _rec_fwd_kernel(
    r, w, k, v, a, b, s0, reset,
    y, sT, ck, sa_out,
    T, H, s_b, s_t, s_h,
    N: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr,
    HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, STORE: tl.constexpr,
):  # fmt: skip
    """Program (value block, b * H + h). Writes y (B, T, H, N) in r's dtype, the final state sT
    (B*H, N, N) and, with STORE, the state entering every CH-token block ck (B*H, NB, N, N) (before
    any reset at the block's first token) and sa (B, T, H, N) fp32."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rows = i_v * BV + tl.arange(0, BV)
    cols = tl.arange(0, N)
    tile = rows[:, None] * N + cols[None, :]
    base = i_b * s_b + i_h * s_h  # input offsets (shared strides)
    obase = (i_b * T * H + i_h) * N  # output offsets (contiguous (B, T, H, N))
    NB = tl.cdiv(T, CH)
    if HAS_STATE:
        S = tl.load(s0 + i_bh * N * N + tile)
    else:
        S = tl.zeros((BV, N), dtype=tl.float32)
    nxt = _load_token(r, w, k, v, a, b, base, 0, T, s_t, rows, cols)
    nxt_reset = _load_reset(reset, i_b, 0, T, HAS_RESET)
    for t in range(T):
        rt, wt, kt, at, bt, vt = nxt
        is_reset = nxt_reset
        nxt = _load_token(r, w, k, v, a, b, base, t + 1, T, s_t, rows, cols)
        nxt_reset = _load_reset(reset, i_b, t + 1, T, HAS_RESET)
        if STORE:
            if t % CH == 0:
                tl.store(ck + (i_bh * NB + t // CH) * N * N + tile, S)
        if HAS_RESET:
            S = tl.where(is_reset, 0.0, S)
        S, sa = _step(S, wt, kt, at, bt, vt)
        yt = tl.sum(S * rt[None, :], axis=1)
        tl.store(y + obase + t * H * N + rows, _to(yt, y.dtype.element_ty))
        if STORE:
            tl.store(sa_out + obase + t * H * N + rows, sa)
    tl.store(sT + i_bh * N * N + tile, S)


@triton.jit
def _replay(r, w, k, v, a, b, reset, ck, i_bh, i_b, t0, t1, T, base, s_t, NB, rows, cols, tile,
            N: tl.constexpr, CH: tl.constexpr, HAS_RESET: tl.constexpr):  # fmt: skip
    """The state after token t1 - 1, run forward from the state stored at t0 (a block start),
    resets included: the state before a reset token, which undoing steps cannot reach."""
    S = tl.load(ck + (i_bh * NB + t0 // CH) * N * N + tile)
    nxt = _load_token(r, w, k, v, a, b, base, t0, T, s_t, rows, cols)
    nxt_reset = _load_reset(reset, i_b, t0, T, HAS_RESET)
    for t in range(t0, t1):
        _, wt, kt, at, bt, vt = nxt
        is_reset = nxt_reset
        nxt = _load_token(r, w, k, v, a, b, base, t + 1, T, s_t, rows, cols)
        nxt_reset = _load_reset(reset, i_b, t + 1, T, HAS_RESET)
        if HAS_RESET:
            S = tl.where(is_reset, 0.0, S)
        S, _ = _step(S, wt, kt, at, bt, vt)
    return S


@triton.jit
def _rec_bwd_kernel(
    r, w, k, v, a, b, reset, dy, ck, sa_in, sT, dsT, ds0,
    dr, dw, dk, dv, da, db,
    T, H, s_b, s_t, s_h, s_part,
    N: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr, RS: tl.constexpr, JOIN_SUMS: tl.constexpr,
    HAS_RESET: tl.constexpr, HAS_DY: tl.constexpr, HAS_DST: tl.constexpr, WANT_DS0: tl.constexpr,
):  # fmt: skip
    """Program (value block, b * H + h), tokens last first. dv (B, T, H, N) is complete per
    program; dr, dw, dk, da, db are this value block's share, at offset i_v * s_part (s_part = 0
    when one block holds every row: then they are the gradients, in their outputs' dtypes)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rows = i_v * BV + tl.arange(0, BV)
    cols = tl.arange(0, N)
    tile = rows[:, None] * N + cols[None, :]
    base = i_b * s_b + i_h * s_h
    obase = (i_b * T * H + i_h) * N
    pbase = i_v * s_part + obase  # this block's column-sum shares
    NB = tl.cdiv(T, CH)
    S = tl.load(sT + i_bh * N * N + tile)  # S_{T-1}
    if HAS_DST:
        dS = tl.load(dsT + i_bh * N * N + tile)
    else:
        dS = tl.zeros((BV, N), dtype=tl.float32)
    last = T - 1
    nxt = _load_token(r, w, k, v, a, b, base, last, T, s_t, rows, cols)
    nxt_sa = _load_vec(sa_in, obase + last * H * N, rows, _inside(rows, last, T))
    if HAS_DY:
        nxt_dy = _load_vec(dy, obase + last * H * N, rows, _inside(rows, last, T))
    nxt_reset = _load_reset(reset, i_b, last, T, HAS_RESET)
    for step in range(T):
        t = last - step
        o = t * H * N
        rt, wt, kt, at, bt, vt = nxt
        sa, is_reset = nxt_sa, nxt_reset
        nxt = _load_token(r, w, k, v, a, b, base, t - 1, T, s_t, rows, cols)
        before = _inside(rows, t - 1, T)
        nxt_sa = _load_vec(sa_in, o - H * N + obase, rows, before)
        nxt_reset = _load_reset(reset, i_b, t - 1, T, HAS_RESET)
        if HAS_DY:
            dyt = nxt_dy
            nxt_dy = _load_vec(dy, o - H * N + obase, rows, before)
            dS += dyt[:, None] * rt[None, :]
            tl.store(dr + pbase + o + cols, _to(tl.sum(S * dyt[:, None], axis=0), dr.dtype.element_ty))
        else:
            tl.store(dr + pbase + o + cols, tl.zeros((N,), dtype=dr.dtype.element_ty))
        # S_{t-1}: the stored state at a block start; replayed from it every RS tokens and before a
        # reset; else the step undone.
        t0 = (t // CH) * CH
        if t == t0:
            prev = tl.load(ck + (i_bh * NB + t // CH) * N * N + tile)
        else:
            prev = (S - vt[:, None] * kt[None, :] - sa[:, None] * bt[None, :]) * tl.exp(-wt)[None, :]
            if is_reset | (t % RS == 0):
                prev = _replay(r, w, k, v, a, b, reset, ck, i_bh, i_b, t0, t, T, base, s_t, NB, rows, cols, tile,
                               N, CH, HAS_RESET)  # fmt: skip
        used = tl.where(is_reset, 0.0, prev)  # the state the update at t read
        dt = tl.exp(wt)
        dsa = tl.sum(dS * bt[None, :], axis=1)  # (BV,)
        tl.store(dv + obase + o + rows, _to(tl.sum(dS * kt[None, :], axis=1), dv.dtype.element_ty))
        if JOIN_SUMS:  # the four column sums as one reduction over the value rows (one pass through shared memory)
            sums = tl.sum(
                tl.join(tl.join(dS * vt[:, None], dS * sa[:, None]), tl.join(dS * used, dsa[:, None] * used)), 0
            )
            kb, wa = tl.split(sums)
            dk_t, db_t = tl.split(kb)
            dw_t, da_t = tl.split(wa)
        else:
            dk_t = tl.sum(dS * vt[:, None], axis=0)
            db_t = tl.sum(dS * sa[:, None], axis=0)
            dw_t = tl.sum(dS * used, axis=0)
            da_t = tl.sum(dsa[:, None] * used, axis=0)
        tl.store(dk + pbase + o + cols, _to(dk_t, dk.dtype.element_ty))
        tl.store(db + pbase + o + cols, _to(db_t, db.dtype.element_ty))
        tl.store(dw + pbase + o + cols, _to(dt * dw_t, dw.dtype.element_ty))
        tl.store(da + pbase + o + cols, _to(da_t, da.dtype.element_ty))
        dS = tl.where(is_reset, 0.0, dS * dt[None, :] + dsa[:, None] * at[None, :])
        S = prev
    if WANT_DS0:
        tl.store(ds0 + i_bh * N * N + tile, dS)


# ----------------------------------------------------------------------------------------------
# Host code


def wkv7_recurrent_fwd(r, w, k, v, a, b, s0, reset, cfg: RecurrentConfig, store: bool):
    """r..b: (B, T, H, N) with shared strides (unit last stride); s0: (B, H, N, N) fp32 contiguous
    or None; reset: (B, T) uint8 contiguous or None. Returns y (B, T, H, N) in r's dtype
    (contiguous), the final state (B, H, N, N) fp32 and, with store, what the backward needs
    besides the inputs and the final state: [block-start states (B, H, ceil(T / ch), N, N),
    sa (B, T, H, N)] fp32; else []."""
    B, T, H, N = r.shape
    dev = r.device
    y = _new((B, T, H, N), r.dtype, dev)
    sT = _new((B, H, N, N), torch.float32, dev)
    ck = _new((B, H, triton.cdiv(T, cfg.ch), N, N), torch.float32, dev) if store else None
    sa = _new((B, T, H, N), torch.float32, dev) if store else None
    s_b, s_t, s_h, _ = r.stride()
    _rec_fwd_kernel[(N // cfg.bv, B * H)](
        r, w, k, v, a, b, s0, reset, y, sT, ck, sa, T, H, s_b, s_t, s_h,
        N=N, BV=cfg.bv, CH=cfg.ch, HAS_STATE=s0 is not None, HAS_RESET=reset is not None, STORE=store,
        num_warps=cfg.warps,
    )  # fmt: skip
    return y, sT, ([ck, sa] if store else [])


def wkv7_recurrent_bwd(r, w, k, v, a, b, reset, saved, sT, dy, dsT, cfg: RecurrentConfig, want_ds0: bool):
    """Gradients given what wkv7_recurrent_fwd saved (`saved`, and the final state sT it
    returned), dy (B, T, H, N) contiguous in r's dtype or None and dsT (B, H, N, N) fp32
    contiguous or None. Returns dr, dw, dk, dv, da, db (B, T, H, N) in r's dtype (dw in w's),
    contiguous, and the initial state's (B, H, N, N) fp32 (None unless want_ds0)."""
    B, T, H, N = r.shape
    dev = r.device
    ck, sa = saved
    nv = N // cfg.bv
    dv = _new((B, T, H, N), r.dtype, dev)
    ds0 = _new((B, H, N, N), torch.float32, dev) if want_ds0 else None
    if nv == 1:
        dr, dk, da, db = (_new((B, T, H, N), r.dtype, dev) for _ in range(4))
        dw = _new((B, T, H, N), w.dtype, dev)
    else:  # each value block's share, fp32, summed below
        dr, dw, dk, da, db = (_new((nv, B, T, H, N), torch.float32, dev) for _ in range(5))
    s_b, s_t, s_h, _ = r.stride()
    _rec_bwd_kernel[(nv, B * H)](
        r, w, k, v, a, b, reset, dy, ck, sa, sT, dsT, ds0, dr, dw, dk, dv, da, db,
        T, H, s_b, s_t, s_h, 0 if nv == 1 else B * T * H * N,
        N=N, BV=cfg.bv, CH=cfg.ch, RS=cfg.replay, JOIN_SUMS=cfg.join_sums, HAS_RESET=reset is not None,
        HAS_DY=dy is not None, HAS_DST=dsT is not None, WANT_DS0=want_ds0, num_warps=cfg.warps,
    )  # fmt: skip
    if nv > 1:
        dr, dk, da, db = (g.sum(0).to(r.dtype) for g in (dr, dk, da, db))
        dw = dw.sum(0).to(w.dtype)
    return dr, dw, dk, dv, da, db, ds0
