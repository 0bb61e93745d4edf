"""Chunked Triton kernels for RWKV-4 WKV, parallel over batch, channel AND time.

Notation per channel: w = -exp(time_decay) < 0, u = time_first. Before token t the state holds
N_t = a_t e^{p_t} and D_t = b_t e^{p_t}; N_{t+1} = e^w N_t + e^{k_t} v_t (same for D with v = 1);
y_t = (N_t + e^{u+k_t} v_t) / Z_t with Z_t = D_t + e^{u+k_t}, z_t = log Z_t. Every update keeps the
running-max form and costs one exponential: only the smaller of the two terms is rescaled.

The sequence is cut into chunks of L tokens; one program owns BLOCK_C channels of one chunk, channel
being the contiguous dimension of every access. Each direction is one launch (single-pass scan with
decoupled look-back):
  pass 1   walk the chunk from an empty state -> the chunk's summary; publish it (flag 1);
  look-back  fold the published summaries of the chunks before it until one that already has its
           inclusive prefix (flag 2) or the sequence edge -> the state entering the chunk; publish
           this chunk's inclusive prefix (flag 2);
  pass 2   re-walk the chunk from the true incoming state and write the outputs (the chunk's inputs
           were read moments ago, so mostly from L2).
Programs take chunks in time order from an atomic ticket, so a chunk waited on always belongs to a
program already running or finished: no deadlock whatever order the hardware starts programs in.
Flags are written with release semantics after a block barrier and read with acquire semantics.

Forward (`_fwd_fused`) writes y and z (fp32): the backward needs Z_t in reverse time order and
cannot recompute it backwards stably. Backward (`_bwd_fused`, last chunk first) carries the adjoints
gN_t = dL/dN_t, gD_t and two sums J that give the decay gradient with no forward-order pass:
    gN_t = e^w gN_{t+1} + gy_t / Z_t,        gD_t = e^w gD_{t+1} - gy_t y_t / Z_t
    J_t  = e^w (J_{t+1} + gN_{t+1})          (same for the D side)
    dL/dw = sum_t e^{k_t} (v_t JN_{t+1} + JD_{t+1}) + N_0 JN_0 + D_0 JD_0 (+ the max path)
all under one running scale e^q, like the forward's running max, so nothing over- or underflows.
The gradient of the final max p_T goes to the token that set it (its index is tracked forward).
The time_decay / time_first gradients are summed over programs with atomic adds. Each direction
is one launch plus one memset: at small shapes the host's launch cost, not the GPU, sets the pace.

Resets (`reset`, packed examples): each pass empties the state before a flagged token (forward) and
drops the adjoint once past it (backward: the state the reset replaced reaches nothing). A chunk
holding a reset owes nothing to the chunks before it (after it, backward): its pass-1 summary is
already its inclusive value, so it publishes it as one (flag 2) right after pass 1, and every
look-back stops there: the combine with the earlier prefix absorbs. The chunk itself still looks
back for its tokens before its first reset, unless its first token resets. Without resets
(HAS_RESET false) the kernels compile exactly as before.

Deterministic mode (torch.use_deterministic_algorithms(True)): the rounding of a decoupled
look-back depends on timing (how many summaries a chunk folds before it meets an inclusive value),
and so does the order of the atomic adds. In this mode a chunk takes only its neighbour's
inclusive value (waiting for it: a serial chain of one merge per chunk), and each program stores
its time_decay / time_first partial sums in its own row, summed by torch in a fixed order.

The forward and backward may use different chunk lengths and blocks (`_config`): both read and re-read their
chunk from HBM (the chunks in flight exceed L2), so time is set by bytes and by how well the grid
fills the GPU; the forward's loads and stores carry L2 eviction hints. See benchmarks/NOTES.md.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from rwkv_ft.kernels.launch_options import FIXED_LAUNCH_OPTIONS

EMPTY_MAX = -1e38
_EMPTY = tl.constexpr(EMPTY_MAX)  # the same, readable inside kernels
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# The interpreter cannot run inline PTX; triton itself decides interpret mode when a kernel is
# decorated, i.e. at import of this module, so read the same switch here.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

# Test hook: when True the host code fills every buffer it allocates with NaN, so a test can prove
# that the kernels write every element they return.
POISON_OUTPUTS = False
# Test hook: the Triton interpreter runs programs one after another, so a look-back always finds
# its predecessor's inclusive prefix. When True, no inclusive prefix is published and every
# look-back folds chunk summaries all the way to the sequence edge (the path a GPU takes when the
# predecessor is still running).
LOOKBACK_SUMMARIES_ONLY = False


@triton.jit
def _decay_of(td_ptr, cs, mask):
    # w = -exp(time_decay), the log of the per-step decay factor.
    return -tl.exp(tl.load(td_ptr + cs, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _exp(x):
    # ex2.approx.ftz: one multiply and one MUFU op; tl.exp adds a denormal-range fix-up (3 more).
    if _INTERPRET:
        return tl.exp(x)
    else:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * LOG2E], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def _log(x):
    # lg2.approx.ftz: one MUFU op and one multiply; tl.log lowers to a ~25-instruction polynomial.
    if _INTERPRET:
        return tl.log(x)
    else:
        lg2 = tl.inline_asm_elementwise(
            "lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
        return lg2 * LN2


@triton.jit
def _rcp(x):
    # rcp.approx.ftz: one MUFU op; `/` lowers to a range-scaled division (~8 more instructions).
    # Only used on denominators >= 1 (running-max form), where the approximation is within 1 ulp.
    if _INTERPRET:
        return 1.0 / x
    else:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def _ldr(ptr, mask, EVEN: tl.constexpr, EV: tl.constexpr):
    # Token offsets are clamped into the chunk by the callers, so only channels need masking, and
    # not even those when BLOCK_C divides C. Loaded in the stored dtype: prefetched tokens wait in
    # registers unconverted (fewer moves).
    if EVEN:
        return tl.load(ptr, eviction_policy=EV)
    else:
        return tl.load(ptr, mask=mask, other=0.0, eviction_policy=EV)


@triton.jit
def _st(ptr, x, mask, EVEN: tl.constexpr, EV: tl.constexpr):
    if EVEN:
        tl.store(ptr, x.to(ptr.dtype.element_ty), eviction_policy=EV)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask, eviction_policy=EV)


@triton.jit
def _merge_state(ea, eb, ep, ei, la, lb, lp, li, n, w):
    """State (ea, eb, ep; ei) followed by a span of n tokens whose own summary is (la, lb, lp; li)."""
    pd = tl.maximum(ep + n * w, _EMPTY)  # keeps an empty state (-1e38) from drifting to -inf
    d = lp - pd
    e = _exp(-tl.abs(d))
    new = d > 0
    a = tl.where(new, e * ea + la, ea + e * la)
    b = tl.where(new, e * eb + lb, eb + e * lb)
    return a, b, tl.where(new, lp, pd), tl.where(new, li, ei)


@triton.jit
def _merge_adjoint(gn1, gd1, jn1, jd1, q1, n1, gn2, gd2, jn2, jd2, q2, w):
    """Adjoint summary of an earlier span (1, n1 tokens) followed by a later one (2): the later
    adjoint propagates back through span 1. gN: e^{n1 w} gN2 + gN1; J: e^{n1 w}(J2 + n1 gN2) + J1."""
    qd = tl.maximum(q2 + n1 * w, _EMPTY)
    d = qd - q1
    e = _exp(-tl.abs(d))
    keep = d >= 0
    c2 = tl.where(keep, 1.0, e)
    c1 = tl.where(keep, e, 1.0)
    jn = c2 * (jn2 + n1 * gn2) + c1 * jn1
    jd = c2 * (jd2 + n1 * gd2) + c1 * jd1
    return c2 * gn2 + c1 * gn1, c2 * gd2 + c1 * gd1, jn, jd, tl.where(keep, qd, q1)


@triton.jit
def _publish(flag_ptr, status):
    tl.debug_barrier()  # every thread's summary stores happen before the flag
    tl.atomic_xchg(flag_ptr, status, sem="release")


@triton.jit
def _reset_at(rp, i):
    # Whether a packed example starts at token i of the chunk (rp: the chunk's reset bytes).
    return tl.load(rp + i) != 0


@triton.jit
def _empty_state_at(reset, a, b, p):
    """The state entering a token that resets it: empty (numerator 0, denominator 0, max -1e38)."""
    return tl.where(reset, 0.0, a), tl.where(reset, 0.0, b), tl.where(reset, _EMPTY, p)


@triton.jit
def _drop_adjoint_at(reset, gn, gd, jn, jd, q):
    """The adjoint before a token that resets the state: empty (the state it replaced reaches nothing)."""
    zero = tl.zeros_like(gn)
    return (
        tl.where(reset, zero, gn),
        tl.where(reset, zero, gd),
        tl.where(reset, zero, jn),
        tl.where(reset, zero, jd),
        tl.where(reset, _EMPTY, q),
    )


@triton.jit
def _store_state(ptr, a, b, p, idx, mask, C):
    """A state summary (a, b, p; idx) into its 4 rows of C floats at ptr (idx as float bits)."""
    tl.store(ptr, a, mask=mask)
    tl.store(ptr + C, b, mask=mask)
    tl.store(ptr + 2 * C, p, mask=mask)
    tl.store(ptr + 3 * C, idx.to(tl.float32, bitcast=True), mask=mask)


@triton.jit
def _store_adjoint(ptr, gn, gd, jn, jd, q, mask, C):
    """An adjoint summary (gN, gD, JN, JD; scale q) into its 5 rows of C floats at ptr."""
    tl.store(ptr, gn, mask=mask)
    tl.store(ptr + C, gd, mask=mask)
    tl.store(ptr + 2 * C, jn, mask=mask)
    tl.store(ptr + 3 * C, jd, mask=mask)
    tl.store(ptr + 4 * C, q, mask=mask)


@triton.jit
def _fwd_fused(
    k_ptr,
    v_ptr,
    td_ptr,
    tf_ptr,
    s0_ptr,
    rs_ptr,
    flag_ptr,
    agg_ptr,
    incl_ptr,
    y_ptr,
    y32_ptr,
    z_ptr,
    sT_ptr,
    idxT_ptr,
    B,
    T,
    C,
    L,
    NC,
    NB,
    BLOCK_C: tl.constexpr,
    EVEN: tl.constexpr,
    HAS_STATE: tl.constexpr,
    HAS_RESET: tl.constexpr,
    STORE_Y32: tl.constexpr,
    PUBLISH_INCLUSIVE: tl.constexpr,
    FAST: tl.constexpr,
    PF1: tl.constexpr,
    PF2: tl.constexpr,
    EV1: tl.constexpr,
    EV2: tl.constexpr,
    EVS: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):
    tl.static_assert((PF1 <= 3) & (PF2 <= 3), "prefetch distance: 1 to 3 tokens")
    ticket = tl.atomic_add(flag_ptr, 1)  # flag_ptr[0] is the ticket counter
    j = ticket // (B * NB)
    rest = ticket % (B * NB)
    b = (rest // NB).to(tl.int64)
    pid_c = rest % NB
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cs < C
    w = _decay_of(td_ptr, cs, mask)
    u = tl.load(tf_ptr + cs, mask=mask, other=0.0).to(tl.float32)
    start = j * L
    n = tl.minimum(L, T - start)
    kp = k_ptr + b * T * C + start.to(tl.int64) * C + cs
    vp = v_ptr + b * T * C + start.to(tl.int64) * C + cs

    # Pass 1: this chunk's own summary, as if it started empty.
    a = tl.zeros([BLOCK_C], dtype=tl.float32)
    bb = tl.zeros([BLOCK_C], dtype=tl.float32)
    p = tl.full([BLOCK_C], _EMPTY, dtype=tl.float32)
    idx = tl.full([BLOCK_C], -1, dtype=tl.int32)
    k0 = _ldr(kp + 0, mask, EVEN, EV1)
    v0 = _ldr(vp + 0, mask, EVEN, EV1)
    k1, k2, v1, v2 = k0, k0, v0, v0
    if PF1 >= 2:
        k1 = _ldr(kp + tl.minimum(1, n - 1) * C, mask, EVEN, EV1)
        v1 = _ldr(vp + tl.minimum(1, n - 1) * C, mask, EVEN, EV1)
    if PF1 >= 3:
        k2 = _ldr(kp + tl.minimum(2, n - 1) * C, mask, EVEN, EV1)
        v2 = _ldr(vp + tl.minimum(2, n - 1) * C, mask, EVEN, EV1)
    if HAS_RESET:
        rp = rs_ptr + b * T + start  # the chunk's reset flags, one byte per token
        r0 = _reset_at(rp, 0)
        starts_fresh = r0  # the chunk's first token resets: it needs no incoming state
        resets = tl.zeros([], dtype=tl.int32)  # resets in this chunk
    for i in range(n):
        nxt = tl.minimum(i + PF1, n - 1) * C  # prefetch PF1 tokens ahead (clamped: no time mask)
        kn = _ldr(kp + nxt, mask, EVEN, EV1)
        vn = _ldr(vp + nxt, mask, EVEN, EV1)
        kt = k0.to(tl.float32)
        vt = v0.to(tl.float32)
        if HAS_RESET:  # a packed example starts at token i: it sees the empty state
            rn = _reset_at(rp, tl.minimum(i + 1, n - 1))
            a, bb, p = _empty_state_at(r0, a, bb, p)
            resets += r0.to(tl.int32)
            r0 = rn
        pw = p + w
        d = kt - pw
        e = _exp(-tl.abs(d))
        new = d > 0
        a = tl.where(new, e * a + vt, a + e * vt)
        bb = tl.where(new, e * bb + 1.0, bb + e)
        p = tl.where(new, kt, pw)
        idx = tl.where(new, start + i, idx)
        if PF1 == 1:
            k0, v0 = kn, vn
        elif PF1 == 2:
            k0, k1, v0, v1 = k1, kn, v1, vn
        else:
            k0, k1, k2, v0, v1, v2 = k1, k2, kn, v1, v2, vn
    frow = flag_ptr + 1 + (b * NB + pid_c) * NC
    o = ((b * NC + j) * 4) * C + cs
    if HAS_RESET:
        # A chunk holding a reset owes nothing to the chunks before it: its summary already is its
        # inclusive prefix, published as one at once, so later look-backs stop here (the combine
        # with an earlier prefix absorbs it).
        holds_reset = resets > 0
        _store_state(tl.where(holds_reset, incl_ptr, agg_ptr) + o, a, bb, p, idx, mask, C)
        _publish(frow + j, tl.where(holds_reset, 2, 1))
    else:
        _store_state(agg_ptr + o, a, bb, p, idx, mask, C)
        _publish(frow + j, 1)

    # Look back: fold the summaries of chunks j-1, j-2, ... until one has its inclusive prefix.
    ea = tl.zeros([BLOCK_C], dtype=tl.float32)
    eb = tl.zeros([BLOCK_C], dtype=tl.float32)
    ep = tl.full([BLOCK_C], _EMPTY, dtype=tl.float32)
    ei = tl.full([BLOCK_C], -1, dtype=tl.int32)
    span = 0  # tokens folded so far
    jj = j - 1
    need_s0 = j == 0
    done = j == 0
    if HAS_RESET:
        done = done | starts_fresh
    while not done:
        f = tl.atomic_add(frow + jj, 0, sem="acquire")
        if DETERMINISTIC:  # only the neighbour's inclusive value: one fixed rounding path
            ready = f == 2
        else:
            ready = f > 0
        if ready:
            src = tl.where(f == 2, incl_ptr, agg_ptr)
            x = ((b * NC + jj) * 4) * C + cs
            xa = tl.load(src + x, mask=mask, other=0.0, cache_modifier=".cg")
            xb = tl.load(src + x + C, mask=mask, other=0.0, cache_modifier=".cg")
            xp = tl.load(src + x + 2 * C, mask=mask, other=_EMPTY, cache_modifier=".cg")
            xi = tl.load(src + x + 3 * C, mask=mask, other=0.0, cache_modifier=".cg").to(tl.int32, bitcast=True)
            ea, eb, ep, ei = _merge_state(xa, xb, xp, xi, ea, eb, ep, ei, span, w)
            span += L
            done = (f == 2) | (jj == 0)
            need_s0 = (f == 1) & (jj == 0)
            jj -= 1
    if need_s0:
        if HAS_STATE:
            s = b * 3 * C + cs
            sa = tl.load(s0_ptr + s, mask=mask, other=0.0)
            sb = tl.load(s0_ptr + s + C, mask=mask, other=0.0)
            sp = tl.load(s0_ptr + s + 2 * C, mask=mask, other=_EMPTY)
            ea, eb, ep, ei = _merge_state(sa, sb, sp, tl.full([BLOCK_C], -1, tl.int32), ea, eb, ep, ei, span, w)
    ia, ib, ip, ii = _merge_state(ea, eb, ep, ei, a, bb, p, idx, n, w)
    if HAS_RESET:
        ia = tl.where(holds_reset, a, ia)
        ib = tl.where(holds_reset, bb, ib)
        ip = tl.where(holds_reset, p, ip)
        ii = tl.where(holds_reset, idx, ii)
        if resets == 0:  # (a chunk holding a reset published its inclusive prefix after pass 1)
            _store_state(incl_ptr + o, ia, ib, ip, ii, mask, C)
            if PUBLISH_INCLUSIVE:
                _publish(frow + j, 2)
    else:
        _store_state(incl_ptr + o, ia, ib, ip, ii, mask, C)
        if PUBLISH_INCLUSIVE:  # (False only in tests: forces look-back over chunk summaries alone)
            _publish(frow + j, 2)
    if j == NC - 1:
        s = b * 3 * C + cs
        tl.store(sT_ptr + s, ia, mask=mask)
        tl.store(sT_ptr + s + C, ib, mask=mask)
        tl.store(sT_ptr + s + 2 * C, ip, mask=mask)
        tl.store(idxT_ptr + b * C + cs, ii, mask=mask)

    # Pass 2: re-walk the chunk from its incoming state, writing y and z.
    a, bb, p = ea, eb, ep
    yp = y_ptr + b * T * C + start.to(tl.int64) * C + cs
    y32p = y32_ptr + b * T * C + start.to(tl.int64) * C + cs
    zp = z_ptr + b * T * C + start.to(tl.int64) * C + cs
    k0 = _ldr(kp + 0, mask, EVEN, EV2)
    v0 = _ldr(vp + 0, mask, EVEN, EV2)
    k1, k2, v1, v2 = k0, k0, v0, v0
    if PF2 >= 2:
        k1 = _ldr(kp + tl.minimum(1, n - 1) * C, mask, EVEN, EV2)
        v1 = _ldr(vp + tl.minimum(1, n - 1) * C, mask, EVEN, EV2)
    if PF2 >= 3:
        k2 = _ldr(kp + tl.minimum(2, n - 1) * C, mask, EVEN, EV2)
        v2 = _ldr(vp + tl.minimum(2, n - 1) * C, mask, EVEN, EV2)
    if HAS_RESET:
        r0 = _reset_at(rp, 0)
    for i in range(n):
        nxt = tl.minimum(i + PF2, n - 1) * C
        kn = _ldr(kp + nxt, mask, EVEN, EV2)
        vn = _ldr(vp + nxt, mask, EVEN, EV2)
        kt = k0.to(tl.float32)
        vt = v0.to(tl.float32)
        if HAS_RESET:  # as in pass 1
            rn = _reset_at(rp, tl.minimum(i + 1, n - 1))
            a, bb, p = _empty_state_at(r0, a, bb, p)
            r0 = rn
        # Output: history vs the current token with its bonus; one exponential, one log.
        uk = u + kt
        d = uk - p
        e = _exp(-tl.abs(d))
        cur = d > 0
        num = tl.where(cur, vt + e * a, e * vt + a)
        den = tl.where(cur, 1.0 + e * bb, e + bb)
        yt = num * _rcp(den) if FAST else num / den
        _st(yp + i * C, yt, mask, EVEN, EVS)
        if STORE_Y32:  # half-precision inputs: the backward reads the fp32 output, not the rounded one
            _st(y32p + i * C, yt, mask, EVEN, EVS)
        _st(zp + i * C, tl.where(cur, uk, p) + _log(den), mask, EVEN, EVS)
        # State update, as in pass 1.
        pw = p + w
        d = kt - pw
        e = _exp(-tl.abs(d))
        new = d > 0
        a = tl.where(new, e * a + vt, a + e * vt)
        bb = tl.where(new, e * bb + 1.0, bb + e)
        p = tl.where(new, kt, pw)
        if PF2 == 1:
            k0, v0 = kn, vn
        elif PF2 == 2:
            k0, k1, v0, v1 = k1, kn, v1, vn
        else:
            k0, k1, k2, v0, v1, v2 = k1, k2, kn, v1, v2, vn


@triton.jit
def _bwd_fused(
    k_ptr,
    v_ptr,
    y_ptr,
    z_ptr,
    gy_ptr,
    td_ptr,
    tf_ptr,
    s0_ptr,
    rs_ptr,
    sT_ptr,
    idxT_ptr,
    gT_ptr,
    flag_ptr,
    agg_ptr,
    incl_ptr,
    gk_ptr,
    gv_ptr,
    gs0_ptr,
    gtdf_ptr,
    B,
    T,
    C,
    L,
    NC,
    NB,
    BLOCK_C: tl.constexpr,
    EVEN: tl.constexpr,
    HAS_STATE: tl.constexpr,
    HAS_RESET: tl.constexpr,
    HAS_GST: tl.constexpr,
    PUBLISH_INCLUSIVE: tl.constexpr,
    FAST: tl.constexpr,
    PF1: tl.constexpr,
    PF2: tl.constexpr,
    EV1: tl.constexpr,
    EV2: tl.constexpr,
    EVS: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):
    tl.static_assert((PF1 <= 3) & (PF2 <= 3), "prefetch distance: 1 to 3 tokens")
    ticket = tl.atomic_add(flag_ptr, 1)
    j = NC - 1 - ticket // (B * NB)  # last chunk first: the adjoint flows backwards in time
    rest = ticket % (B * NB)
    b = (rest // NB).to(tl.int64)
    pid_c = rest % NB
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cs < C
    w = _decay_of(td_ptr, cs, mask)
    u = tl.load(tf_ptr + cs, mask=mask, other=0.0).to(tl.float32)
    start = j * L
    n = tl.minimum(L, T - start)
    off = b * T * C + start.to(tl.int64) * C + cs
    gyp, yp, zp, kp, vp = gy_ptr + off, y_ptr + off, z_ptr + off, k_ptr + off, v_ptr + off
    last = (n - 1) * C

    # Pass 1: this chunk's adjoint at its start, from a zero adjoint at its end.
    gn = tl.zeros([BLOCK_C], dtype=tl.float32)
    gd = tl.zeros([BLOCK_C], dtype=tl.float32)
    jn = tl.zeros([BLOCK_C], dtype=tl.float32)
    jd = tl.zeros([BLOCK_C], dtype=tl.float32)
    q = tl.full([BLOCK_C], _EMPTY, dtype=tl.float32)
    gy0 = _ldr(gyp + last, mask, EVEN, EV1)
    y0 = _ldr(yp + last, mask, EVEN, EV1)
    z0 = _ldr(zp + last, mask, EVEN, EV1)
    gy1, gy2, y1, y2, z1, z2 = gy0, gy0, y0, y0, z0, z0
    if PF1 >= 2:
        gy1 = _ldr(gyp + tl.maximum(n - 1 - 1, 0) * C, mask, EVEN, EV1)
        y1 = _ldr(yp + tl.maximum(n - 1 - 1, 0) * C, mask, EVEN, EV1)
        z1 = _ldr(zp + tl.maximum(n - 1 - 1, 0) * C, mask, EVEN, EV1)
    if PF1 >= 3:
        gy2 = _ldr(gyp + tl.maximum(n - 1 - 2, 0) * C, mask, EVEN, EV1)
        y2 = _ldr(yp + tl.maximum(n - 1 - 2, 0) * C, mask, EVEN, EV1)
        z2 = _ldr(zp + tl.maximum(n - 1 - 2, 0) * C, mask, EVEN, EV1)
    if HAS_RESET:
        rp = rs_ptr + b * T + start  # the chunk's reset flags, one byte per token
        r0 = _reset_at(rp, n - 1)
        resets = tl.zeros([], dtype=tl.int32)  # resets in this chunk
    for r in range(n):
        prev = tl.maximum(n - 1 - PF1 - r, 0) * C  # prefetch PF1 tokens back (clamped)
        if HAS_RESET:
            rn = _reset_at(rp, tl.maximum(n - 2 - r, 0))
        gyn = _ldr(gyp + prev, mask, EVEN, EV1)
        yn = _ldr(yp + prev, mask, EVEN, EV1)
        zn = _ldr(zp + prev, mask, EVEN, EV1)
        gyt = gy0.to(tl.float32)
        yt = y0.to(tl.float32)
        zt = z0.to(tl.float32)
        qw = q + w
        d = qw + zt
        e = _exp(-tl.abs(d))
        keep = d >= 0
        c_old = tl.where(keep, 1.0, e)
        c_new = tl.where(keep, e, 1.0)
        jn = c_old * (jn + gn)
        jd = c_old * (jd + gd)
        gn = c_old * gn + c_new * gyt
        gd = c_old * gd - c_new * gyt * yt
        q = tl.where(keep, qw, -zt)
        if HAS_RESET:  # token i starts a packed example: the state before it reaches nothing
            gn, gd, jn, jd, q = _drop_adjoint_at(r0, gn, gd, jn, jd, q)
            resets += r0.to(tl.int32)
            r0 = rn
        if PF1 == 1:
            gy0, y0, z0 = gyn, yn, zn
        elif PF1 == 2:
            gy0, gy1, y0, y1, z0, z1 = gy1, gyn, y1, yn, z1, zn
        else:
            gy0, gy1, gy2, y0, y1, y2, z0, z1, z2 = gy1, gy2, gyn, y1, y2, yn, z1, z2, zn
    frow = flag_ptr + 1 + (b * NB + pid_c) * NC
    o = ((b * NC + j) * 5) * C + cs
    if HAS_RESET:  # as in the forward: a chunk holding a reset publishes its inclusive value at once
        holds_reset = resets > 0
        _store_adjoint(tl.where(holds_reset, incl_ptr, agg_ptr) + o, gn, gd, jn, jd, q, mask, C)
        _publish(frow + j, tl.where(holds_reset, 2, 1))
    else:
        _store_adjoint(agg_ptr + o, gn, gd, jn, jd, q, mask, C)
        _publish(frow + j, 1)

    # The final state's adjoint: gN_T = ga e^{-p_T}, gD_T = gb e^{-p_T}; what is left of gp after
    # a_T = N e^{-p_T}, b_T = D e^{-p_T} follows the max to the token that set it (gpT).
    s = b * 3 * C + cs
    aT = tl.load(sT_ptr + s, mask=mask, other=0.0)
    bT = tl.load(sT_ptr + s + C, mask=mask, other=0.0)
    qT = -tl.load(sT_ptr + s + 2 * C, mask=mask, other=0.0)
    if HAS_GST:
        tgn = tl.load(gT_ptr + s, mask=mask, other=0.0)
        tgd = tl.load(gT_ptr + s + C, mask=mask, other=0.0)
        gpT = tl.load(gT_ptr + s + 2 * C, mask=mask, other=0.0) - tgn * aT - tgd * bT
    else:
        tgn = tl.zeros([BLOCK_C], dtype=tl.float32)
        tgd = tl.zeros([BLOCK_C], dtype=tl.float32)
        gpT = tl.zeros([BLOCK_C], dtype=tl.float32)
    zero = tl.zeros([BLOCK_C], dtype=tl.float32)

    # Look forward in time: fold the summaries of chunks j+1, j+2, ... (the adjoint entering this
    # chunk from its end) until one has its inclusive value, or the end of the sequence.
    egn = tl.zeros([BLOCK_C], dtype=tl.float32)
    egd = tl.zeros([BLOCK_C], dtype=tl.float32)
    ejn = tl.zeros([BLOCK_C], dtype=tl.float32)
    ejd = tl.zeros([BLOCK_C], dtype=tl.float32)
    eq = tl.full([BLOCK_C], _EMPTY, dtype=tl.float32)
    span = 0
    jj = j + 1
    need_end = j == NC - 1
    done = j == NC - 1
    while not done:
        f = tl.atomic_add(frow + jj, 0, sem="acquire")
        if DETERMINISTIC:  # only the neighbour's inclusive value: one fixed rounding path
            ready = f == 2
        else:
            ready = f > 0
        if ready:
            src = tl.where(f == 2, incl_ptr, agg_ptr)
            x = ((b * NC + jj) * 5) * C + cs
            xgn = tl.load(src + x, mask=mask, other=0.0, cache_modifier=".cg")
            xgd = tl.load(src + x + C, mask=mask, other=0.0, cache_modifier=".cg")
            xjn = tl.load(src + x + 2 * C, mask=mask, other=0.0, cache_modifier=".cg")
            xjd = tl.load(src + x + 3 * C, mask=mask, other=0.0, cache_modifier=".cg")
            xq = tl.load(src + x + 4 * C, mask=mask, other=_EMPTY, cache_modifier=".cg")
            egn, egd, ejn, ejd, eq = _merge_adjoint(egn, egd, ejn, ejd, eq, span, xgn, xgd, xjn, xjd, xq, w)
            span += tl.minimum(L, T - jj * L)
            done = (f == 2) | (jj == NC - 1)
            need_end = (f == 1) & (jj == NC - 1)
            jj += 1
    if need_end:
        egn, egd, ejn, ejd, eq = _merge_adjoint(egn, egd, ejn, ejd, eq, span, tgn, tgd, zero, zero, qT, w)
    ign, igd, ijn, ijd, iq = _merge_adjoint(gn, gd, jn, jd, q, n, egn, egd, ejn, ejd, eq, w)
    if HAS_RESET:
        ign = tl.where(holds_reset, gn, ign)
        igd = tl.where(holds_reset, gd, igd)
        ijn = tl.where(holds_reset, jn, ijn)
        ijd = tl.where(holds_reset, jd, ijd)
        iq = tl.where(holds_reset, q, iq)
        if resets == 0:  # (a chunk holding a reset published its inclusive value after pass 1)
            _store_adjoint(incl_ptr + o, ign, igd, ijn, ijd, iq, mask, C)
            if PUBLISH_INCLUSIVE:
                _publish(frow + j, 2)
    else:
        _store_adjoint(incl_ptr + o, ign, igd, ijn, ijd, iq, mask, C)
        if PUBLISH_INCLUSIVE:  # (False only in tests: forces look-back over chunk summaries alone)
            _publish(frow + j, 2)

    gw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)  # d/dw summed over this program's share
    gu_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    idx_t = tl.load(idxT_ptr + b * C + cs, mask=mask, other=0)
    if j == 0:
        # The max path: p_T = k_i + (T-1-i) w for the token i that set it, or p_0 + T w (i = -1).
        from_state = idx_t < 0
        gw_acc += gpT * tl.where(from_state, T, T - 1 - idx_t).to(tl.float32)
        if HAS_STATE:
            a0 = tl.load(s0_ptr + s, mask=mask, other=0.0)
            b0 = tl.load(s0_ptr + s + C, mask=mask, other=0.0)
            p0 = tl.load(s0_ptr + s + 2 * C, mask=mask, other=_EMPTY)
            # gN_0 e^{p0} etc.; for an empty state (p0 = -1e38) the factor is exactly 0.
            sc = tl.exp(tl.minimum(iq + p0, 88.0))
            tl.store(gs0_ptr + s, ign * sc, mask=mask)
            tl.store(gs0_ptr + s + C, igd * sc, mask=mask)
            gp0 = (ign * a0 + igd * b0) * sc + tl.where(from_state, gpT, 0.0)
            tl.store(gs0_ptr + s + 2 * C, gp0, mask=mask)
            gw_acc += (ijn * a0 + ijd * b0) * sc

    # Pass 2: re-walk the chunk backwards from the adjoint entering it, writing gk and gv.
    gn, gd, jn, jd, q = egn, egd, ejn, ejd, eq
    gkp, gvp = gk_ptr + off, gv_ptr + off
    gy0 = _ldr(gyp + last, mask, EVEN, EV2)
    y0 = _ldr(yp + last, mask, EVEN, EV2)
    z0 = _ldr(zp + last, mask, EVEN, EV2)
    k0 = _ldr(kp + last, mask, EVEN, EV2)
    v0 = _ldr(vp + last, mask, EVEN, EV2)
    gy1, gy2, y1, y2, z1, z2, k1, k2, v1, v2 = gy0, gy0, y0, y0, z0, z0, k0, k0, v0, v0
    if PF2 >= 2:
        gy1 = _ldr(gyp + tl.maximum(n - 1 - 1, 0) * C, mask, EVEN, EV2)
        y1 = _ldr(yp + tl.maximum(n - 1 - 1, 0) * C, mask, EVEN, EV2)
        z1 = _ldr(zp + tl.maximum(n - 1 - 1, 0) * C, mask, EVEN, EV2)
        k1 = _ldr(kp + tl.maximum(n - 1 - 1, 0) * C, mask, EVEN, EV2)
        v1 = _ldr(vp + tl.maximum(n - 1 - 1, 0) * C, mask, EVEN, EV2)
    if PF2 >= 3:
        gy2 = _ldr(gyp + tl.maximum(n - 1 - 2, 0) * C, mask, EVEN, EV2)
        y2 = _ldr(yp + tl.maximum(n - 1 - 2, 0) * C, mask, EVEN, EV2)
        z2 = _ldr(zp + tl.maximum(n - 1 - 2, 0) * C, mask, EVEN, EV2)
        k2 = _ldr(kp + tl.maximum(n - 1 - 2, 0) * C, mask, EVEN, EV2)
        v2 = _ldr(vp + tl.maximum(n - 1 - 2, 0) * C, mask, EVEN, EV2)
    if HAS_RESET:
        r0 = _reset_at(rp, n - 1)
    for r in range(n):
        i = n - 1 - r
        prev = tl.maximum(i - PF2, 0) * C
        if HAS_RESET:
            rn = _reset_at(rp, tl.maximum(i - 1, 0))
        gyn = _ldr(gyp + prev, mask, EVEN, EV2)
        yn = _ldr(yp + prev, mask, EVEN, EV2)
        zn = _ldr(zp + prev, mask, EVEN, EV2)
        kn = _ldr(kp + prev, mask, EVEN, EV2)
        vn = _ldr(vp + prev, mask, EVEN, EV2)
        gyt = gy0.to(tl.float32)
        yt = y0.to(tl.float32)
        zt = z0.to(tl.float32)
        kt = k0.to(tl.float32)
        vt = v0.to(tl.float32)
        # Token i's gradients from the adjoint after it (scale e^q; k + q <= 0 so x <= 1).
        x = _exp(kt + q)
        gyl = gyt * _exp(u + kt - zt)  # gy times the current token's weight in y_i
        vy = vt - yt
        gv = x * gn + gyl
        gk = x * (vt * gn + gd) + gyl * vy
        if HAS_GST or not FAST:  # the max path: gpT is 0 without a final-state gradient
            gk += tl.where(idx_t == start + i, gpT, 0.0)
        gw_acc += x * (vt * jn + jd)
        gu_acc += gyl * vy
        _st(gkp + i * C, gk, mask, EVEN, EVS)
        _st(gvp + i * C, gv, mask, EVEN, EVS)
        qw = q + w
        d = qw + zt
        e = _exp(-tl.abs(d))
        keep = d >= 0
        c_old = tl.where(keep, 1.0, e)
        c_new = tl.where(keep, e, 1.0)
        jn = c_old * (jn + gn)
        jd = c_old * (jd + gd)
        gn = c_old * gn + c_new * gyt
        gd = c_old * gd - c_new * gyt * yt
        q = tl.where(keep, qw, -zt)
        if HAS_RESET:  # as in pass 1
            gn, gd, jn, jd, q = _drop_adjoint_at(r0, gn, gd, jn, jd, q)
            r0 = rn
        if PF2 == 1:
            gy0, y0, z0, k0, v0 = gyn, yn, zn, kn, vn
        elif PF2 == 2:
            gy0, gy1, y0, y1, z0, z1, k0, k1, v0, v1 = gy1, gyn, y1, yn, z1, zn, k1, kn, v1, vn
        else:
            gy0, gy1, gy2, y0, y1, y2, z0, z1, z2 = gy1, gy2, gyn, y1, y2, yn, z1, z2, zn
            k0, k1, k2, v0, v1, v2 = k1, k2, kn, v1, v2, vn
    # One atomic add per channel and program (order-dependent rounding, ~1e-7 relative): a
    # separate deterministic reduction costs a launch, which at small shapes is host-bound.
    if DETERMINISTIC:  # this program's own row of the (B * NC, 2, C) partial sums
        row = gtdf_ptr + (b * NC + j) * 2 * C
        tl.store(row + cs, gw_acc * w, mask=mask)  # dw/d(time_decay) = w
        tl.store(row + C + cs, gu_acc, mask=mask)
    else:
        tl.atomic_add(gtdf_ptr + cs, gw_acc * w, mask=mask)  # dw/d(time_decay) = w
        tl.atomic_add(gtdf_ptr + C + cs, gu_acc, mask=mask)


def wkv4_fwd(td, tf, k, v, s0, reset=None):
    """td, tf: (C,); k, v: (B, T, C) contiguous; s0: (B, 3, C) fp32 contiguous or None; reset: (B, T)
    uint8 contiguous (nonzero: the state is emptied before that token) or None.
    Returns y, then what the backward needs: z (B, T, C) fp32, the final state (B, 3, C), the index
    of the token that set the final max (B, C) int32, and the backward's config."""
    B, T, C = k.shape
    (block_c, L, nw), bwd_config = _config(B, T, C)
    NC = triton.cdiv(T, L)
    nb = triton.cdiv(C, block_c)
    dev = k.device
    flags = torch.zeros(1 + B * nb * NC, dtype=torch.int32, device=dev)  # [0]: ticket counter
    agg = torch.empty((B, NC, 4, C), dtype=torch.float32, device=dev)  # read only behind flags
    incl = torch.empty((B, NC, 4, C), dtype=torch.float32, device=dev)
    sT = _new((B, 3, C), torch.float32, dev)
    idxT = _new((B, C), torch.int32, dev)
    y = _new((B, T, C), k.dtype, dev)
    store_y32 = FP32_Y_FOR_BACKWARD and k.dtype != torch.float32
    y32 = _new((B, T, C), torch.float32, dev) if store_y32 else y
    z = _new((B, T, C), torch.float32, dev)
    det = torch.are_deterministic_algorithms_enabled()
    _fwd_fused[(NC * B * nb,)](
        k, v, td, tf, s0, reset, flags, agg, incl, y, y32, z, sT, idxT, B, T, C, L, NC, nb,
        BLOCK_C=block_c, EVEN=C % block_c == 0, HAS_STATE=s0 is not None, HAS_RESET=reset is not None,
        STORE_Y32=store_y32, PUBLISH_INCLUSIVE=det or not LOOKBACK_SUMMARIES_ONLY, FAST=_FAST,
        PF1=_PF["fwd"][0], PF2=_PF["fwd"][1], **_evict("fwd"), DETERMINISTIC=det, num_warps=nw, **FIXED_LAUNCH_OPTIONS,
    )  # fmt: skip
    return y, y32, z, sT, idxT, bwd_config


def wkv4_bwd(td, tf, k, v, y, z, s0, reset, sT, idxT, gy, gsT, cfg):
    """Gradients given gy (B, T, C) and gsT (B, 3, C) fp32 or None, all contiguous (reset as for the
    forward): a (2, C) fp32 tensor (time_decay, time_first), gk, gv, and the state's (B, 3, C) fp32
    or None."""
    B, T, C = k.shape
    block_c, L, nw = cfg
    NC = triton.cdiv(T, L)
    nb = triton.cdiv(C, block_c)
    dev = k.device
    det = torch.are_deterministic_algorithms_enabled()
    nflags = 1 + B * nb * NC
    if det:
        # Deterministic: every program stores its (time_decay, time_first) partial sums in its own
        # row; one torch.sum in a fixed order replaces the atomics.
        flags = torch.zeros(nflags, dtype=torch.int32, device=dev)
        gtdf = _new((B * NC, 2, C), torch.float32, dev)
    else:
        # One zeroed buffer: the ticket counter and chunk flags, then the (2, C) fp32 accumulators
        # of the time_decay / time_first gradients (all-zero bits are 0.0).
        zeroed = torch.zeros(nflags + 2 * C, dtype=torch.int32, device=dev)
        flags, gtdf = zeroed[:nflags], zeroed[nflags:].view(torch.float32).view(2, C)
    agg = torch.empty((B, NC, 5, C), dtype=torch.float32, device=dev)
    incl = torch.empty((B, NC, 5, C), dtype=torch.float32, device=dev)
    gk = _new((B, T, C), k.dtype, dev)
    gv = _new((B, T, C), v.dtype, dev)
    gs0 = _new((B, 3, C), torch.float32, dev) if s0 is not None else None
    _bwd_fused[(NC * B * nb,)](
        k, v, y, z, gy, td, tf, s0, reset, sT, idxT, gsT, flags, agg, incl, gk, gv, gs0, gtdf,
        B, T, C, L, NC, nb, BLOCK_C=block_c, EVEN=C % block_c == 0, HAS_STATE=s0 is not None,
        HAS_RESET=reset is not None, HAS_GST=gsT is not None,
        PUBLISH_INCLUSIVE=det or not LOOKBACK_SUMMARIES_ONLY, FAST=_FAST, PF1=_PF["bwd"][0],
        PF2=_PF["bwd"][1], **_evict("bwd"), DETERMINISTIC=det, num_warps=nw, **FIXED_LAUNCH_OPTIONS,
    )  # fmt: skip
    if det:
        gtdf = gtdf.sum(0)
    return gtdf, gk, gv, gs0


def _evict(direction: str) -> dict[str, str]:
    """L2 eviction hints: pass 1 reads stay (pass 2 re-reads them), pass 2 reads and the outputs go.
    Measured (NOTES.md, version 5): -2..-5% for the forward, +1.6% for the backward at 8,4096,4096."""
    if not _EVICT[direction]:
        return {"EV1": "", "EV2": "", "EVS": ""}
    return {"EV1": "evict_last", "EV2": "evict_first", "EVS": "evict_first"}


def _config(B: int, T: int, C: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(BLOCK_C, chunk length, num_warps) of the forward, and of the backward."""
    if _CFG_OVERRIDE is not None:
        block_c, L, nw = _CFG_OVERRIDE
        return (block_c, L, nw), (block_c, L if _BWD_L is None else _BWD_L, nw)
    block_c, L, nw = _default_config(C)
    fwd = bwd = (block_c, L, nw)
    default_fills = _fills(B, T, C, block_c, L, nw)
    if _L_OVERRIDE is not None:
        fwd = bwd = (block_c, _L_OVERRIDE, nw)
    elif block_c == 512 and default_fills < 1:
        fwd, bwd = _small_grid_configs(B, T, C, default_fills)
    elif _short_forward_chunks(B, T, C, block_c, nw):
        fwd = (block_c, 32, nw)
    if _BWD_L is not None:
        bwd = (bwd[0], _BWD_L, bwd[2])
    return fwd, bwd


def _fills(B: int, T: int, C: int, block_c: int, L: int, nw: int) -> float:
    """How many times a grid of (BLOCK_C, L) programs of nw warps fills the GPU's resident slots
    (~20 resident warps per SM: registers, ~88 per thread in the forward)."""
    return B * triton.cdiv(C, block_c) * triton.cdiv(T, L) / (_sm_count() * (20 // nw))


def _small_grid_configs(
    B: int, T: int, C: int, default_fills: float
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Where the default grid (512 channels x 64 tokens per program) fills the GPU less than once, as
    in the training steps' layers (RWKV-4 7.6B at batch 1: 1 x 1024 x 4096; 1.6B at batch 4), more,
    smaller programs: the forward takes 256 channels x 16 tokens; the backward, where the default
    grid fills less than 0.6 times, 32 tokens and 256 channels, or 128 where 256 leave fewer than
    6 programs per SM. Measured on H100 (NOTES.md, "Nineteenth session", 2026-12-06): forward
    -22% / -13% / -13%, backward -40% / -18% at 1x1024x4096 / 4x1024x2048 / 8x1024x2048.
    default_fills: `_fills` of the default grid."""
    fwd = (256, 16, 4)
    if default_fills >= 0.6:
        return fwd, (512, 64, 4)
    enough = B * triton.cdiv(C, 256) * triton.cdiv(T, 32) >= 6 * _sm_count()
    return fwd, (256 if enough else 128, 32, 4)


def _short_forward_chunks(B: int, T: int, C: int, block_c: int, nw: int) -> bool:
    """Forward only, for the grids `_small_grid_configs` does not take (C not a multiple of 512, or
    the default grid filling the GPU at least once): 32-token chunks when the 64-token grid is
    small, i.e. fills the GPU less than 0.7 times, or less than twice while the 32-token grid fills
    it at least twice (measured on H100: -8% / -14% forward time at 4,4096,2048 / 16,1024,768; +4%
    at 8,1024,2048 (0.78 -> 1.55 fills), no change at 8,4096,4096). The backward keeps 64 there:
    shorter chunks cost it more than they give."""
    fills64 = _fills(B, T, C, block_c, 64, nw)
    return fills64 < 0.7 or (fills64 < 2 and _fills(B, T, C, block_c, 32, nw) >= 2)


@functools.cache
def _sm_count() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132


def _default_config(C: int) -> tuple[int, int, int]:
    # Measured on H100 (benchmarks/NOTES.md): the chunk length and block shape move the time by
    # <10%; 4 channels per thread (8-byte bf16 accesses) and 64-token chunks were best.
    if C >= 512 and C % 512 == 0:
        return 512, 64, 4
    if C >= 256:
        return 256, 64, 2
    return (128, 64, 4) if C > 64 else (64, 64, 2)


_CFG_OVERRIDE: tuple[int, int, int] | None = None  # benchmark hook: force (BLOCK_C, L, num_warps)
_L_OVERRIDE: int | None = None  # benchmark hook: force the chunk length only
_BWD_L: int | None = None  # benchmark hook: the backward's own chunk length
# Prefetch distance (tokens) of pass 1 and pass 2 of each direction; benchmark hook.
_PF: dict[str, tuple[int, int]] = {"fwd": (1, 1), "bwd": (1, 1)}
_EVICT = {"fwd": True, "bwd": False}  # benchmark hook: L2 eviction hints per direction
_FAST = True  # benchmark hook: False restores version 4's division and in-loop max-path term
# With bf16/fp16 inputs the forward also writes y in fp32 for the backward (+4 B written, +2 B read
# per element): the backward's gD = -gy * y / Z with the rounded y put the time_decay/time_first
# gradients at bf16 error (1.9e-3 relative on an H200) where fp32 arithmetic gives 6e-7.
# Benchmark hook: False reads the rounded y again.
FP32_Y_FOR_BACKWARD = True


def _new(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        fill = float("nan") if dtype.is_floating_point else -7
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
