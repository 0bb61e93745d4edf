"""RWKV-7 WKV: the Triton kernel (CPU interpreter in CI, or CUDA) against the float64 reference."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels (see conftest.py)

import pytest
import rwkv_ft.kernels.rwkv7.triton_wkv7 as tw
import torch

from rwkv_ft.kernels import wkv7, wkv7_reference
from rwkv_ft.testing import (
    TOLERANCES,
    WKV7_MODEL_W_MIN,
    WKV7_NAMES,
    assert_close,
    assert_grad_close,
    assert_wkv7_close,
    check_wkv7_fp32_decay_with_bf16_inputs,
    relative_error,
    wkv7_fp64_step,
    wkv7_inputs,
    wkv7_step,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# 16-token chunks and split value blocks (N = 32 -> 2 scan programs per head, and 2 steps of the
# gradient kernel's value loop, whose key-side shares add up): the non-trivial paths.
SPLIT = dict(chunk=16, bv_scan=16, bv_grad=16)
# One value block everywhere (plain stores).
WHOLE = dict(chunk=16, bv_scan=32, bv_grad=32)


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every buffer the host code allocates starts as NaN (ints as -7): unwritten elements fail."""
    tw.POISON_OUTPUTS = True
    yield
    tw.POISON_OUTPUTS = False
    tw._CFG_OVERRIDE = None


def use_config(**fields):
    tw._CFG_OVERRIDE = fields or None


def make_inputs(*args, **kwargs):
    return wkv7_inputs(*args, device=DEV, **kwargs)


def triton_fn(*args, **kw):
    return wkv7(*args, backend="triton", **kw)


def check(xs, dtype=torch.float32, rel=None, **kw):
    assert_wkv7_close(wkv7_step(triton_fn, xs, **kw), wkv7_fp64_step(xs, **kw), dtype, rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_fp64_reference(dtype):
    use_config(**SPLIT)
    check(make_inputs(2, 37, 3, 32, dtype), dtype)


def test_fp32_decay_with_bf16_inputs():
    use_config(**SPLIT)
    check_wkv7_fp32_decay_with_bf16_inputs(triton_fn, make_inputs(2, 21, 3, 32, torch.bfloat16, seed=12))


@pytest.mark.parametrize("T", [1, 15, 16, 17])
@pytest.mark.parametrize("cfg", [SPLIT, WHOLE], ids=["split", "whole"])
def test_sequence_lengths(T, cfg):
    """T = 1, one chunk short of full, exactly one, one past (16-token chunks); B = 1 and 2."""
    use_config(**cfg)
    check(make_inputs(1 + T % 2, T, 1, 32, seed=T))


@pytest.mark.parametrize("T", [31, 32, 33])
def test_sequence_lengths_default_chunk(T):
    """Around two chunks of the shipped rule (16 tokens), with a state and no split."""
    check(make_inputs(2, T, 1, 32, seed=40 + T))


@pytest.mark.slow
def test_t4100_with_state_and_resets():
    """T = 4100 (129 chunks, the last one 4 tokens long) with an incoming state and resets."""
    xs = make_inputs(1, 4100, 1, 32, seed=35)
    reset = torch.zeros(1, 4100, dtype=torch.bool, device=DEV)
    reset[0, [100, 2048, 4097]] = True
    check(xs, reset=reset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequence_default_config(dtype):
    """T = 1000 (63 chunks; the last block of stored states is partial) with the shipped rule."""
    check(make_inputs(1, 1000, 1, 32, dtype, seed=3), dtype)


@pytest.mark.parametrize("N,H", [(64, 3), (128, 1)])
def test_head_sizes(N, H):
    """N = 64 with a head count that is not a power of two; N = 128 on a tiny shape."""
    use_config(chunk=16)
    check(make_inputs(2, 19, H, N, seed=N))


@pytest.mark.parametrize("chunk", [32, 64])
def test_longer_chunks(chunk):
    """Chunks of 32 / 64 tokens (two / three cross levels) with resets and very negative w."""
    use_config(chunk=chunk, bv_scan=16, bv_grad=16)
    mixed = lambda g, s: torch.where(torch.rand(s, generator=g, dtype=torch.float64) < 0.3, -30.0, -0.3)
    xs = make_inputs(2, 150, 1, 32, seed=chunk, w=mixed)
    reset = torch.zeros(2, 150, dtype=torch.bool, device=DEV)
    reset[0, [0, 31, 32, 70]] = True
    reset[1, [64, 100]] = True
    check(xs, reset=reset)


@pytest.mark.parametrize("w", [WKV7_MODEL_W_MIN, math.log1p(-1e-6)], ids=["decay0.545", "decay1-1e-6"])
def test_decay_extremes(w):
    """The model's fastest per-step decay (0.545) and almost none (1 - 1e-6) everywhere."""
    use_config(**SPLIT)
    check(make_inputs(2, 40, 2, 32, seed=5, w=w))


@pytest.mark.parametrize("w", [-30.0, -1e4, "mixed"])
def test_very_negative_w(w):
    """w far below the clamp (W_MIN = -16, decay 1.1e-7 per step) stays finite and within fp32
    tolerance of the reference; the decay gradient below the clamp is 0 (the reference's is
    below e^-16 times the others). "mixed": w uniform in [-30, 0] (both level plans per chunk)."""
    use_config(**SPLIT)
    if w == "mixed":
        w = lambda g, s: -30 * torch.rand(s, generator=g, dtype=torch.float64)
    xs = make_inputs(2, 40, 2, 32, seed=7, w=w)
    with warnings.catch_warnings():  # numpy (interpreter) overflows in products that are masked out
        warnings.simplefilter("ignore", RuntimeWarning)
        out = wkv7_step(triton_fn, xs)
    for x in [out[0], out[1], *out[2]]:
        assert torch.isfinite(x).all()
    ref = wkv7_fp64_step(xs)
    if not callable(w):  # every w below the clamp: dw is 0 here, below 1e-9 in the reference
        assert not out[2][1].any() and ref[2][1].abs().max() < 1e-9
        ref[2][1] = None
    assert_wkv7_close(out, ref, torch.float32)


def test_bf16_error_at_the_rounding_floor():
    """bf16 inputs: y and every gradient within 1.2x the error of rounding the fp64 result to
    bf16 (the interpreter's dots are fp32, so this checks the bf16 hi/lo split and the algebra)."""
    use_config(**SPLIT)
    xs = make_inputs(2, 64, 2, 32, torch.bfloat16, seed=9)
    out, ref = wkv7_step(triton_fn, xs), wkv7_fp64_step(xs)
    pairs = [("y", out[0], ref[0])] + [(n, g, rg) for n, g, rg in zip(WKV7_NAMES[:6], out[2], ref[2])]
    for name, got, want in pairs:
        floor = relative_error(want.to(torch.bfloat16), want)
        assert relative_error(got, want) <= 1.2 * floor, name


@pytest.mark.parametrize("prec", ["bf16x3", "tf32x3", "ieee", "tf32"])
def test_precision_modes(prec):
    """Every product mode runs; bf16x3 on fp32 inputs keeps ~2^-16 per product. (On CUDA, tf32
    itself is only ~1e-3 accurate: the GPU benchmark measures it.)"""
    use_config(prec=prec, **SPLIT)
    xs = make_inputs(1, 33, 2, 32, seed=11)
    if prec == "bf16x3" or (prec == "tf32" and DEV == "cuda"):  # norm-wise only
        bound = 5e-5 if prec == "bf16x3" else 5e-3
        out, ref = wkv7_step(triton_fn, xs), wkv7_fp64_step(xs)
        for got, want in zip([out[0], out[1], *out[2]], [ref[0], ref[1], *ref[2]]):
            assert relative_error(got, want) < bound
    else:
        check(xs)


def test_non_contiguous_inputs():
    """Slices of one packed (B, T, 6C) projection, viewed as (B, T, H, N), are read in place;
    inputs with different layouts (a transposed copy) are made contiguous first."""
    use_config(**SPLIT)
    B, T, H, N = 2, 21, 2, 32
    xs = make_inputs(B, T, H, N, seed=13)
    packed = torch.cat([x.reshape(B, T, H * N) for x in xs[:6]], dim=-1)  # (B, T, 6C)
    views = [packed[..., i * H * N : (i + 1) * H * N].view(B, T, H, N) for i in range(6)]
    assert not views[0].is_contiguous()
    ref = wkv7_fp64_step(xs)
    assert_wkv7_close(wkv7_step(triton_fn, views + [xs[6]]), ref, torch.float32)
    odd = xs[1].transpose(1, 2).contiguous().transpose(1, 2)  # same values, (B, H, T, N) memory
    assert_wkv7_close(wkv7_step(triton_fn, [xs[0], odd, *xs[2:]]), ref, torch.float32)


def test_chunked_with_state_equals_whole():
    """Two calls with the state carried across (cut mid-chunk) = one call: outputs, final state
    and every gradient, including through the carried state."""
    use_config(**SPLIT)
    xs = make_inputs(2, 40, 2, 32, seed=15)
    whole = wkv7_step(triton_fn, xs)
    p = [x.detach().clone().requires_grad_() for x in xs]
    cut = 21
    y1, s1 = triton_fn(*(x[:, :cut] for x in p[:6]), p[6])
    y2, s2 = triton_fn(*(x[:, cut:] for x in p[:6]), s1)
    y = torch.cat([y1, y2], 1)
    g = torch.Generator().manual_seed(1)  # the same gy, gs as wkv7_step()
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)
    gs = torch.randn(s2.shape, generator=g, dtype=torch.float64).to(s2)
    ((y * gy).sum() + (s2 * gs).sum()).backward()
    assert_wkv7_close((y, s2, [x.grad for x in p]), whole, torch.float32)


def test_reset_equals_separate_sequences():
    """Resets at t = 0, mid-chunk, at a chunk boundary and twice in one chunk: against the
    reference, and equal to running every segment as its own sequence (outputs and gradients)."""
    use_config(**SPLIT)
    B, T, H, N = 2, 45, 2, 32
    xs = make_inputs(B, T, H, N, seed=17)
    reset = torch.zeros(B, T, dtype=torch.bool, device=DEV)
    reset[0, [0, 7, 32]] = True  # t = 0, mid-chunk, a chunk boundary
    reset[1, [19, 22]] = True  # two in one chunk
    ref = wkv7_fp64_step(xs, reset=reset)
    assert_wkv7_close(wkv7_step(triton_fn, xs, reset=reset), ref, torch.float32)
    g = torch.Generator().manual_seed(1)  # wkv7_step()'s gy, gs: the loss is a sum over segments
    gy = torch.randn((B, T, H, N), generator=g, dtype=torch.float64).float().to(DEV)
    gs = torch.randn((B, H, N, N), generator=g, dtype=torch.float64).float().to(DEV)
    for row in range(B):
        cuts = [0] + [t for t in reset[row].nonzero().flatten().tolist() if t > 0] + [T]
        for i, (t0, t1) in enumerate(zip(cuts[:-1], cuts[1:])):
            p = [x[row : row + 1, t0:t1].detach().clone().requires_grad_() for x in xs[:6]]
            st = xs[6][row : row + 1].clone().requires_grad_() if i == 0 and not reset[row, 0] else None
            y, ns = triton_fn(*p, st)
            loss = (y * gy[row : row + 1, t0:t1]).sum()
            if t1 == T:
                assert_close(ns, ref[1][row : row + 1], torch.float32, name="new_state")
                loss = loss + (ns * gs[row : row + 1]).sum()
            loss.backward()
            assert_close(y, ref[0][row : row + 1, t0:t1], torch.float32, name="y")
            for name, x, rg in zip(WKV7_NAMES, p, ref[2]):
                assert_grad_close(x.grad, rg[row : row + 1, t0:t1], torch.float32, name=f"grad {name}")
            if st is not None:
                assert_grad_close(st.grad, ref[2][6][row : row + 1], torch.float32, name="grad state")


def test_kept_prep_equals_recomputed():
    """keep_prep: the backward reuses the forward's Q and M instead of recomputing them."""
    use_config(**SPLIT, keep_prep=True)
    check(make_inputs(2, 37, 2, 32, seed=37))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_key_side_equals_computed(dtype):
    """The gradient kernel reading the key side (pair matrices, (I - A_ab)^-1) that the
    backward's prep kept gives what it gives computing them itself (as it does after keep_prep),
    with resets and with the multi-level plan of fast-decaying chunks."""
    xs = make_inputs(2, 37, 2, 32, dtype, seed=41)
    xs[1] = xs[1].clone()
    xs[1][0, :16] = -9.0  # one chunk past the one-pass bound: the level passes
    reset = torch.zeros(2, 37, dtype=torch.bool, device=DEV)
    reset[1, 21] = True
    outs = {}
    for keep_prep in (False, True):
        use_config(**SPLIT, keep_prep=keep_prep)
        outs[keep_prep] = wkv7_step(triton_fn, xs, reset=reset)
    kept, computed = outs[False], outs[True]
    for got, expected in zip([kept[0], kept[1], *kept[2]], [computed[0], computed[1], *computed[2]]):
        if DEV == "cpu":  # the interpreter: the same arithmetic in either kernel
            assert torch.equal(got, expected)
        else:
            assert_close(got, expected, dtype)


def test_loss_on_y_only_and_state_only():
    use_config(**SPLIT)
    xs = make_inputs(2, 23, 1, 32, seed=19)
    for kw in (dict(loss_y=True, loss_state=False), dict(loss_y=False, loss_state=True)):
        check(xs, **kw)


def test_without_state_and_state_grad():
    """No incoming state (zeros), and a state that does not require grad."""
    use_config(**SPLIT)
    xs = make_inputs(2, 18, 1, 32, seed=21, state=False)
    check(xs)
    xs = make_inputs(1, 18, 1, 32, seed=22)
    p = [x.detach().clone().requires_grad_() for x in xs[:6]]
    y, ns = triton_fn(*p, xs[6])
    (y.sum() + ns.sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in p)


def test_deterministic_backward_is_bitwise_repeatable():
    """No atomics anywhere: two backward passes agree bit for bit (also under
    torch.use_deterministic_algorithms(True))."""
    use_config(**SPLIT)
    xs = make_inputs(2, 20, 1, 32, seed=23)
    torch.use_deterministic_algorithms(True)
    try:
        outs = [wkv7_step(triton_fn, xs) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert_wkv7_close(outs[0], wkv7_fp64_step(xs), torch.float32)
    for a, b in zip(outs[0][2], outs[1][2], strict=True):
        assert torch.equal(a, b)


def test_poisoned_outputs_are_overwritten():
    """The poison hook is live (so the comparisons above would see unwritten elements as NaN)."""
    assert torch.isnan(tw._new((3,), torch.float32, "cpu")).all()
    use_config(**SPLIT)
    xs = make_inputs(2, 5, 1, 32, seed=25)
    y, ns = triton_fn(*xs)
    assert torch.isfinite(y).all() and torch.isfinite(ns).all()


@pytest.mark.skipif(DEV != "cuda", reason="T = 16384: too slow for the interpreter")
def test_state_does_not_drift_over_16k_tokens():
    xs = make_inputs(1, 16384, 2, 64, seed=27)
    _, ns = triton_fn(*xs)
    _, rns = wkv7_reference(*(x.double() for x in xs))
    assert_close(ns, rns, torch.float32)


def test_config_rule_and_validation():
    cfg = tw._config(8, 4096, 32, 64, torch.bfloat16)
    assert cfg.prec == cfg.prec_scan == "bf16x3" and tw._config(1, 16, 1, 64, torch.float32).prec == "tf32x3"
    assert cfg.bv_scan == 64  # enough heads: one scan program per head
    assert tw._config(1, 16384, 32, 64, torch.bfloat16).bv_scan < 64  # few heads: the scan splits values
    for bad in (dict(chunk=8), dict(bv_scan=48), dict(bv_grad=8), dict(prec="fp8"), dict(prec_scan="fp8")):
        use_config(**bad)
        with pytest.raises(ValueError):
            tw._config(1, 16, 1, 64, torch.float32)


def test_auto_and_torch_backends_use_the_reference_on_cpu():
    if DEV != "cpu":
        pytest.skip("checks the CPU dispatch; these tests run on a CUDA device here")
    xs = make_inputs(2, 6, 1, 32, seed=29)
    ry, rs = wkv7_reference(*xs)
    for backend in ("auto", "torch"):
        y, ns = wkv7(*xs, backend=backend)
        assert torch.equal(y, ry) and torch.equal(ns, rs)


def test_validation_errors(monkeypatch):
    r, w, k, v, a, b, s = make_inputs(2, 6, 1, 32, seed=31)
    with pytest.raises(ValueError, match="'cuda'"):
        wkv7(r, w, k, v, a, b, s, backend="cuda")
    with pytest.raises(ValueError, match="w shape"):
        wkv7(r, w[:, :5], k, v, a, b, s)
    with pytest.raises(ValueError, match="dtype"):
        wkv7(r, w.double(), k, v, a, b, s)
    with pytest.raises(ValueError, match="state"):
        wkv7(r, w, k, v, a, b, s[:1])
    with pytest.raises(ValueError, match="T >= 1"):
        wkv7(*(x[:, :0] for x in (r, w, k, v, a, b)), s)
    with pytest.raises(ValueError, match="B, T, H, N"):
        wkv7(r[0], w[0], k[0], v[0], a[0], b[0])
    with pytest.raises(ValueError, match="reset"):
        wkv7(r, w, k, v, a, b, s, reset=torch.zeros(2, 6, device=r.device))
    with pytest.raises(ValueError, match="head size"):
        wkv7(*(x[..., :16] for x in (r, w, k, v, a, b)), backend="triton")
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        wkv7(*(x.double() for x in (r, w, k, v, a, b)), backend="triton")
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            wkv7(r, w, k, v, a, b, s, backend="triton")


def test_reference_gradcheck():
    xs = [x.double().cpu() for x in make_inputs(1, 4, 2, 3, seed=33)]
    ps = [x.requires_grad_() for x in xs]
    reset = torch.tensor([[False, False, True, False]])
    assert torch.autograd.gradcheck(lambda *t: wkv7_reference(*t), ps)
    assert torch.autograd.gradcheck(lambda *t: wkv7_reference(*t, reset=reset), ps)


def test_tolerance_table_covers_kernel_dtypes():
    assert all(dt in TOLERANCES for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64))


# ------------------------------------------------------------------------------------------------
# The custom ops (torch.compile sees one opaque node per direction)


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no-state"])
def test_op_registration(with_state):
    """torch.library.opcheck: schema, fake implementation, autograd registration and AOT dispatch
    agree with running the kernels (forward, then backward)."""
    use_config(**SPLIT)
    xs = make_inputs(1, 19, 1, 32, seed=41, state=with_state)
    args = [x.requires_grad_() for x in xs[:6]] + [None if xs[6] is None else xs[6].requires_grad_()]
    reset = torch.zeros(1, 19, dtype=torch.bool, device=DEV)
    reset[0, 9] = True
    inputs = [x.detach() for x in xs[:6]]
    for store in (True, False):  # store=False with a backward: it runs the forward again
        torch.library.opcheck(torch.ops.rwkv_ft.wkv7_forward.default, (*args, reset, store, True))
        y, ns, states, qt, m = torch.ops.rwkv_ft.wkv7_forward(*inputs, xs[6], reset, store, True)
        assert (states.numel() > 0) == store
        gy, gs = torch.randn_like(y), torch.randn_like(ns)
        state = None if store or xs[6] is None else xs[6].detach()
        bwd_args = (*inputs, state, reset, states, qt, m, gy, gs, with_state)
        torch.library.opcheck(torch.ops.rwkv_ft.wkv7_backward.default, bwd_args)


def test_meta_tensors_give_shapes():
    """Shape-only tools (memory estimates) run the op's fake implementation on meta tensors,
    including what the forward keeps for the backward."""
    xs = [x.to("meta") for x in make_inputs(2, 40, 3, 64, torch.bfloat16)]
    for x in xs[:6]:
        x.requires_grad_()
    y, ns = wkv7(*xs[:6], xs[6])
    assert y.is_meta and y.shape == xs[0].shape and y.dtype == torch.bfloat16
    assert ns.shape == (2, 3, 64, 64) and ns.dtype == torch.float32
    *_, states, _, _ = torch.ops.rwkv_ft.wkv7_forward(*xs[:6], xs[6], None, True, True)
    assert states.shape == tw.stored_states_shape(2, 40, 3, 64, tw._config(2, 40, 3, 64, torch.bfloat16))


def test_compiles_as_one_opaque_node():
    """wkv7(backend="triton") in a fullgraph-compiled function: y, state and every gradient equal
    the eager call's exactly (the same kernels run), and the graph holds the op itself."""
    use_config(**SPLIT)
    xs = make_inputs(2, 21, 1, 32, seed=43)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    eager = wkv7_step(triton_fn, xs)
    compiled = wkv7_step(torch.compile(triton_fn, fullgraph=True, backend=backend), xs)
    torch._dynamo.reset()
    for a, b in zip([compiled[0], compiled[1], *compiled[2]], [eager[0], eager[1], *eager[2]], strict=True):
        assert torch.equal(a, b)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert "rwkv_ft.wkv7_forward" in targets


def test_inference_stores_nothing():
    """Without gradients (generation, prefill) the forward keeps no chunk states."""
    use_config(**SPLIT)
    xs = make_inputs(1, 20, 1, 32, seed=45)
    with torch.no_grad():
        y, ns = wkv7(*xs[:6], xs[6], backend="triton")
        *_, states, qt, m = torch.ops.rwkv_ft.wkv7_forward(*xs[:6], xs[6], None, False, False)
    assert states.numel() == qt.numel() == m.numel() == 0
    ry, rs = wkv7_reference(*xs)
    assert_close(y, ry, torch.float32)
    assert_close(ns, rs, torch.float32)


class RecordedLaunches:
    """Stands in for the four kernels: records each launch as (kernel, grid, args, meta), with every
    tensor argument replaced by its dtype (what Triton compiles for, besides integers and constexprs)."""

    def __init__(self, monkeypatch):
        self.launches = []
        for name in ("_prep_kernel", "_scan_fwd_kernel", "_scan_bwd_kernel", "_grad_kernel"):
            monkeypatch.setattr(tw, name, self._kernel(name))

    def _kernel(self, name):
        launches = self.launches

        class Kernel:
            def __getitem__(self, grid):
                return lambda *args, **meta: launches.append((name, grid, as_compiled(args), meta))

            def __repr__(self):
                return name

        return Kernel()

    @staticmethod
    def named(launches):
        return [(repr(kernel), grid, as_compiled(args), meta) for kernel, grid, args, meta in launches]


def as_compiled(args):
    return tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize(
    "state, resets, keep_prep, store",
    [(False, False, False, True), (True, True, False, True), (True, False, True, True), (True, True, False, False)],
)  # fmt: skip
def test_first_call_compiles_ahead_what_forward_and_backward_launch(monkeypatch, state, resets, keep_prep, store):
    """The kernels `_compile_ahead` compiles on a first call are those the forward and the usual
    backward then launch (same kernel, grid, integers, dtypes and constexprs), so none of them
    compiles again at its launch; also when the forward stores nothing and the backward runs it again."""
    recorder = RecordedLaunches(monkeypatch)
    B, T, H, N = 2, 37, 3, 32
    r, k, v, a, b = (torch.randn(B, T, H, N, dtype=torch.bfloat16) for _ in range(5))
    w = -torch.rand(B, T, H, N)  # fp32 decay beside bf16 inputs, as the model passes it
    s0 = torch.randn(B, H, N, N) if state else None
    reset = (torch.rand(B, T) < 0.1).to(torch.uint8) if resets else None
    cfg = dataclasses.replace(tw._config(B, T, H, N, r.dtype), keep_prep=keep_prep)
    ahead = RecordedLaunches.named(tw._launches_ahead(r, w, k, v, a, b, s0, reset, cfg, store, True))
    _, _, saved = tw.wkv7_fwd(r, w, k, v, a, b, s0, reset, cfg, store, True)
    dy = torch.randn(B, T, H, N, dtype=torch.bfloat16)
    tw.wkv7_bwd(r, w, k, v, a, b, reset, saved, dy, None, cfg, state, s0)
    # (the forward run again in the backward launches its prep keeping the key side: a compile of its own)
    assert ahead == recorder.launches
    if not store:  # that run wants the states, not y: no Yc from its prep, no y from its scan
        (_, _, _, rerun_prep), (_, _, _, rerun_scan) = recorder.launches[2:4]
        assert (rerun_prep["Y_SIDE"], rerun_prep["KEEP_KEY"], rerun_scan["STORE_Y"]) == (False, True, False)
    assert [name for name, *_ in recorder.launches] == [
        "_prep_kernel", "_scan_fwd_kernel", *(["_prep_kernel"] if not keep_prep or not store else []),
        *(["_scan_fwd_kernel"] if not store else []), "_scan_bwd_kernel", "_grad_kernel",
    ]  # fmt: skip
    inference = RecordedLaunches.named(tw._launches_ahead(r, w, k, v, a, b, s0, reset, cfg, False, False))
    recorder.launches.clear()
    tw.wkv7_fwd(r, w, k, v, a, b, s0, reset, cfg, False)
    assert inference == recorder.launches


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no-state"])
def test_recompute_states_gives_the_same_results_and_keeps_less(with_state):
    """recompute_states: y, the final state and every gradient exactly as when the forward keeps
    its chunk states, and the autograd graph holds no fp32 chunk states between the two passes."""
    use_config(**SPLIT)
    xs = make_inputs(2, 37, 2, 32, seed=47, state=with_state)
    reset = torch.zeros(2, 37, dtype=torch.bool, device=DEV)
    reset[1, 20] = True
    kept = {}

    def fn(recompute):
        def call(*args, **kw):
            return wkv7(*args, backend="triton", recompute_states=recompute, **kw)

        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = wkv7_step(call, xs, reset=reset)
        kept[recompute] = sum(t.numel() * t.element_size() for t in saved)
        return out

    stored, recomputed = fn(False), fn(True)
    for got, expected in zip([recomputed[0], recomputed[1], *recomputed[2]], [stored[0], stored[1], *stored[2]]):
        assert (got is None) == (expected is None)
        if got is not None:
            assert torch.equal(got, expected)
    chunk_states = 2 * 2 * math.ceil(37 / 16) * 32 * 32 * 4  # B * H * chunks * N * N fp32
    assert kept[False] - kept[True] >= chunk_states - (with_state and 2 * 2 * 32 * 32 * 4)
