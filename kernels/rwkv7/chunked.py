"""Plain-PyTorch RWKV-7 WKV in chunks of 16 tokens: the path used where the Triton kernel does not run
(CPU, Apple MPS, head sizes or dtypes the kernel does not take). Same contract and results as the
per-token reference (`reference.py`, the oracle the tests hold both to), at a fraction of its cost:
the sequence is walked 16 tokens per step instead of one, with batched matmuls in between, and
autograd keeps per-chunk tensors instead of the (N, N) state of every token.

Per head, S is (N, N) in BlinkDL's [value, key] layout, S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t)
b_t^T + v_t k_t^T, y_t = S_t r_t. Over one chunk entering with state S_0 the recurrence is affine in
S_0 (the Triton kernel's docstring, `triton_wkv7.py`, derives it at length):

    Y = Q S_0^T + Yc,      S_end = S_0 M + D      (Q, Yc: (L, N); M, D: (N, N))

With G_t = w_0 + ... + w_t, Gx_t = G_{t-1}, and u_t = S_{t-1} a_t stacked in U (L, N):
    A_ab[t, s] = sum_i a_ti b_si exp(Gx_ti - G_si)  (s < t),   A_ak: k for b
    A_rb[t, s] = sum_i r_ti b_si exp(G_ti - G_si)   (s <= t),  A_rk: k for b
    U  = (I - A_ab)^-1 (As S_0^T + A_ak V),   As = a exp(Gx),  Rs = r exp(G)
    Q  = Rs + A_rb Wa,   Yc = A_rb Ua + A_rk V   (Wa = (I - A_ab)^-1 As, Ua = (I - A_ab)^-1 A_ak V)
    M  = diag(exp(G_end)) + Wa^T Bs,   D = Ua^T Bs + V^T Ks,   Bs = b exp(G_end - G), Ks likewise.
Every chunk's Q, Yc, M, D come at once (batched over chunks, matmuls only: (I - A_ab)^-1 is a product
of four factors, as in the kernel); only `S <- S M + D` walks the chunks.

The pair matrices need exp(G_t - G_s) as a product of a row and a column factor. One reference per
chunk would overflow for fast decays, so they are built in two levels, as in the kernel: the 8-token
diagonal blocks against G at each block's 4th token (factors within exp(+-4 |w|)), and the second
block's rows against the first block's columns against G at token 7 (both factors <= 1). w is
clamped at W_MIN (fp32: exp(-16) = 1.1e-7 per step, numerically zero) so that no factor overflows.
G is summed in fp64 where the device has it: exponents are differences of prefix sums, and after a
few fast-decaying steps |G| is large enough for fp32 rounding to show in exp(G_t - G_s).

Resets (packed examples): seg_t counts the resets at or before t in the chunk; pairs interact only
within a segment, S_0 reaches the tokens of segment 0 and the chunk end only when the chunk holds
no reset, and the chunk end gathers the tokens of the last segment.
"""

from __future__ import annotations

import torch

CHUNK = 16
_HALF = CHUNK // 2
# w is clamped here: every row / column factor stays within exp(4 * |W_MIN|), inside the dtype's range.
W_MIN = {torch.float32: -16.0, torch.float64: -170.0}


def wkv7_chunked(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 in chunks of 16 tokens. Same contract as `rwkv_ft.kernels.wkv7` (see its docstring).

    r, w, k, v, a, b: (B, T, H, N); state: (B, H, N, N) or None; reset: (B, T) bool or None.
    Returns y (B, T, H, N) in r's dtype and the state after the last token, (B, H, N, N) in fp32
    (fp64 for fp64 inputs). Arithmetic is fp32 (fp64 for fp64 inputs); differentiable through
    autograd with respect to all inputs and the state.
    """
    compute = torch.float64 if r.dtype == torch.float64 else torch.float32
    B, T, H, N = r.shape
    in_dtype = r.dtype
    nc = -(-T // CHUNK)
    r, w, k, v, a, b = (_chunks(x.to(compute), nc) for x in (r, w, k, v, a, b))  # (B, H, nc, L, N)
    w = w.clamp(min=W_MIN[compute])  # padded tokens have w = 0: the state passes them unchanged
    seg = None if reset is None else _segments(reset, nc)  # (B, 1, nc, L)
    Q, Yc, M, D = _chunk_maps(r, w, k, v, a, b, seg)
    S = r.new_zeros(B, H, N, N) if state is None else state.to(compute)
    entering = []
    # The only sequential part: one (N, N) product per chunk. unbind, not M[:, :, c]: the backward
    # of nc separate selects would fill nc full-size zero tensors.
    for M_c, D_c in zip(M.unbind(2), D.unbind(2)):
        entering.append(S)
        S = S @ M_c + D_c
    S_in = torch.stack(entering, dim=2)  # (B, H, nc, N, N): the state entering each chunk
    y = Q @ S_in.transpose(-1, -2) + Yc  # (B, H, nc, L, N)
    y = y.reshape(B, H, nc * CHUNK, N)[:, :, :T].transpose(1, 2)  # (B, T, H, N)
    return y.to(in_dtype), S


def _chunks(x: torch.Tensor, nc: int) -> torch.Tensor:
    """(B, T, H, N) -> (B, H, nc, L, N), zero-padded past T."""
    B, T, H, N = x.shape
    x = torch.nn.functional.pad(x.transpose(1, 2), (0, 0, 0, nc * CHUNK - T))
    return x.reshape(B, H, nc, CHUNK, N)


def _segments(reset: torch.Tensor, nc: int) -> torch.Tensor:
    """(B, T) bool -> (B, 1, nc, L) int: resets at or before each token within its chunk."""
    B, T = reset.shape
    flags = torch.nn.functional.pad(reset.to(torch.int32), (0, nc * CHUNK - T))
    return flags.reshape(B, 1, nc, CHUNK).cumsum(-1)


def _prefix_sums(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G (through token t) and Gx (through t - 1) within each chunk, summed in fp64 where the device
    allows (MPS has no fp64). Gx is G shifted, not G - w: a pair that spans no step then gets
    exactly opposite row and column exponents."""
    wide = torch.float32 if w.device.type == "mps" else torch.float64
    G = w.to(wide).cumsum(-2)
    Gx = torch.nn.functional.pad(G[..., :-1, :], (0, 0, 1, 0))
    return G, Gx


def _pair_matrices(r, k, a, b, G, Gx):
    """[[A_rb, A_rk], [A_ab, A_ak]] (..., 2L, 2L) before the causal and segment masks, in two levels
    (module docstring). Products are in the compute dtype; exponents are rounded to it after the
    wide subtraction."""
    dt = r.dtype
    blocks = lambda x: x.unflatten(-2, (2, _HALF))  # noqa: E731  (..., L, N) -> (..., 2, L/2, N)
    # Level 0: each 8-token block against G at its token 3.
    Gb, Gxb = blocks(G), blocks(Gx)
    ref = Gb[..., 3:4, :]
    x = (Gb - ref).to(dt)  # one rounded exponent for the row and the column factor
    fr, fa, fc = x.exp(), (Gxb - ref).to(dt).exp(), (-x).exp()
    rows0 = torch.cat([blocks(r) * fr, blocks(a) * fa], dim=-2)  # (..., 2, L, N): [r; a] of each block
    cols0 = torch.cat([blocks(b) * fc, blocks(k) * fc], dim=-2)  # [b; k]
    P0 = rows0 @ cols0.transpose(-1, -2)  # (..., 2, L, L): per block [[rb, rk], [ab, ak]] (8 x 8 each)
    # Level 1: rows of the second block against columns of the first, against G at token 7.
    ref = G[..., _HALF - 1 : _HALF, :]
    fr1 = (G[..., _HALF:, :] - ref).to(dt).exp()
    fa1 = (Gx[..., _HALF:, :] - ref).to(dt).exp()
    fc1 = (ref - G[..., :_HALF, :]).to(dt).exp()
    rows1 = torch.cat([r[..., _HALF:, :] * fr1, a[..., _HALF:, :] * fa1], dim=-2)  # (..., L, N)
    cols1 = torch.cat([b[..., :_HALF, :] * fc1, k[..., :_HALF, :] * fc1], dim=-2)
    P1 = rows1 @ cols1.transpose(-1, -2)  # (..., L, L): [[rb, rk], [ab, ak]] of late rows x early columns
    return _assemble(P0, P1)


def _assemble(P0: torch.Tensor, P1: torch.Tensor) -> torch.Tensor:
    """The stacked (2L, 2L) pair matrices from the level-0 diagonal blocks and the level-1 block."""
    h = _HALF
    zero = P1.new_zeros(P1.shape[:-2] + (h, h))

    def full(i: int, j: int) -> torch.Tensor:
        """Pair matrix (i: r or a rows, j: b or k columns), (..., L, L)."""
        d0 = P0[..., 0, i * h : (i + 1) * h, j * h : (j + 1) * h]
        d1 = P0[..., 1, i * h : (i + 1) * h, j * h : (j + 1) * h]
        cross = P1[..., i * h : (i + 1) * h, j * h : (j + 1) * h]
        return torch.cat([torch.cat([d0, zero], -1), torch.cat([cross, d1], -1)], -2)

    return torch.cat([torch.cat([full(0, 0), full(0, 1)], -1), torch.cat([full(1, 0), full(1, 1)], -1)], -2)


def _pair_mask(seg: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(..., 2L, 2L) bool: s <= t in the r rows, s < t in the a rows, and one segment."""
    t = torch.arange(CHUNK, device=device)
    lower = t[:, None] >= t[None, :]
    strict = t[:, None] > t[None, :]
    m = torch.cat([torch.cat([lower, lower], -1), torch.cat([strict, strict], -1)], -2)
    if seg is not None:
        seg2 = torch.cat([seg, seg], -1)  # (B, 1, nc, 2L)
        m = m & (seg2[..., :, None] == seg2[..., None, :])
    return m


def _inv_unit_lower(A: torch.Tensor) -> torch.Tensor:
    """(I - A)^-1 for strictly lower (..., L, L) A: (I + A)(I + A^2)(I + A^4)(I + A^8), since
    A^16 = 0. Matmuls only (a triangular solve is not on every device), batched over all chunks."""
    M = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device) + A
    P = A
    for _ in range(CHUNK.bit_length() - 2):  # L = 16: three more factors
        P = P @ P
        M = M + M @ P
    return M


def _chunk_maps(r, w, k, v, a, b, seg):
    """Q, Yc (..., L, N) and M, D (..., N, N) of every chunk (module docstring)."""
    L = CHUNK
    G, Gx = _prefix_sums(w)
    G_end = G[..., L - 1 :, :]  # (..., 1, N)
    eg, egx = G.to(r.dtype).exp(), Gx.to(r.dtype).exp()
    e_end = (G_end - G).to(r.dtype).exp()
    gamma = G_end.to(r.dtype).exp()  # (..., 1, N)
    if seg is None:
        As, Rs, Bs, Ks = a * egx, r * eg, b * e_end, k * e_end
    else:
        first = (seg == 0)[..., None]  # (B, 1, nc, L, 1): S_0 reaches these tokens
        last = (seg == seg[..., L - 1 :])[..., None]  # these tokens reach the chunk end
        As, Rs = torch.where(first, a * egx, 0.0), torch.where(first, r * eg, 0.0)
        Bs, Ks = torch.where(last, b * e_end, 0.0), torch.where(last, k * e_end, 0.0)
        gamma = torch.where((seg[..., L - 1 :] == 0)[..., None], gamma, 0.0)  # S_0 survives the chunk
    P = torch.where(_pair_mask(seg, r.device), _pair_matrices(r, k, a, b, G, Gx), 0.0)
    Arb, Ark = P[..., :L, :L], P[..., :L, L:]
    Aab, Aak = P[..., L:, :L], P[..., L:, L:]
    Minv = _inv_unit_lower(Aab)  # (I - A_ab)^-1
    Wa, Ua = Minv @ As, Minv @ (Aak @ v)  # (..., L, N) each: U = Wa S_0^T + Ua
    Q = Rs + Arb @ Wa
    Yc = Arb @ Ua + Ark @ v
    M = torch.diag_embed(gamma.squeeze(-2)) + Wa.transpose(-1, -2) @ Bs
    D = Ua.transpose(-1, -2) @ Bs + v.transpose(-1, -2) @ Ks
    return Q, Yc, M, D
