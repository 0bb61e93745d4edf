"""Chunked Triton kernels for RWKV-7 WKV (forward and backward): parallel per-chunk algebra around
a short sequential scan of the state.

Per head, S is (N, N) in BlinkDL's [value, key] layout, decay d_t = exp(w_t) (w <= 0, per key channel):

    S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,      y_t = S_t r_t

Rows of S (value index) evolve independently: the transition acts on the right. Over a chunk of L
tokens the recurrence is an affine map of the state entering it, S_0:

    Y^T = S_0 Q^T + Yc^T,      S_L = S_0 M + D          (Q, Yc: (L, N); M, D: (N, N))

where Q, Yc, M, D depend on the chunk's inputs only. So the work splits into
  1. _prep_kernel, one program per (chunk, head), all chunks at once: the chunk algebra below,
     giving Q, Yc, M, D (fp32, to memory);
  2. _scan_fwd_kernel, one program per (head, block of BV value rows), chunks in order: two
     products with S on the left per chunk (M = BV rows: tensor-core sized), S in registers.
The backward mirrors it: _prep_kernel again (Q, M only, and it keeps the chunk's pair matrices and
(I - A_ab)^-1 for the gradient kernel), _scan_bwd_kernel carries the adjoint
(dS_0 = dS_L M^T + dY^T Q) chunks last first, and _grad_kernel, one program per chunk, turns the
state entering the chunk (stored by the forward) and the adjoint of the state after it into every
input gradient. Only the scans are sequential, and their chain per chunk is two products long.

Chunk algebra (tokens t, s = 0..L-1 of a chunk entering with state S_0; all per key channel):
G_t = w_0 + ... + w_t, Gx_t = G_{t-1} (G_{-1} = 0), E(p, s) = exp(G_p - G_s) <= 1 for p >= s. With
sa_t = S_{t-1} a_t stacked in SA (L, BV):

    A_ab[t,s] = sum_i a_ti b_si E(t-1, s)   (s < t)      A_ak: k for b        (strictly lower)
    A_rb[t,s] = sum_i r_ti b_si E(t, s)     (s <= t)     A_rk: k for b        (lower, diagonal in)
    SA = (I - A_ab)^-1 (As S_0^T + A_ak V),  As = a * exp(Gx)
    Y  = Rs S_0^T + A_rb SA + A_rk V,        Rs = r * exp(G)
    S_L = S_0 diag(exp(G_L)) + SA^T Bs + V^T Ks,   Bs = b * exp(G_L - G), Ks = k * exp(G_L - G)

Hence, with Wa = (I - A_ab)^-1 As and Ua = (I - A_ab)^-1 A_ak V (so SA = Wa S_0^T + Ua):
    Q = Rs + A_rb Wa,   Yc = A_rb Ua + A_rk V,   M = diag(exp(G_L)) + Wa^T Bs,   D = Ua^T Bs + V^T Ks.

Every exponent of the state-side factors is <= 0. The L x L matrices need exp(G_p - G_s) as a
product of a row factor and a column factor, exp(G_p - R) exp(R - G_s); a single reference R per
chunk makes the factors overflow (1 / exp(G_s) grows like e^{0.61 s} in the model's range and
without bound for very negative w). So they are built in passes ("levels"), each a masked MMA:
  level 0  the 8 x 8 diagonal blocks, R = G at the block's 4th token: factors within e^{+-4 |w|};
  level l  for blocks of 2h = 8 * 2^l tokens, rows in the second half against columns in the first,
           R = G at the last token of the first half: both factors are <= 1.
The union covers every pair t >= s exactly once. With w clamped at W_MIN = -16 (per-step decay
1.1e-7, numerically zero: the clamp moves results by < 1e-6 relative, see the tests) no factor
exceeds e^64, so fp32 never overflows and each product keeps fp32 relative accuracy. A chunk whose
w are all >= -80 / L (-5 for L = 16: always in the model, whose w >= -0.61) takes one pass instead,
the whole chunk with R = G_L / 2 (G is monotone, so every factor is <= e^40; no search for a
reference row): half the pair work. Its row and column factors are exp(x), exp(-x) of one rounded
x = G - R each, so the pairs whose exponent spans no step get exactly 1 * (1 + rounding of exp):
the state-side exp(G), exp(G_L - G) times constants would be cheaper but cost ~10x the fp32 error
near w = -5 (measured; the errors of three exponents add up). G is summed in fp64: exponents are
differences of prefix sums, and once a few steps at w = -16 have made |G| ~ 100, fp32 would lose
~1e-5 in exp(G_t - G_s) even for nearby t, s; the level passes sum it again where they need it (a
rare path), so no fp64 tile stays live. (I - A_ab)^-1 = (I + A)(I + A^2)(I + A^4)(I + A^8) for
L = 16 (A^L = 0), unrolled (a loop would hold M, P in one fixed layout across iterations).

The four pair matrices share operands, so they come from one stacked product
[r; a] (2L, N) x [b; k]^T -> [[A_rb, A_rk], [A_ab, A_ak]] (2L, 2L); the backward stacks likewise.
The state side is value-major: every product with S (BV, N) has it as the left operand (M = BV
rows, wgmma-sized), so the wide state tiles never become replicated right-hand MMA operands.

Resets (packed sequences): seg_t = number of resets at or before t within the chunk. Pairs (t, s)
interact only when seg_t == seg_s; S_0 reaches rows with seg == 0 (masks on As, Rs) and the chunk end
only when the chunk holds no reset; Bs, Ks rows count only for seg_s == seg_{L-1}.

Backward of one chunk (_grad_kernel; dS is the adjoint of the state after the chunk):
    dSA = A_rb^T dY + Bs dS^T,   dU = (I - A_ab)^-T dSA,   dV = A_rk^T dY + A_ak^T dU + Ks dS^T
    dS_0 = dY^T Rs + dU^T As + dS diag(exp(G_L))
    dA_rb = dY SA^T, dA_rk = dY V^T, dA_ab = dU SA^T, dA_ak = dU V^T (masked like the forward)
    dRs = dY S_0, dAs = dU S_0, dBs = SA dS, dKs = V dS, d exp(G_L) = colsum(S_0 * dS)
then through the same level passes to dr, dk, da, db. The decay gradient uses that every use of
r_t / a_t / b_s / k_s in the pair matrices carries exp(+G_t) / exp(+G_{t-1}) / exp(-G_s)
(dr etc. here without the zero-span pairs, whose gradients are added afterwards):
    dw_j = sum_{t >= j} (r_t dr_t - b_t db_t - k_t dk_t) + sum_{t > j} a_t da_t
           + sum_{s < j} (b_s dBs_s + k_s dKs_s) exp(G_L - G_s) + exp(G_L) d exp(G_L)
(reverse / forward cumsums within the chunk; 0 where w < W_MIN), leaving out the pairs whose
exponent spans no step (they would only cancel, in fp32 round-off).
Every key-side gradient is linear in the value rows: _grad_kernel takes the value rows BV at a time
and sums their shares in registers before the level passes, which run once per chunk (no
atomics: the backward is bitwise repeatable).

State storage: the forward keeps the fp32 state entering every chunk (B*H*T/L*N*N*4 bytes) for
_grad_kernel; the backward's scan writes the adjoint per chunk likewise (transient). Q, Yc, M, D
are transient too: the backward recomputes Q and M rather than keep them, and its prep keeps the
key side (pair matrices and (I - A_ab)^-1, 5 KB per chunk and head at L = 16, `key_side_shapes`)
until _grad_kernel has read it (computing them again was a fifth of that kernel's instructions).
Or the forward keeps nothing and the backward runs it again (`recompute_states` of `wkv7`),
keeping Q, M and the key side from that run: ~1 KB per token and head less to hold between
forward and backward, for one more forward scan and the value side of prep in the backward.

Precision: MMA operands here are derived fp32 values (states, exp-scaled keys), so plain tf32
(10-bit mantissa) would cost ~1e-3 relative per product. PREC picks the product: "bf16x3" (each
fp32 operand split into bf16 hi + lo, three bf16 MMAs, ~2^-16 relative; two when one operand is a
bf16 input, which is exact in bf16), "tf32x3" (Triton's split, ~fp32), "ieee" (fp32 FMA, no
tensor cores) or "tf32" (fast, inaccurate; for comparison only). Defaults: bf16x3 for bf16/fp16
inputs, tf32x3 for fp32 inputs. The interpreter computes every dot in fp32 numpy, so it checks the
algebra (and the bf16 split's rounding), never tf32 error: precision is checked on the GPU.

Configs come from a rule (`_config`), never an autotune sweep; `_CFG_OVERRIDE` replaces fields of
it (tests and the benchmark). See benchmarks/NOTES.md for the FLOP / byte floor.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings

import torch
import triton
import triton.language as tl

from rwkv_ft.kernels.launch_options import FIXED_LAUNCH_OPTIONS, register_cap

# The interpreter's bf16 tl.dot multiplies raw bit patterns (triton 3.9), so bf16 products are
# widened to fp32 there (same values: a bf16 x bf16 product is exact in fp32). Triton itself
# decides interpret mode when a kernel is decorated, i.e. at import of this module.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

W_MIN = -16.0  # w is clamped here: exp(-16) = 1.1e-7 per step. Bounds every factor by e^64.
_W_MIN = tl.constexpr(W_MIN)
SUB = 8  # tokens per diagonal block of the level-0 pass
_SUB = tl.constexpr(SUB)
FAST_EXP = 40.0  # a chunk takes one level pass when L / 2 * max|w| <= this (factors <= e^40)
_FAST_EXP = tl.constexpr(FAST_EXP)
PRECISIONS = {"bf16x3": 0, "tf32x3": 1, "ieee": 2, "tf32": 3}

# Test hook: when True the host code fills every buffer it allocates with NaN (ints with -7), so a
# test can prove that the kernels write every element they return.
POISON_OUTPUTS = False
# Test / benchmark hook: a dict of `Wkv7Config` fields that replace the rule's choice.
_CFG_OVERRIDE: dict | None = None


# ----------------------------------------------------------------------------------------------
# Products


@triton.jit
def _dot_bf16(x, y, acc):
    """acc + x @ y for bf16 x, y, accumulated in fp32."""
    if _INTERPRET:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc)
    else:
        return tl.dot(x, y, acc)


@triton.jit
def _mm(x, y, PREC: tl.constexpr, XE: tl.constexpr, YE: tl.constexpr):
    """x (M, K) @ y (K, P), fp32 operands and result, at precision PREC (see the module docstring).

    XE / YE: x / y holds values exactly representable in bf16 (bf16 inputs), so "bf16x3" needs no
    low part for it.
    """
    if PREC == 0:
        xh = _to(x, tl.bfloat16)
        yh = _to(y, tl.bfloat16)
        acc = tl.zeros([x.shape[0], y.shape[1]], dtype=tl.float32)
        if not YE:
            acc = _dot_bf16(xh, _to(y - yh.to(tl.float32), tl.bfloat16), acc)
        if not XE:
            acc = _dot_bf16(_to(x - xh.to(tl.float32), tl.bfloat16), yh, acc)
        acc = _dot_bf16(xh, yh, acc)
    elif PREC == 1:
        acc = tl.dot(x, y, input_precision="tf32x3")
    elif PREC == 2:
        acc = tl.dot(x, y, input_precision="ieee")
    else:
        acc = tl.dot(x, y, input_precision="tf32")
    return acc


@triton.jit
def _inv_unit_lower(A, LOG2_L: tl.constexpr, PREC: tl.constexpr):
    """(I - A)^-1 for a strictly lower (L, L) A: (I + A)(I + A^2)(I + A^4)... (A^L = 0)."""
    rows = tl.arange(0, A.shape[0])
    M = (rows[:, None] == rows[None, :]).to(tl.float32) + A
    P = A
    for _ in tl.static_range(LOG2_L - 1):
        P = _mm(P, P, PREC, False, False)
        M = M + _mm(M, P, PREC, False, False)
    return M


# ----------------------------------------------------------------------------------------------
# Stacking: the four pair matrices share their operands, so they come from one (2L, N) x (N, 2L)
# product (and their gradients likewise): fewer, larger MMAs, with less operand replication.


@triton.jit
def _vstack(x, y):
    """(M, C), (M, C) -> (2M, C): the rows of x, then those of y."""
    return tl.reshape(tl.permute(tl.join(x, y), (2, 0, 1)), (2 * x.shape[0], x.shape[1]))


@triton.jit
def _vsplit(z):
    """(2M, C) -> its top and bottom (M, C) halves."""
    M: tl.constexpr = z.shape[0] // 2
    return tl.split(tl.permute(tl.reshape(z, (2, M, z.shape[1])), (1, 2, 0)))


@triton.jit
def _hstack(x, y):
    """(M, C), (M, C) -> (M, 2C): the columns of x, then those of y."""
    return tl.trans(_vstack(tl.trans(x), tl.trans(y)))


@triton.jit
def _hsplit(z):
    """(M, 2C) -> its left and right (M, C) halves."""
    left, right = _vsplit(tl.trans(z))
    return tl.trans(left), tl.trans(right)


# ----------------------------------------------------------------------------------------------
# Key side of a chunk (no state involved)


@triton.jit
def _levels(w, L: tl.constexpr, NLEV: tl.constexpr):
    """(number of level passes, half-block length of level 0). A chunk whose decays are all mild
    (every factor of one pass with the reference at the chunk middle stays within e^40) takes a
    single pass; otherwise the 8-token diagonal blocks and NLEV cross levels."""
    fast = tl.min(tl.min(w, axis=1), axis=0) >= -_FAST_EXP / (L // 2)
    return tl.where(fast, 1, NLEV + 1), tl.where(fast, L // 2, _SUB // 2)


@triton.jit
def _ref_rows(G64, rows, h):
    """(L, N) fp64: G at the reference token of each row's block of 2h tokens (its token h - 1),
    exactly (masked sums of one nonzero term)."""
    blk = rows // (2 * h)
    R = tl.zeros_like(G64)
    for j in tl.static_range(G64.shape[0] // (2 * _SUB // 2)):  # blocks beyond L match no row
        g = tl.sum(tl.where((rows == j * 2 * h + h - 1)[:, None], G64, 0.0), axis=0)
        R = tl.where((blk == j)[:, None], g[None, :], R)
    return R


@triton.jit
def _level(wc, g_mid, gx_mid, rows, lev, h0):
    """Factors of level `lev` (see the module docstring): row factors exp(Gx - R) (for a rows) and
    exp(G - R) (for r rows), column factor exp(R - G), each (L, N), and the level's pair mask,
    (2L, 2L) to match the stacked pair matrices. Level 0 is block-diagonal (blocks of 2 h0).
    wc: the clamped w (L, N); g_mid, gx_mid = G - G_L / 2, Gx - G_L / 2 (L, N)."""
    L: tl.constexpr = wc.shape[0]
    h = h0 << lev  # half a block
    diag = lev == 0
    if h0 == L // 2:
        # The one pass of a mild chunk (`_levels`) refers to R = G_L / 2: G is monotone, so
        # every exponent lies within +-|G_L| / 2 <= 40 (no reference-row search). Row and
        # column factors come from one rounded exponent each, so a pair (t, t) gets exactly
        # exp(x) exp(-x): products of the state-side exp(G), exp(G_L - G) would not cancel.
        fa = tl.exp(gx_mid)
        fr = tl.exp(g_mid)
        fc = tl.exp(-g_mid)
    else:
        # G in fp64, summed again here (rare: a chunk with some w < -80 / L), so that no fp64
        # tile stays live in the common path. Exponents are differences of prefix sums, and after
        # a few steps at w = -16 |G| ~ 100, whose fp32 rounding would cost exp(G_t - G_s) ~1e-5
        # where t - s is small.
        w64 = wc.to(tl.float64)
        G64 = tl.cumsum(w64, axis=0)
        R = _ref_rows(G64, rows, h)
        D = (G64 - R).to(tl.float32)  # G - R
        Dx = (G64 - w64 - R).to(tl.float32)  # Gx - R
        late = diag | ((rows // h) % 2 == 1)  # rows of this level
        early = diag | ((rows // h) % 2 == 0)  # columns of this level
        fa = tl.exp(tl.where(late[:, None], Dx, float("-inf")))
        fr = tl.exp(tl.where(late[:, None], D, float("-inf")))
        fc = tl.exp(tl.where(early[:, None], -D, float("-inf")))
    t2 = tl.arange(0, 2 * L) % L
    blk2 = t2 // (2 * h)
    late2 = diag | ((t2 // h) % 2 == 1)
    early2 = diag | ((t2 // h) % 2 == 0)
    pairs = (blk2[:, None] == blk2[None, :]) & late2[:, None] & early2[None, :]
    return fa, fr, fc, pairs


@triton.jit
def _causal(seg, rows, HAS_RESET: tl.constexpr):
    """(2L, 2L) mask of the stacked pair matrices [[A_rb, A_rk], [A_ab, A_ak]]: s <= t in the r
    rows, s < t in the a rows, and (with resets) t, s in the same segment."""
    L: tl.constexpr = rows.shape[0]
    i2 = tl.arange(0, 2 * L)
    t2 = i2 % L
    lower = t2[:, None] >= t2[None, :]
    strict = (t2[:, None] > t2[None, :]) | (i2 < L)[:, None]
    m = lower & strict
    if HAS_RESET:
        seg2 = tl.reshape(tl.permute(tl.join(seg, seg), (1, 0)), (2 * L,))
        m = m & (seg2[:, None] == seg2[None, :])
    return m


@triton.jit
def _masks(seg, rows, HAS_RESET: tl.constexpr):
    """Row masks (L, 1) of the tokens S_0 reaches and of the sources of the chunk-end state, and
    (1, 1) whether S_0 survives to the chunk end."""
    if HAS_RESET:
        last = tl.max(seg, axis=0)  # seg never decreases (rows past T repeat the last value)
        m0 = (seg == 0)[:, None]
        m_end = (seg == last)[:, None]
        keep = (tl.zeros([1, 1], dtype=tl.int32) + last) == 0
    else:
        m0 = (rows >= 0)[:, None]
        m_end = m0
        keep = tl.full([1, 1], 1, dtype=tl.int1)
    return m0, m_end, keep


@triton.jit
def _last_row(x, rows):
    """x[L - 1] as a (1, C) tensor."""
    return tl.sum(tl.where((rows == rows.shape[0] - 1)[:, None], x, 0.0), axis=0)[None, :]


@triton.jit
def _pair_pass(r, k, a, b, wc, g_mid, gx_mid, rows, lev, h0, PREC: tl.constexpr):
    """Level `lev`'s share of the stacked pair matrices (2L, 2L)."""
    fa, fr, fc, pairs = _level(wc, g_mid, gx_mid, rows, lev, h0)
    X = _vstack(r * fr, a * fa)  # (2L, N) row operands
    Y = _vstack(b * fc, k * fc)  # (2L, N) column operands
    return tl.where(pairs, _mm(X, tl.trans(Y), PREC, False, False), 0.0)


@triton.jit
def _pair_matrices(r, k, a, b, wc, g_mid, gx_mid, rows, n_lev, h0, PREC: tl.constexpr):
    """[[A_rb, A_rk], [A_ab, A_ak]] (2L, 2L) before the causal mask. The first pass is outside the
    loop: the one-pass plan (the common case) runs as straight-line code."""
    P = _pair_pass(r, k, a, b, wc, g_mid, gx_mid, rows, 0, h0, PREC)
    for lev in range(1, n_lev):
        P += _pair_pass(r, k, a, b, wc, g_mid, gx_mid, rows, lev, h0, PREC)
    return P


@triton.jit
def _decay_side(r, w, k, a, b, seg, rows, HAS_RESET: tl.constexpr, NLEV: tl.constexpr):
    """Everything of a chunk's key side but the pair matrices: elementwise in the tokens. r, w, k,
    a, b: (L, N) fp32, zero past the sequence end; seg: (L,) segment ids. Returns the state-side
    operands As, Rs, Bs, Ks (L, N), exp(G_L) (1, N) (0 when a reset cuts S_0 off), exp(G), exp(Gx),
    exp(G_L - G) (L, N), the clamped w (L, N), G - G_L / 2 and Gx - G_L / 2 (L, N), the level plan
    and the masks."""
    wc = tl.maximum(w, _W_MIN)
    w64 = wc.to(tl.float64)
    G64 = tl.cumsum(w64, axis=0)  # (L, N): log decay from the chunk start through token t
    GL64 = _last_row(G64, rows)  # (1, N)
    eg = tl.exp(G64.to(tl.float32))
    egx = tl.exp((G64 - w64).to(tl.float32))  # exp(G[t - 1])
    eL = tl.exp((GL64 - G64).to(tl.float32))  # exp(G_L - G_t)
    gl = GL64.to(tl.float32)
    g_mid = (G64 - 0.5 * GL64).to(tl.float32)  # exponents of the one-pass plan (R = G_L / 2)
    gx_mid = (G64 - w64 - 0.5 * GL64).to(tl.float32)
    n_lev, h0 = _levels(wc, r.shape[0], NLEV)
    m0, m_end, keep = _masks(seg, rows, HAS_RESET)
    As = tl.where(m0, a * egx, 0.0)
    Rs = tl.where(m0, r * eg, 0.0)
    Bs = tl.where(m_end, b * eL, 0.0)
    Ks = tl.where(m_end, k * eL, 0.0)
    gam = tl.where(keep, tl.exp(gl), 0.0)
    return As, Rs, Bs, Ks, gam, eg, egx, eL, wc, g_mid, gx_mid, n_lev, h0, m0, m_end


@triton.jit
def _pair_side(
    r, k, a, b, seg, rows, wc, g_mid, gx_mid, n_lev, h0, HAS_RESET: tl.constexpr, LOG2_L: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """The masked stacked pair matrices (2L, 2L) and (I - A_ab)^-1 (L, L) of a chunk (the products
    of its key side), from `_decay_side`'s exponents."""
    pm = _pair_matrices(r, k, a, b, wc, g_mid, gx_mid, rows, n_lev, h0, PREC)
    P = tl.where(_causal(seg, rows, HAS_RESET), pm, 0.0)
    _, Pb = _vsplit(P)
    Aab, _ = _hsplit(Pb)
    return P, _inv_unit_lower(Aab, LOG2_L, PREC)


# ----------------------------------------------------------------------------------------------
# Memory


@triton.jit
def _load_rows(ptr, t0, T, s_t, rows, cols):
    """(L, C) fp32 tile of tokens t0 .. t0 + L - 1 (zero past T); ptr points at token 0, column 0."""
    t = t0 + rows
    offs = t.to(tl.int64)[:, None] * s_t + cols[None, :]
    return tl.load(ptr + offs, mask=(t < T)[:, None], other=0.0).to(tl.float32)


@triton.jit
def _to(x, dtype: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even (the GPU's default). The interpreter truncates
    fp32 -> bf16, so there the rounding is done on the bits first (then truncation is exact)."""
    if dtype == tl.float32:
        return x
    elif _INTERPRET and dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(dtype)


@triton.jit
def _store_rows(ptr, x, t0, T, s_t, rows, cols):
    t = t0 + rows
    offs = t.to(tl.int64)[:, None] * s_t + cols[None, :]
    tl.store(ptr + offs, _to(x, ptr.dtype.element_ty), mask=(t < T)[:, None])


@triton.jit
def _load_raw(ptr, t0, T, s_t, rows, cols):
    """Like `_load_rows` but in the stored dtype: bf16 / fp16 key-side inputs stay half-width in
    registers (they are read several times per chunk) and widen where they meet fp32 values."""
    t = t0 + rows
    offs = t.to(tl.int64)[:, None] * s_t + cols[None, :]
    return tl.load(ptr + offs, mask=(t < T)[:, None], other=0.0)


@triton.jit
def _load_cols(ptr, t0, T, s_t, rows, cols):
    """(C, L) fp32 tile: the transpose of `_load_rows` (value-major tiles)."""
    t = t0 + rows
    offs = t.to(tl.int64)[None, :] * s_t + cols[:, None]
    return tl.load(ptr + offs, mask=(t < T)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_cols(ptr, xt, t0, T, s_t, rows, cols):
    """Store a (C, L) tile as the rows t0 .. t0 + L - 1 (the transpose of `_store_rows`)."""
    t = t0 + rows
    offs = t.to(tl.int64)[None, :] * s_t + cols[:, None]
    tl.store(ptr + offs, _to(xt, ptr.dtype.element_ty), mask=(t < T)[None, :])


@triton.jit
def _add_rows(ptr, x, t0, T, s_t, rows, cols):
    t = t0 + rows
    offs = t.to(tl.int64)[:, None] * s_t + cols[None, :]
    tl.atomic_add(ptr + offs, x, mask=(t < T)[:, None], sem="relaxed")


@triton.jit
def _segments(reset_ptr, bi, t0, T, rows, HAS_RESET: tl.constexpr):
    """(L,) int32: resets at or before each token of the chunk (0 everywhere without resets)."""
    if HAS_RESET:
        t = t0 + rows
        x = tl.load(reset_ptr + bi.to(tl.int64) * T + t, mask=t < T, other=0)
        return tl.cumsum(x.to(tl.int32), axis=0)
    else:
        return tl.zeros_like(rows)


@triton.jit
def _chunk_key_inputs(
    r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, reset_ptr, x_off, bi, t0, T, s_t, rows, cols, HAS_RESET: tl.constexpr
):  # fmt: skip
    """One chunk's key-side inputs, (L, N) each: r, k, a, b in their stored dtype (read several
    times, they widen where they meet fp32 values), w in fp32; and its segment ids (L,)."""
    r = _load_raw(r_ptr + x_off, t0, T, s_t, rows, cols)
    w = _load_rows(w_ptr + x_off, t0, T, s_t, rows, cols)
    k = _load_raw(k_ptr + x_off, t0, T, s_t, rows, cols)
    a = _load_raw(a_ptr + x_off, t0, T, s_t, rows, cols)
    b = _load_raw(b_ptr + x_off, t0, T, s_t, rows, cols)
    return r, w, k, a, b, _segments(reset_ptr, bi, t0, T, rows, HAS_RESET)


# ----------------------------------------------------------------------------------------------
# One chunk, forward and backward


@triton.jit
def _pass_grads(D, r, k, a, b, wc, g_mid, gx_mid, rows, lev, h0, PREC: tl.constexpr):
    """Level `lev`'s share of dr, dk, da, db (L, N) from D (2L, 2L)."""
    fa, fr, fc, pairs = _level(wc, g_mid, gx_mid, rows, lev, h0)
    Dp = tl.where(pairs, D, 0.0)
    # [dA_rb B + dA_rk K; dA_ab B + dA_ak K] and [dA_rb^T R + dA_ab^T A; dA_rk^T R + dA_ak^T A]
    x_r, x_a = _vsplit(_mm(Dp, _vstack(b * fc, k * fc), PREC, False, False))
    x_b, x_k = _vsplit(_mm(tl.trans(Dp), _vstack(r * fr, a * fa), PREC, False, False))
    return fr * x_r, fc * x_k, fa * x_a, fc * x_b


@triton.jit
def _level_grads(D, r, k, a, b, wc, g_mid, gx_mid, rows, n_lev, h0, PREC: tl.constexpr):
    """dr, dk, da, db (L, N) from D = the gradient of the stacked pair matrices (2L, 2L); the first
    pass outside the loop, as in `_pair_matrices`."""
    dr, dk, da, db = _pass_grads(D, r, k, a, b, wc, g_mid, gx_mid, rows, 0, h0, PREC)
    for lev in range(1, n_lev):
        dr_l, dk_l, da_l, db_l = _pass_grads(D, r, k, a, b, wc, g_mid, gx_mid, rows, lev, h0, PREC)
        dr += dr_l
        dk += dk_l
        da += da_l
        db += db_l
    return dr, dk, da, db


@triton.jit
def _zero_span(rows):
    """(2L, 2L) mask of the stacked pairs whose exponent spans no step: (t, t) in the r rows,
    (t, t - 1) in the a rows."""
    L: tl.constexpr = rows.shape[0]
    i2 = tl.arange(0, 2 * L)
    t = (i2 % L)[:, None]
    s = (i2 % L)[None, :]
    return tl.where((i2 < L)[:, None], t == s, t == s + 1)


@triton.jit
def _level_grads_unit(D, r, k, a, b, PREC: tl.constexpr, XE: tl.constexpr):
    """dr, dk, da, db (L, N) from pairs of D whose factor is 1 (the zero-span pairs). XE: the
    inputs are exact in bf16 (one operand of each product needs no low part)."""
    x_r, x_a = _vsplit(_mm(D, _vstack(b, k).to(tl.float32), PREC, False, XE))
    x_b, x_k = _vsplit(_mm(tl.trans(D), _vstack(r, a).to(tl.float32), PREC, False, XE))
    return x_r, x_k, x_a, x_b


@triton.jit
def _value_block_grads(
    S0, dS, vt, dyt, Pt, Aak, Minv, Wa, MA, BsKs, PREC: tl.constexpr, VE: tl.constexpr, GE: tl.constexpr,
):  # fmt: skip
    """The value side of one chunk's backward for BV value rows. S0 (BV, N): state entering the
    chunk; dS (BV, N): adjoint of the state after it; vt, dyt: V^T, dY^T (BV, L). Returns dV^T
    (BV, L) and this block's shares of the key-side sums: [dY; dU] S0 (2L, N) (the gradients of
    Rs, As), [SA; V] dS (2L, N) (of Bs, Ks) and [dY; dU][SA; V]^T (2L, 2L) (of the pair matrices).
    Wa = (I - A_ab)^-1 As (L, N), MA = (I - A_ab)^-1 A_ak (L, L)."""
    # Recompute SA^T = S0 Wa^T + V^T MA^T (BV, L), value-major like the forward.
    SAt = _mm(S0, tl.trans(Wa), PREC, False, False) + _mm(vt, tl.trans(MA), PREC, VE, False)
    # Transposed: dSA^T = dY^T A_rb + dS Bs^T, dU^T = dSA^T (I - A_ab)^-1,
    # dV^T = dY^T A_rk + dU^T A_ak + dS Ks^T.
    yb, yk = _hsplit(_mm(dyt, Pt, PREC, GE, False))  # (BV, L) each
    sb, sk = _hsplit(_mm(dS, tl.trans(BsKs), PREC, False, False))
    dUt = _mm(yb + sb, Minv, PREC, False, False)
    dvt = yk + sk + _mm(dUt, Aak, PREC, False, False)
    Et = _hstack(dyt, dUt)  # (BV, 2L) = [dY; dU]^T
    Ft = _hstack(SAt, vt)  # (BV, 2L) = [SA; V]^T
    dRA = tl.trans(_mm(tl.trans(S0), Et, PREC, False, False))  # [dY; dU] S0  (2L, N)
    dBK = tl.trans(_mm(tl.trans(dS), Ft, PREC, False, False))  # [SA; V] dS  (2L, N)
    D = _mm(tl.trans(Et), Ft, PREC, False, False)  # (2L, 2L)
    return dvt, dRA, dBK, D


@triton.jit
def _key_grads(
    D, dRA, dBK, sdS, r, w, k, a, b, seg, rows, eg, egx, eL, gam, wc, g_mid, gx_mid, n_lev, h0, m0, m_end,
    HAS_RESET: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """dr, dw, dk, da, db (L, N) of one chunk from the key-side sums over every value row: D (2L,
    2L) the pair matrices' gradient (unmasked), dRA / dBK the gradients of [Rs; As] / [Bs; Ks]
    (2L, N) and sdS = colsum(S_0 * dS) (1, N)."""
    D = tl.where(_causal(seg, rows, HAS_RESET), D, 0.0)
    dRs, dAs = _vsplit(dRA)
    dBs, dKs = _vsplit(dBK)
    # Pairs whose exponent spans no step (A_rb, A_rk diagonal; A_ab, A_ak at s = t - 1) do not
    # depend on w: they go to dr, dk, da, db directly and stay out of the decay sums below (in
    # those they would cancel, leaving fp32 round-off that swamps dw of fast-decaying channels).
    zero = _zero_span(rows)
    dr, dk, da, db = _level_grads(tl.where(zero, 0.0, D), r, k, a, b, wc, g_mid, gx_mid, rows, n_lev, h0, PREC)
    dr += tl.where(m0, dRs * eg, 0.0)
    da += tl.where(m0, dAs * egx, 0.0)
    db_end = tl.where(m_end, dBs * eL, 0.0)
    dk_end = tl.where(m_end, dKs * eL, 0.0)
    # Decay. dw_j sums every exponent that holds w_j: G_t for r_t (j <= t), G_{t-1} for a_t
    # (j < t), -G_s for b_s, k_s in the pair matrices (j <= s, cancelling the rows' share
    # for j <= s), G_L - G_s for Bs, Ks (j > s) and G_L for exp(G_L) (every j).
    ada = a * da
    bk = b * db_end + k * dk_end
    dw = tl.cumsum(r * dr - k * dk - b * db, axis=0, reverse=True)
    dw += tl.cumsum(ada, axis=0, reverse=True) - ada  # sum over t > j
    dw += tl.cumsum(bk, axis=0) - bk  # sum over s < j
    dw += gam * sdS
    dw = tl.where(w >= _W_MIN, dw, 0.0)
    dr0, dk0, da0, db0 = _level_grads_unit(tl.where(zero, D, 0.0), r, k, a, b, PREC, r.dtype == tl.bfloat16)
    return dr + dr0, dw, dk + dk_end + dk0, da + da0, db + db_end + db0


@triton.jit
def _key_offsets(base, rows):
    """Offsets of one chunk's kept key side: the masked stacked pair matrices (2L, 2L) and
    (I - A_ab)^-1 (L, L), row-major, chunk `base` of their buffers. (Wa = (I - A_ab)^-1 As is not
    kept: loading it costs _grad_kernel more instructions than its product, sm_90a compile.)"""
    L: tl.constexpr = rows.shape[0]
    i2 = tl.arange(0, 2 * L)
    p = base * 4 * L * L + i2[:, None] * 2 * L + i2[None, :]
    inv = base * L * L + rows[:, None] * L + rows[None, :]
    return p, inv


@triton.jit
def _store_key_side(kp_ptr, kinv_ptr, base, P, Minv, rows):
    p, inv = _key_offsets(base, rows)
    tl.store(kp_ptr + p, P)
    tl.store(kinv_ptr + inv, Minv)


@triton.jit
def _load_key_side(kp_ptr, kinv_ptr, base, rows):
    p, inv = _key_offsets(base, rows)
    return tl.load(kp_ptr + p), tl.load(kinv_ptr + inv)


# ----------------------------------------------------------------------------------------------
# Kernels. Forward: _prep_kernel (every chunk at once: the chunk's transition M, its state-free
# part D, and the y operators Q, Yc) then _scan_fwd_kernel (the chunks in order, the state in
# registers). Backward: _prep_kernel again (M, Q only), _scan_bwd_kernel (the state's adjoint,
# chunks last first), then _grad_kernel (every chunk at once: all input gradients).


@triton.jit
def _prep_kernel(
    r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, reset_ptr, qt_ptr, m_ptr, yct_ptr, d_ptr, kp_ptr, kinv_ptr,
    T, H, s_b, s_t, s_h, NC,
    N: tl.constexpr, L: tl.constexpr, NLEV: tl.constexpr, LOG2_L: tl.constexpr, HAS_RESET: tl.constexpr,
    VALUE_SIDE: tl.constexpr, Y_SIDE: tl.constexpr, KEEP_KEY: tl.constexpr, PREC: tl.constexpr,
    VE: tl.constexpr,
):  # fmt: skip
    """Program (chunk, batch * H + head): the chunk as a map of its entering state S_0,
    Y^T = S_0 Q^T + Yc^T and S_L = S_0 M + D (see the module docstring). Writes Q^T (N, L) and
    M (N, N); with VALUE_SIDE also D (N, N) and, with Y_SIDE too, Yc^T (N, L) (the backward's run
    of the forward needs the states, not y); with KEEP_KEY (in the backward) also
    the key-side products _grad_kernel would otherwise compute again: the masked pair matrices
    (2L, 2L) and (I - A_ab)^-1 (L, L)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // H
    hi = bh % H
    rows = tl.arange(0, L)
    cols = tl.arange(0, N)
    t0 = c * L
    x_off = bi.to(tl.int64) * s_b + hi.to(tl.int64) * s_h
    base = bh.to(tl.int64) * NC + c
    r, w, k, a, b, seg = _chunk_key_inputs(
        r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, reset_ptr, x_off, bi, t0, T, s_t, rows, cols, HAS_RESET
    )
    As, Rs, Bs, Ks, gam, _, _, _, wc, g_mid, gx_mid, n_lev, h0, _, _ = _decay_side(
        r, w, k, a, b, seg, rows, HAS_RESET, NLEV
    )
    P, Minv = _pair_side(r, k, a, b, seg, rows, wc, g_mid, gx_mid, n_lev, h0, HAS_RESET, LOG2_L, PREC)
    Pl, Pr = _hsplit(P)  # [[A_rb], [A_ab]], [[A_rk], [A_ak]]  (2L, L)
    Arb, _ = _vsplit(Pl)
    Ark, Aak = _vsplit(Pr)
    Wa = _mm(Minv, As, PREC, False, False)  # (L, N): SA = Wa S_0^T + Ua
    Q = Rs + _mm(Arb, Wa, PREC, False, False)  # (L, N)
    eye = cols[:, None] == cols[None, :]
    M = tl.where(eye, gam, 0.0) + _mm(tl.trans(Wa), Bs, PREC, False, False)  # (N, N)
    lt = cols[:, None] * L + rows[None, :]  # (N, L) tile of a transposed (L, N) chunk
    nn = cols[:, None] * N + cols[None, :]
    tl.store(qt_ptr + base * N * L + lt, tl.trans(Q))
    tl.store(m_ptr + base * N * N + nn, M)
    if KEEP_KEY:
        _store_key_side(kp_ptr, kinv_ptr, base, P, Minv, rows)
    if VALUE_SIDE:
        V = _load_rows(v_ptr + x_off, t0, T, s_t, rows, cols)  # (L, N)
        # Through (L, L) maps of the keys alone, Ua = (Minv A_ak) V and Yc = (A_rb Minv A_ak + A_rk) V
        # are one product each with V, whose operand is exact for bf16 inputs (two MMAs), instead
        # of a chain of (L, N) products.
        MA = _mm(Minv, Aak, PREC, False, False)  # (L, L)
        Ua = _mm(MA, V, PREC, False, VE)  # (L, N)
        D = _mm(tl.trans(Ua), Bs, PREC, False, False) + _mm(tl.trans(V), Ks, PREC, VE, False)  # (N, N)
        tl.store(d_ptr + base * N * N + nn, D)
        if Y_SIDE:
            Yc = _mm(_mm(Arb, MA, PREC, False, False) + Ark, V, PREC, False, VE)
            tl.store(yct_ptr + base * N * L + lt, tl.trans(Yc))


@triton.jit
def _scan_fwd_kernel(
    s0_ptr, qt_ptr, m_ptr, yct_ptr, d_ptr, y_ptr, sT_ptr, ck_ptr, T, H, NC,
    N: tl.constexpr, BV: tl.constexpr, L: tl.constexpr, HAS_STATE: tl.constexpr, STORE_CK: tl.constexpr,
    STORE_Y: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Program (value block, batch * H + head): the chunks in order, S (BV, N) in registers.
    Per chunk two products with S on the left: y^T = S Q^T + Yc^T (unless not STORE_Y: the
    backward's run of the forward), S <- S M + D. With STORE_CK, the state entering every chunk is
    stored for the backward."""
    vb = tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // H
    hi = bh % H
    rows = tl.arange(0, L)
    cols = tl.arange(0, N)
    vcols = vb * BV + tl.arange(0, BV)
    o_off = bi.to(tl.int64) * T * H * N + hi * N  # y: (B, T, H, N) contiguous
    tile = vcols[:, None] * N + cols[None, :]  # (BV, N) rows of an (N, N) matrix
    vl = vcols[:, None] * L + rows[None, :]  # (BV, L) rows of a transposed chunk
    lt = cols[:, None] * L + rows[None, :]
    nn = cols[:, None] * N + cols[None, :]
    if HAS_STATE:
        S = tl.load(s0_ptr + bh.to(tl.int64) * N * N + tile)
    else:
        S = tl.zeros([BV, N], dtype=tl.float32)
    for c in range(NC):
        base = bh.to(tl.int64) * NC + c
        if STORE_CK:
            tl.store(ck_ptr + base * N * N + tile, S)
        M = tl.load(m_ptr + base * N * N + nn)  # (N, N)
        D = tl.load(d_ptr + base * N * N + tile)  # (BV, N)
        if STORE_Y:
            Qt = tl.load(qt_ptr + base * N * L + lt)  # (N, L)
            Yct = tl.load(yct_ptr + base * N * L + vl)  # (BV, L)
            yt = _mm(S, Qt, PREC, False, False) + Yct
            _store_cols(y_ptr + o_off, yt, c * L, T, H * N, rows, vcols)
        S = _mm(S, M, PREC, False, False) + D
    tl.store(sT_ptr + bh.to(tl.int64) * N * N + tile, S)


@triton.jit
def _scan_bwd_kernel(
    dsT_ptr, qt_ptr, m_ptr, dy_ptr, ds_ptr, ds0_ptr, T, H, NC,
    N: tl.constexpr, BV: tl.constexpr, L: tl.constexpr, HAS_DST: tl.constexpr, HAS_DY: tl.constexpr,
    WANT_DS0: tl.constexpr, PREC: tl.constexpr, GE: tl.constexpr,
):  # fmt: skip
    """Program (value block, batch * H + head): the chunks last first, the adjoint dS (BV, N) of
    the state after the chunk in registers: stores it per chunk, then dS <- dS M^T + dY^T Q."""
    vb = tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // H
    hi = bh % H
    rows = tl.arange(0, L)
    cols = tl.arange(0, N)
    vcols = vb * BV + tl.arange(0, BV)
    o_off = bi.to(tl.int64) * T * H * N + hi * N  # dy: (B, T, H, N) contiguous
    tile = vcols[:, None] * N + cols[None, :]
    tl_ = rows[:, None] + cols[None, :] * L  # (L, N) tile of a transposed chunk: Q from Q^T
    mt = cols[:, None] + cols[None, :] * N  # (N, N): M^T
    if HAS_DST:
        dS = tl.load(dsT_ptr + bh.to(tl.int64) * N * N + tile)
    else:
        dS = tl.zeros([BV, N], dtype=tl.float32)
    for cc in range(NC):
        c = NC - 1 - cc
        base = bh.to(tl.int64) * NC + c
        tl.store(ds_ptr + base * N * N + tile, dS)
        Mt = tl.load(m_ptr + base * N * N + mt)
        new = _mm(dS, Mt, PREC, False, False)
        if HAS_DY:
            Q = tl.load(qt_ptr + base * N * L + tl_)  # (L, N)
            dyt = _load_cols(dy_ptr + o_off, c * L, T, H * N, rows, vcols)  # (BV, L)
            new += _mm(dyt, Q, PREC, GE, False)
        dS = new
    if WANT_DS0:
        tl.store(ds0_ptr + bh.to(tl.int64) * N * N + tile, dS)


@triton.jit
def _grad_kernel(
    r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, reset_ptr, dy_ptr, ck_ptr, ds_ptr, kp_ptr, kinv_ptr,
    dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr,
    T, H, s_b, s_t, s_h, NC,
    N: tl.constexpr, BV: tl.constexpr, L: tl.constexpr, NLEV: tl.constexpr, LOG2_L: tl.constexpr,
    HAS_RESET: tl.constexpr, HAS_DY: tl.constexpr, LOAD_KEY: tl.constexpr, PREC: tl.constexpr,
    VE: tl.constexpr, GE: tl.constexpr,
):  # fmt: skip
    """Program (chunk, batch * H + head): the chunk's input gradients from the state entering it
    (stored by the forward) and the adjoint of the state after it (stored by _scan_bwd_kernel).
    The key-side algebra runs once; the value rows are taken BV at a time, their key-side shares
    summed in registers (no atomics: bitwise repeatable). LOAD_KEY: the pair matrices and
    (I - A_ab)^-1 come from the backward's _prep_kernel (KEEP_KEY) instead of being computed again."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    bi = bh // H
    hi = bh % H
    rows = tl.arange(0, L)
    cols = tl.arange(0, N)
    t0 = c * L
    x_off = bi.to(tl.int64) * s_b + hi.to(tl.int64) * s_h
    o_off = bi.to(tl.int64) * T * H * N + hi * N  # dy and the gradients: (B, T, H, N) contiguous
    base = bh.to(tl.int64) * NC + c
    r, w, k, a, b, seg = _chunk_key_inputs(
        r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, reset_ptr, x_off, bi, t0, T, s_t, rows, cols, HAS_RESET
    )
    As, Rs, Bs, Ks, gam, eg, egx, eL, wc, g_mid, gx_mid, n_lev, h0, m0, m_end = _decay_side(
        r, w, k, a, b, seg, rows, HAS_RESET, NLEV
    )
    if LOAD_KEY:
        P, Minv = _load_key_side(kp_ptr, kinv_ptr, base, rows)
    else:
        P, Minv = _pair_side(r, k, a, b, seg, rows, wc, g_mid, gx_mid, n_lev, h0, HAS_RESET, LOG2_L, PREC)
    Wa = _mm(Minv, As, PREC, False, False)  # key-side factor of SA, once per chunk
    Pt, Pb = _vsplit(P)  # [A_rb, A_rk], [A_ab, A_ak]  (L, 2L)
    _, Aak = _hsplit(Pb)
    BsKs = _vstack(Bs, Ks)
    MA = _mm(Minv, Aak, PREC, False, False)
    D = tl.zeros([2 * L, 2 * L], dtype=tl.float32)
    dRA = tl.zeros([2 * L, N], dtype=tl.float32)
    dBK = tl.zeros([2 * L, N], dtype=tl.float32)
    sdS = tl.zeros([1, N], dtype=tl.float32)
    for vb in range(N // BV):
        vcols = vb * BV + tl.arange(0, BV)
        tile = vcols[:, None] * N + cols[None, :]
        S0 = tl.load(ck_ptr + base * N * N + tile)
        dS = tl.load(ds_ptr + base * N * N + tile)
        vt = _load_cols(v_ptr + x_off, t0, T, s_t, rows, vcols)  # (BV, L)
        if HAS_DY:
            dyt = _load_cols(dy_ptr + o_off, t0, T, H * N, rows, vcols)
        else:
            dyt = tl.zeros([BV, L], dtype=tl.float32)
        dvt, dRA_v, dBK_v, D_v = _value_block_grads(S0, dS, vt, dyt, Pt, Aak, Minv, Wa, MA, BsKs, PREC, VE, GE)
        _store_cols(dv_ptr + o_off, dvt, t0, T, H * N, rows, vcols)
        D += D_v
        dRA += dRA_v
        dBK += dBK_v
        sdS += tl.sum(S0 * dS, axis=0)[None, :]
    # The key side again, from the inputs reloaded: holding its ~14 (L, N) tiles across the value
    # loop spilled them (Nsight Compute, H100: the L1TEX waits were 40% of the stalls), recomputing
    # them is elementwise work (+5% instructions for 1,064 -> 432 bytes of spill area, sm_90a).
    r, w, k, a, b, seg = _chunk_key_inputs(
        r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, reset_ptr, x_off, bi, t0, T, s_t, rows, cols, HAS_RESET
    )
    As, Rs, Bs, Ks, gam, eg, egx, eL, wc, g_mid, gx_mid, n_lev, h0, m0, m_end = _decay_side(
        r, w, k, a, b, seg, rows, HAS_RESET, NLEV
    )
    dr, dw, dk, da, db = _key_grads(
        D, dRA, dBK, sdS, r, w, k, a, b, seg, rows, eg, egx, eL, gam, wc, g_mid, gx_mid, n_lev, h0, m0, m_end,
        HAS_RESET, PREC,
    )  # fmt: skip
    _store_rows(dr_ptr + o_off, dr, t0, T, H * N, rows, cols)
    _store_rows(dw_ptr + o_off, dw, t0, T, H * N, rows, cols)
    _store_rows(dk_ptr + o_off, dk, t0, T, H * N, rows, cols)
    _store_rows(da_ptr + o_off, da, t0, T, H * N, rows, cols)
    _store_rows(db_ptr + o_off, db, t0, T, H * N, rows, cols)


# ----------------------------------------------------------------------------------------------
# Host side


@dataclasses.dataclass(frozen=True)
class Wkv7Config:
    """Launch configuration. chunk: tokens per chunk (L: 16, 32 or 64); bv_scan: value rows per
    program of the scans (N / bv_scan programs per head); bv_grad: value rows per step of the
    gradient kernel's loop; prec / prec_scan: a key of PRECISIONS for the per-chunk algebra / for
    the scans' state products; warps_*: num_warps; stages_scan: software pipelining depth of the
    scans' loads; regs_*: a register cap per thread (ptxas maxnreg; None: the compiler's choice),
    which trades spills for more programs per SM."""

    chunk: int = 16
    bv_scan: int = 64
    bv_grad: int = 32
    prec: str = "bf16x3"
    prec_scan: str = "bf16x3"
    warps_prep: int = 4
    warps_scan: int = 4
    warps_grad: int = 4
    stages_scan: int = 2
    keep_prep: bool = False  # the forward keeps Q and M for the backward (more memory, no recompute)
    regs_prep: int | None = None
    regs_scan: int | None = None
    regs_grad: int | None = None


@functools.cache
def _sm_count() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132


def _value_block(N: int, heads: int, min_programs: int) -> int:
    """The largest value block (<= N, >= 16) that still gives `min_programs` programs."""
    bv = N
    while bv > 16 and heads * (N // bv) < min_programs:
        bv //= 2
    return bv


def _config(B: int, T: int, H: int, N: int, dtype: torch.dtype) -> Wkv7Config:
    """The rule (measured on an H200, 2026-12-04, benchmarks/NOTES.md). Chunks of 16 tokens: the
    per-chunk algebra grows faster than linearly in the chunk length (8,4096,32 fwd+bwd: 19.4 ms
    at 16, 29.7 at 32, 50.1 at 64). The scans are the only sequential work: they split the value
    dimension until there is about one program per SM (rows of S are independent).
    The per-chunk kernels run one program per chunk and head. The gradient kernel walks the value
    rows 32 at a time: with triton 3.6 on an H200, 64-row tiles there fault (illegal shared-memory
    address, compute-sanitizer, 2026-12-04; benchmarks/wkv7_gpu_diag.py checks every config).
    The scans are bound by their loads of M and D: three stages in flight instead of two took
    fwd+bwd to 0.90-0.99x (H100, 2026-12-05); at N = 128 three stages of M would not fit in
    shared memory. The prep kernel is latency-bound at two programs per SM (214 registers):
    capped at 168 it runs three, and the forward takes 0.90-0.94x the time, fwd+bwd 0.96-0.97x
    (H200, 2026-12-05); N = 128 was not measured with the cap, so it keeps the compiler's choice."""
    prec = "tf32x3" if dtype == torch.float32 else "bf16x3"
    cfg = Wkv7Config(
        bv_scan=_value_block(N, B * H, _sm_count()),
        bv_grad=min(32, N),
        prec=prec,
        prec_scan=prec,
        stages_scan=3 if N <= 64 else 2,
        regs_prep=168 if N <= 64 else None,
    )
    if _CFG_OVERRIDE:
        cfg = dataclasses.replace(cfg, **_CFG_OVERRIDE)
    _check_config(cfg, N)
    return cfg


def _check_config(cfg: Wkv7Config, N: int) -> None:
    if cfg.chunk not in (16, 32, 64):
        raise ValueError(f"wkv7: chunk must be 16, 32 or 64, got {cfg.chunk}")
    for bv in (cfg.bv_scan, cfg.bv_grad):
        if bv < 16 or bv > N or N % bv:
            raise ValueError(f"wkv7: value block {bv} must divide N = {N} and be >= 16")
    for prec in (cfg.prec, cfg.prec_scan):
        if prec not in PRECISIONS:
            raise ValueError(f"wkv7: prec must be one of {sorted(PRECISIONS)}, got {prec!r}")


def _new(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        fill = float("nan") if dtype.is_floating_point else -7
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _shared_strides(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs as the kernels read them: one set of (B, T, H) strides and a unit last stride.
    Views that already agree (e.g. T-slices of one layout) are used in place; otherwise copies."""
    st = xs[0].stride()
    if st[-1] == 1 and all(x.stride() == st for x in xs):
        return xs
    return [x.contiguous() for x in xs]


def _meta(cfg: Wkv7Config, T: int) -> dict:
    L = cfg.chunk
    return dict(NC=triton.cdiv(T, L), L=L, NLEV=(L // SUB).bit_length() - 1, LOG2_L=L.bit_length() - 1)


def stored_states_shape(B: int, T: int, H: int, N: int, cfg: Wkv7Config) -> tuple[int, ...]:
    """Shape of what the forward keeps for the backward besides the inputs: the fp32 state
    entering every chunk."""
    return (B, H, triton.cdiv(T, cfg.chunk), N, N)


# Each launch is described once, as (kernel, grid, args, meta), so that the same description serves
# the launch and `_compile_ahead` (where the tensors are replaced by their dtypes: Triton compiles
# for the dtypes, the integers and the constexprs, and a 16-byte aligned pointer, as torch allocates).


def _launch(kernel, grid, args, meta) -> None:
    kernel[grid](*args, **meta)


def _prep_launch(r, w, k, v, a, b, reset, outs, cfg: Wkv7Config, value_side: bool, key=None):
    """_prep_kernel writing `outs` = (Q^T, M, Yc^T, D); D None unless value_side, Yc^T None
    unless value_side and y is wanted; and with `key` = (pair matrices, (I - A_ab)^-1) buffers,
    the key side for _grad_kernel."""
    B, T, H, N = r.shape
    m = _meta(cfg, T)
    s_b, s_t, s_h, _ = r.stride()
    args = (r, w, k, v, a, b, reset, *outs, *(key or (None,) * 2), T, H, s_b, s_t, s_h, m["NC"])
    meta = dict(
        N=N, L=m["L"], NLEV=m["NLEV"], LOG2_L=m["LOG2_L"], HAS_RESET=reset is not None, VALUE_SIDE=value_side,
        Y_SIDE=value_side and outs[2] is not None, KEEP_KEY=key is not None, PREC=PRECISIONS[cfg.prec],
        VE=r.dtype == torch.bfloat16, num_warps=cfg.warps_prep, **FIXED_LAUNCH_OPTIONS, **register_cap(cfg.regs_prep),
    )  # fmt: skip
    return _prep_kernel, (m["NC"], B * H), args, meta


def _scan_fwd_launch(r, s0, prep, y, sT, ck, cfg: Wkv7Config):
    B, T, H, N = r.shape
    m = _meta(cfg, T)
    args = (s0, *prep, y, sT, ck, T, H, m["NC"])
    meta = dict(
        N=N, BV=cfg.bv_scan, L=m["L"], HAS_STATE=s0 is not None, STORE_CK=ck is not None,
        STORE_Y=y is not None, PREC=PRECISIONS[cfg.prec_scan], num_warps=cfg.warps_scan, num_stages=cfg.stages_scan,
        **FIXED_LAUNCH_OPTIONS, **register_cap(cfg.regs_scan),
    )  # fmt: skip
    return _scan_fwd_kernel, (N // cfg.bv_scan, B * H), args, meta


def _scan_bwd_launch(r, dsT, qt, mm, dy, ds, ds0, cfg: Wkv7Config):
    B, T, H, N = r.shape
    m = _meta(cfg, T)
    args = (dsT, qt, mm, dy, ds, ds0, T, H, m["NC"])
    meta = dict(
        N=N, BV=cfg.bv_scan, L=m["L"], HAS_DST=dsT is not None, HAS_DY=dy is not None, WANT_DS0=ds0 is not None,
        PREC=PRECISIONS[cfg.prec_scan], GE=r.dtype == torch.bfloat16, num_warps=cfg.warps_scan,
        num_stages=cfg.stages_scan, **FIXED_LAUNCH_OPTIONS, **register_cap(cfg.regs_scan),
    )  # fmt: skip
    return _scan_bwd_kernel, (N // cfg.bv_scan, B * H), args, meta


def _grad_launch(r, w, k, v, a, b, reset, dy, ck, ds, key, grads, cfg: Wkv7Config):
    """_grad_kernel writing `grads` = (dr, dw, dk, dv, da, db), reading the key side `key` kept by
    the backward's _prep_kernel (or, None, computing it)."""
    B, T, H, N = r.shape
    m = _meta(cfg, T)
    s_b, s_t, s_h, _ = r.stride()
    args = (r, w, k, v, a, b, reset, dy, ck, ds, *(key or (None,) * 2), *grads, T, H, s_b, s_t, s_h, m["NC"])
    meta = dict(
        N=N, BV=cfg.bv_grad, L=m["L"], NLEV=m["NLEV"], LOG2_L=m["LOG2_L"], HAS_RESET=reset is not None,
        HAS_DY=dy is not None, LOAD_KEY=key is not None, PREC=PRECISIONS[cfg.prec], VE=r.dtype == torch.bfloat16,
        GE=r.dtype == torch.bfloat16, num_warps=cfg.warps_grad, **FIXED_LAUNCH_OPTIONS, **register_cap(cfg.regs_grad),
    )  # fmt: skip
    return _grad_kernel, (m["NC"], B * H), args, meta


def key_side_shapes(B: int, T: int, H: int, N: int, cfg: Wkv7Config) -> list[tuple[int, ...]]:
    """Shapes of the key side the backward's _prep_kernel keeps for _grad_kernel (transient, fp32):
    the stacked pair matrices and (I - A_ab)^-1 of every chunk (5 KB per chunk and head at L = 16)."""
    L, nc = cfg.chunk, triton.cdiv(T, cfg.chunk)
    return [(B * H, nc, 2 * L, 2 * L), (B * H, nc, L, L)]


def _prep(r, w, k, v, a, b, reset, cfg: Wkv7Config, value_side: bool, keep_key: bool = False, want_y: bool = True):
    """Launch _prep_kernel: Q^T and M (and D with value_side, Yc^T with value_side and want_y),
    (B*H, NC, ...) fp32, and with keep_key the key side for _grad_kernel (`key_side_shapes`; else
    None)."""
    B, T, H, N = r.shape
    m = _meta(cfg, T)
    dev = r.device
    qt = _new((B * H, m["NC"], N, m["L"]), torch.float32, dev)
    mm = _new((B * H, m["NC"], N, N), torch.float32, dev)
    yct = _new((B * H, m["NC"], N, m["L"]), torch.float32, dev) if value_side and want_y else None
    dd = _new((B * H, m["NC"], N, N), torch.float32, dev) if value_side else None
    key = [_new(shape, torch.float32, dev) for shape in key_side_shapes(B, T, H, N, cfg)] if keep_key else None
    _launch(*_prep_launch(r, w, k, v, a, b, reset, (qt, mm, yct, dd), cfg, value_side, key))
    return qt, mm, yct, dd, key


def wkv7_fwd(
    r, w, k, v, a, b, s0, reset, cfg: Wkv7Config, store_states: bool, backward: bool | None = None,
    keep_key: bool = False, want_y: bool = True,
):  # fmt: skip
    """r..b: (B, T, H, N) with shared strides; s0: (B, H, N, N) fp32 contiguous or None; reset:
    (B, T) uint8 contiguous or None. Returns y (B, T, H, N) in r's dtype (contiguous; None unless
    want_y: wkv7_bwd's run of the forward needs only the states), the final
    state (B, H, N, N) fp32 and what the backward needs besides the inputs: [] unless
    store_states, else [chunk-start states (`stored_states_shape`)] (+ [Q^T, M] with keep_prep,
    + the key side (`key_side_shapes`) with keep_key: wkv7_bwd's run of the forward).
    backward: whether a backward will follow (default: store_states; True without store_states:
    it will rebuild the states, see wkv7_bwd), for compiling its kernels ahead."""
    B, T, H, N = r.shape
    dev = r.device
    _compile_ahead(r, w, k, v, a, b, s0, reset, cfg, store_states, store_states if backward is None else backward)
    qt, mm, yct, dd, key = _prep(r, w, k, v, a, b, reset, cfg, value_side=True, keep_key=keep_key, want_y=want_y)
    y = _new((B, T, H, N), r.dtype, dev) if want_y else None
    sT = _new((B, H, N, N), torch.float32, dev)
    ck = _new(stored_states_shape(B, T, H, N, cfg), torch.float32, dev) if store_states else None
    _launch(*_scan_fwd_launch(r, s0, (qt, mm, yct, dd), y, sT, ck, cfg))
    if not store_states:
        return y, sT, []
    return y, sT, [ck, qt, mm, *(key or [])] if cfg.keep_prep else [ck]


def wkv7_bwd(r, w, k, v, a, b, reset, saved, dy, dsT, cfg: Wkv7Config, want_ds0: bool, s0=None):
    """Gradients given what wkv7_fwd saved, dy (B, T, H, N) contiguous in r's dtype or None and
    dsT (B, H, N, N) fp32 contiguous or None. Returns dr, dw, dk, dv, da, db (B, T, H, N) in r's
    dtype (dw in w's), contiguous, and the state's (B, H, N, N) fp32 (None unless want_ds0).
    saved = [] (the forward stored nothing): the forward runs again here from s0, the initial
    state (or None), storing the states and keeping its chunk maps and key side for this backward
    only. The key side (the chunks' pair matrices and (I - A_ab)^-1) is kept from the backward's
    own prep run for _grad_kernel, or computed there when the forward kept Q and M (keep_prep)."""
    B, T, H, N = r.shape
    dev = r.device
    if not saved:
        keep = dataclasses.replace(cfg, keep_prep=True)
        saved = wkv7_fwd(r, w, k, v, a, b, s0, reset, keep, True, keep_key=True, want_y=False)[2]
    ck, *prep = saved
    if prep:
        qt, mm, *key = prep
    else:
        qt, mm, _, _, key = _prep(r, w, k, v, a, b, reset, cfg, value_side=False, keep_key=True)
    key = key or None
    ds = _new(stored_states_shape(B, T, H, N, cfg), torch.float32, dev)
    ds0 = _new((B, H, N, N), torch.float32, dev) if want_ds0 else None
    _launch(*_scan_bwd_launch(r, dsT, qt, mm, dy, ds, ds0, cfg))
    del qt, mm
    dr, dk, dv, da, db = (_new((B, T, H, N), r.dtype, dev) for _ in range(5))
    dw = _new((B, T, H, N), w.dtype, dev)  # w may be fp32 while the others are bf16 / fp16
    grads = [dr, dw, dk, dv, da, db]
    _launch(*_grad_launch(r, w, k, v, a, b, reset, dy, ck, ds, key, grads, cfg))
    return (*grads, ds0)


# ----------------------------------------------------------------------------------------------
# Compiling ahead: the first call compiles every kernel it and its backward will launch at once
#
# Triton compiles a kernel when it is first launched, so a fresh process's first forward and
# backward paid the five kernels' compile times one after another (11.2 s on the H200's host,
# benchmarks/NOTES.md; the goal is 10 s). Compiled together on a thread pool (Triton's own
# asynchronous compilation, which inductor uses; the compiler releases the GIL for most of its
# work), the first call waits for about the slowest kernel instead.

try:
    from triton.runtime._async_compile import AsyncCompileMode, active_mode
except ImportError:  # a Triton without it compiles each kernel at its first launch, as before
    AsyncCompileMode = active_mode = None

_COMPILED_AHEAD: set[tuple] = set()


def _launches_ahead(r, w, k, v, a, b, s0, reset, cfg: Wkv7Config, store_states: bool, backward: bool) -> list[tuple]:
    """The launches a forward with these inputs makes and, with backward, those of the backward
    that usually follows (dy given, no gradient into the final state, one for the initial state
    when there is one; the forward's again, storing, when it stored nothing), with dtypes in place
    of the tensors the kernels would write."""
    f32, x = torch.float32, r.dtype
    state, stored = (f32 if s0 is not None else None), (f32 if store_states else None)
    key = (f32, f32)
    launches = [
        _prep_launch(r, w, k, v, a, b, reset, (f32, f32, f32, f32), cfg, True),
        _scan_fwd_launch(r, state, (f32, f32, f32, f32), x, f32, stored, cfg),
    ]
    if backward:
        if not store_states:  # the backward runs the forward again for the states (no y), keeping the key side
            launches.append(_prep_launch(r, w, k, v, a, b, reset, (f32, f32, None, f32), cfg, True, key))
            launches.append(_scan_fwd_launch(r, state, (f32, f32, None, f32), None, f32, f32, cfg))
        elif not cfg.keep_prep:
            launches.append(_prep_launch(r, w, k, v, a, b, reset, (f32, f32, None, None), cfg, False, key))
        grad_key = None if store_states and cfg.keep_prep else key  # keep_prep: the forward kept no key side
        launches.append(_scan_bwd_launch(r, None, f32, f32, x, f32, state, cfg))
        launches.append(_grad_launch(r, w, k, v, a, b, reset, x, f32, f32, grad_key, (x, w.dtype, x, x, x, x), cfg))
    return launches


def _compile_ahead(r, w, k, v, a, b, s0, reset, cfg: Wkv7Config, store_states: bool, backward: bool) -> None:
    """Once per process for each kind of call (config, dtypes, state, resets, backward): compile its
    kernels together, then build their launchers (a C compiler run each, at a kernel's first
    launch otherwise) and load them, also together; wait for all, so the launches find them ready.
    Anything that fails here is done again at the launch, which reports the error."""
    if _INTERPRET or not r.is_cuda or AsyncCompileMode is None or active_mode.get() is not None:
        return  # (the last: inside someone else's asynchronous compilation, e.g. inductor's)
    kind = (cfg, r.dtype, w.dtype, s0 is None, reset is None, store_states, backward, r.device)
    if kind in _COMPILED_AHEAD:
        return
    _COMPILED_AHEAD.add(kind)
    from concurrent.futures import ThreadPoolExecutor

    launches = _launches_ahead(r, w, k, v, a, b, s0, reset, cfg, store_states, backward)
    try:
        # A pool per call, its threads gone when it returns (none left for a later fork(), e.g. of
        # a DataLoader worker).
        with ThreadPoolExecutor(max_workers=min(len(launches), os.cpu_count() or 1)) as pool:
            with torch.cuda.device(r.device), AsyncCompileMode(pool, ignore_errors=True):
                compiling = [_warmup(*launch) for launch in launches]
            for loading in [pool.submit(_load, r.device, kernel) for kernel in compiling if kernel is not None]:
                loading.exception()  # waits; an error is reported again by the launch
    except Exception as exc:  # noqa: BLE001 - an optimisation: the launches compile what is missing
        warnings.warn(
            f"wkv7: compiling the kernels ahead failed ({exc!r}); they compile at their launch instead", stacklevel=2
        )


def _warmup(kernel, grid, args, meta):
    """Starts compiling one launch's kernel (under AsyncCompileMode); the pending or cached kernel."""
    try:
        return kernel.warmup(*args, grid=grid, **meta)
    except Exception:  # noqa: BLE001 - the launch compiles it again and reports the error
        return None


def _load(device, kernel) -> None:
    kernel = kernel.result(ignore_errors=True) if hasattr(kernel, "result") else kernel
    if kernel is not None:
        with torch.cuda.device(device):
            kernel._init_handles()  # the launcher and the module, as its first launch would
