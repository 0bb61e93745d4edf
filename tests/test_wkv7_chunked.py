"""RWKV-7 WKV in plain PyTorch, 16 tokens a step (`kernels/rwkv7/chunked.py`, the "torch" backend):
against the per-token float64 reference, on every path the Triton kernel is held to."""

from __future__ import annotations

import math

import pytest
import torch

from rwkv_ft.kernels import wkv7, wkv7_chunked, wkv7_reference
from rwkv_ft.testing import (
    WKV7_MODEL_W_MIN,
    assert_close,
    assert_grad_close,
    assert_wkv7_close,
    autograd_saved_bytes,
    check_wkv7_fp32_decay_with_bf16_inputs,
    wkv7_fp64_step,
    wkv7_inputs,
    wkv7_step,
)


def check(xs, dtype=torch.float32, **kw):
    assert_wkv7_close(wkv7_step(wkv7_chunked, xs, **kw), wkv7_fp64_step(xs, **kw), dtype)


@pytest.mark.parametrize("T", [1, 15, 16, 17, 33, 100])
def test_float64_equals_the_reference(T):
    """In float64 the chunked algebra and the token-by-token walk agree to rounding: outputs, final
    state and every gradient (T not a multiple of the chunk: padded tokens change nothing)."""
    check(wkv7_inputs(2, T, 3, 8, torch.float64, seed=T), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_fp64_reference(dtype):
    check(wkv7_inputs(2, 37, 3, 32, dtype, seed=1), dtype)


def test_fp32_decay_with_bf16_inputs():
    check_wkv7_fp32_decay_with_bf16_inputs(wkv7_chunked, wkv7_inputs(2, 21, 3, 16, torch.bfloat16, seed=12))


@pytest.mark.parametrize("w", [WKV7_MODEL_W_MIN, math.log1p(-1e-6)], ids=["decay0.545", "decay1-1e-6"])
def test_decay_extremes(w):
    check(wkv7_inputs(2, 40, 2, 16, seed=5, w=w))


@pytest.mark.parametrize("w", [-30.0, -1e4, "mixed"])
def test_very_negative_w(w):
    """w far below the clamp (fp32: -16, decay 1.1e-7 per step) stays finite and within fp32
    tolerance of the reference; below the clamp the decay gradient is 0 (the reference's is below
    e^-16 times the others). "mixed": w uniform in [-30, 0], fast and slow channels side by side."""
    if w == "mixed":
        w = lambda g, s: -30 * torch.rand(s, generator=g, dtype=torch.float64)  # noqa: E731
    xs = wkv7_inputs(2, 40, 2, 16, seed=7, w=w)
    out = wkv7_step(wkv7_chunked, xs)
    for x in [out[0], out[1], *out[2]]:
        assert torch.isfinite(x).all()
    ref = wkv7_fp64_step(xs)
    if not callable(w):
        assert not out[2][1].any() and ref[2][1].abs().max() < 1e-9
        ref[2][1] = None
    assert_wkv7_close(out, ref, torch.float32)


def test_resets():
    """Resets at t = 0, mid-chunk, at chunk boundaries and twice in one chunk, in float64."""
    B, T = 2, 45
    xs = wkv7_inputs(B, T, 2, 8, torch.float64, seed=17)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, [0, 7, 16, 32]] = True
    reset[1, [19, 22]] = True
    check(xs, torch.float64, reset=reset)


def test_state_carried_across_calls_equals_one_call():
    """Two calls with the state carried across (cut mid-chunk) = one call, gradients included."""
    xs = wkv7_inputs(2, 40, 2, 16, torch.float64, seed=15)
    whole = wkv7_step(wkv7_chunked, xs)
    p = [x.detach().clone().requires_grad_() for x in xs]
    cut = 21
    y1, s1 = wkv7_chunked(*(x[:, :cut] for x in p[:6]), p[6])
    y2, s2 = wkv7_chunked(*(x[:, cut:] for x in p[:6]), s1)
    y = torch.cat([y1, y2], 1)
    g = torch.Generator().manual_seed(1)  # wkv7_step's gy, gs
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gs = torch.randn(s2.shape, generator=g, dtype=torch.float64)
    ((y * gy).sum() + (s2 * gs).sum()).backward()
    assert_wkv7_close((y, s2, [x.grad for x in p]), whole, torch.float64)


def test_torch_backend_takes_chunks_from_one_chunk_on():
    """backend="torch" walks token by token below one chunk (a generation step) and in chunks from
    one chunk on."""
    for T, expected in [(15, wkv7_reference), (16, wkv7_chunked)]:
        xs = wkv7_inputs(1, T, 2, 8, seed=T)
        y, s = wkv7(*xs[:6], xs[6], backend="torch")
        ey, es = expected(*xs[:6], xs[6])
        assert torch.equal(y, ey) and torch.equal(s, es), T


def test_keeps_less_for_the_backward_than_the_token_walk():
    """Autograd keeps per-chunk tensors, not the (N, N) state of every token: at the model's head
    size, under 0.7x what the per-token walk keeps."""
    xs = [x.requires_grad_() for x in wkv7_inputs(1, 256, 2, 64, seed=3)]
    assert autograd_saved_bytes(wkv7_chunked, *xs) < 0.7 * autograd_saved_bytes(wkv7_reference, *xs)


def test_compiles_without_graph_breaks():
    """The chunked path inside a compiled block (the CPU's compiled training path): fullgraph, same
    results as eager within fp32 tolerance."""
    xs = wkv7_inputs(1, 20, 2, 16, seed=9)
    eager = wkv7_step(wkv7_chunked, xs)
    compiled = wkv7_step(torch.compile(wkv7_chunked, fullgraph=True), xs)
    assert_close(compiled[0], eager[0], torch.float32, name="y")
    assert_close(compiled[1], eager[1], torch.float32, name="new_state")
    for g, rg in zip(compiled[2], eager[2]):
        assert_grad_close(g, rg, torch.float32)
