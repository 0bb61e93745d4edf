"""Shared helpers for tests: one tolerance table and one assert, tiny models, WKV-7 cases, a free port,
a faster Triton interpreter."""

from __future__ import annotations

import math
import socket
from collections.abc import Callable

import torch

# (rtol, atol) per dtype. fp32 arithmetic lands far under 1e-5 relative for our ops; bf16 carries
# 8 mantissa bits, fp16 11.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff if denom == 0 else diff / denom


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    rel: float | None = None,
    name: str = "tensor",
) -> None:
    """Assert `actual` matches `expected`.

    Two checks, both from the tolerance table of `dtype` (default: actual's dtype): the norm-wise
    relative error is at most rtol (or `rel` when given), and every element is within
    atol + rtol * |expected| scaled by 10 (a loose elementwise bound that still catches a wrong
    element hidden in a large norm). NaN or inf in `actual` where `expected` is finite always fails.
    """
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[dtype]
    rel = rtol if rel is None else rel
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~torch.isfinite(a) & torch.isfinite(e)
    if bad.any():
        raise AssertionError(f"{name}: {int(bad.sum())} non-finite values where the reference is finite")
    err = relative_error(a, e)
    if err > rel:
        raise AssertionError(f"{name}: relative error {err:.3e} > {rel:.1e} ({dtype})")
    worst = ((a - e).abs() - 10 * (atol + rel * e.abs())).max().item() if a.numel() else 0.0
    if worst > 0:
        idx = int(((a - e).abs() - 10 * (atol + rel * e.abs())).argmax())
        raise AssertionError(
            f"{name}: element {idx} is {a.flatten()[idx].item():.6g}, expected {e.flatten()[idx].item():.6g}"
        )


def tiny_config(**overrides):
    """A small RWKV-4 config for tests: L=2, C=32, V=97 (C and V deliberately not powers of two)."""
    from rwkv_ft.models.rwkv4 import Rwkv4Config

    kwargs = dict(vocab_size=97, hidden_size=40, num_hidden_layers=2, intermediate_size=72, wkv_backend="torch")
    kwargs.update(overrides)
    return Rwkv4Config(**kwargs)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random value in its realistic range, so tests exercise all of them.

    Default initialisations leave structure (ones, zeros, ramps) that can hide a swapped or unused
    parameter; this draws each tensor fresh.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        shape = p.shape
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "w0":  # RWKV-7 decay offset: per-step decays from ~0.55 to ~1
            value = torch.rand(shape, generator=gen) * 8 - 6
        elif leaf in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "k_a"):
            value = torch.rand(shape, generator=gen)
        elif leaf == "k_k":
            value = 0.85 + 0.2 * torch.randn(shape, generator=gen)
        elif leaf in ("a0", "v0"):
            value = torch.randn(shape, generator=gen)
        elif leaf == "r_k":
            value = 0.5 * torch.randn(shape, generator=gen)
        elif ".ln_x" in name and leaf == "weight":
            value = 1 + 0.2 * torch.randn(shape, generator=gen)
        elif name.endswith("time_decay"):
            value = torch.rand(shape, generator=gen) * 6 - 4  # exp(-exp(.)) spans fast and slow decay
        elif name.endswith("time_first"):
            value = torch.randn(shape, generator=gen)
        elif ".time_mix" in name:
            value = torch.rand(shape, generator=gen)
        elif ".ln" in name and name.endswith("weight"):
            value = 1 + 0.2 * torch.randn(shape, generator=gen)
        elif ".ln" in name and name.endswith("bias"):
            value = 0.1 * torch.randn(shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        p.copy_(value.to(p.dtype))
    return model


def random_ids(batch: int, length: int, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    """(batch, length) random token ids in 1..vocab-1 (0 is RWKV's end-of-text/padding id)."""
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def tiny_rwkv4():
    """A tiny RWKV-4 causal LM with every parameter random."""
    from rwkv_ft.models.rwkv4 import Rwkv4ForCausalLM

    return randomize_(Rwkv4ForCausalLM(tiny_config()), seed=1)


def tiny_rwkv7_config(**overrides):
    """A small RWKV-7 config for tests: L=2, C=48 in 3 heads of 16, V=97, small low-rank maps."""
    from rwkv_ft.models.rwkv7 import Rwkv7Config

    kwargs = dict(
        vocab_size=97, hidden_size=48, num_hidden_layers=2, head_size=16, intermediate_size=80,
        decay_low_rank=8, a_low_rank=8, v_low_rank=4, gate_low_rank=12, wkv_backend="torch",
    )  # fmt: skip
    kwargs.update(overrides)
    return Rwkv7Config(**kwargs)


def tiny_rwkv7():
    """A tiny RWKV-7 causal LM with every parameter random."""
    from rwkv_ft.models.rwkv7 import Rwkv7ForCausalLM

    return randomize_(Rwkv7ForCausalLM(tiny_rwkv7_config()), seed=1)


# Every model version the shared tests (generation, padding, packing, adapters) run on.
MODEL_FACTORIES = {"rwkv4": tiny_rwkv4, "rwkv7": tiny_rwkv7}


def rwkv_package_model(version: int = 4):
    """BlinkDL's `rwkv` package's `rwkv.model` module, loaded for RWKV-`version` (the oracle).

    The package decides at import time whether `RWKV` is the RWKV-7 class (env RWKV_V7_ON=1), so
    each version gets its own fresh copy of the module, with JIT and CUDA off.
    """
    import importlib.util
    import os
    import sys

    name = f"_rwkv_oracle_v{version}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("rwkv.model")
    if spec is None:
        raise ImportError("BlinkDL's rwkv package is not installed (it is in the dev extras)")
    saved = {k: os.environ.get(k) for k in ("RWKV_V7_ON", "RWKV_JIT_ON", "RWKV_CUDA_ON")}
    os.environ.update(RWKV_V7_ON="1" if version == 7 else "0", RWKV_JIT_ON="0", RWKV_CUDA_ON="0")
    try:
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, spec.origin))
        sys.modules[name] = module
        module.__spec__.loader.exec_module(module)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return module


def free_port() -> int:
    """A TCP port nobody listens on now, for a multi-process test's rendezvous: the launchers'
    default (29500) would collide between tests run in parallel (pytest-xdist) or beside a real run."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# WKV-7 cases: the model's input distribution, one forward + backward, the fp64 oracle's

WKV7_NAMES = ("r", "w", "k", "v", "a", "b", "state")
WKV7_MODEL_W_MIN = -math.exp(-0.5)  # the model's w lies in [-0.6065, 0)


def wkv7_inputs(B, T, H, N, dtype=torch.float32, *, state=True, seed=0, w=None, device="cpu") -> list:
    """r, w, k, v, a, b (B, T, H, N) in `dtype` and the state (B, H, N, N) fp32 (fp64 for fp64
    inputs) or None, drawn as the model draws them: k, v, r ~ randn; a = -kk, b = kk * sigmoid(.)
    with kk unit-norm per head; w = -exp(-0.5) * sigmoid(.) (or `w`: a callable of the generator and
    shape, or a constant)."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    shape = (B, T, H, N)
    r, k, v = rn(*shape), rn(*shape), rn(*shape)
    kk = torch.nn.functional.normalize(rn(*shape), dim=-1)
    a, b = -kk, kk * torch.sigmoid(rn(*shape))
    if w is None:
        wt = WKV7_MODEL_W_MIN * torch.sigmoid(2 * rn(*shape))
    elif callable(w):
        wt = w(g, shape)
    else:
        wt = torch.full(shape, float(w), dtype=torch.float64)
    s = 0.5 * rn(B, H, N, N) if state else None
    cast = lambda x: x.to(dtype).to(device)  # noqa: E731
    s_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return [cast(x) for x in (r, wt, k, v, a, b)] + [None if s is None else s.to(s_dtype).to(device)]


def wkv7_step(fn: Callable, xs: list, *, reset=None, loss_y=True, loss_state=True, seed=1, gy_dtype=None) -> tuple:
    """Forward + backward of sum(y * gy) + sum(new_state * gs) with fixed random gy, gs (gy rounded
    to gy_dtype, default the inputs' dtype, so every implementation sees the same values). Returns
    y, new_state and the gradients of r, w, k, v, a, b, state."""
    xs = [None if x is None else x.detach().clone().requires_grad_() for x in xs]
    y, ns = fn(*xs[:6], xs[6], reset=reset)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(gy_dtype or xs[0].dtype).to(y)
    gs = torch.randn(ns.shape, generator=g, dtype=torch.float64).to(ns)
    loss = (y * gy).sum() * loss_y + (ns * gs).sum() * loss_state
    loss.backward()
    return y, ns, [None if x is None else x.grad for x in xs]


def wkv7_fp64_step(xs: list, *, reset=None, **kw) -> tuple:
    """`wkv7_step` of the per-token reference in float64 on the CPU, for inputs of any dtype."""
    from rwkv_ft.kernels import wkv7_reference

    d = lambda x: None if x is None else x.detach().double().cpu()  # noqa: E731
    reset = None if reset is None else reset.cpu()
    return wkv7_step(wkv7_reference, [d(x) for x in xs], reset=reset, gy_dtype=xs[0].dtype, **kw)


def check_wkv7_fp32_decay_with_bf16_inputs(fn: Callable, xs: list) -> None:
    """The model passes w in fp32 (the decay loses nothing) and the rest in bf16: y and the gradients
    come back in their inputs' dtypes (dw fp32), within bf16 tolerance of the fp64 reference. xs:
    `wkv7_inputs` in bf16; w is widened here."""
    xs = [*xs[:1], xs[1].float(), *xs[2:]]
    y, _, grads = wkv7_step(fn, xs)
    ry, _, rgrads = wkv7_fp64_step(xs)
    assert y.dtype == torch.bfloat16 and grads[1].dtype == torch.float32 and grads[0].dtype == torch.bfloat16
    assert_close(y, ry, torch.bfloat16, name="y")
    for name, g, rg in zip(WKV7_NAMES, grads, rgrads, strict=True):
        assert_grad_close(g, rg, torch.bfloat16, name=f"grad {name}")


def autograd_saved_bytes(fn: Callable, *args) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of `fn(*args)`."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def assert_wkv7_close(out: tuple, ref: tuple, dtype: torch.dtype, rel: float | None = None) -> None:
    """`wkv7_step` results against the reference's: y in `dtype`, the new state fp32 (fp64 for fp64
    inputs), every gradient in its input's dtype, all within `dtype`'s tolerance."""
    y, ns, grads = out
    ry, rns, rgrads = ref
    assert y.dtype == dtype and ns.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(y, ry, dtype, rel=rel, name="y")
    assert_close(ns, rns, dtype, rel=rel, name="new_state")
    for name, g, rg in zip(WKV7_NAMES, grads, rgrads, strict=True):
        if rg is None:  # the loss does not reach this input: None, or zeros from the kernel
            assert g is None or not g.any(), name
            continue
        assert g.dtype == (ns.dtype if name == "state" else dtype), name
        assert_grad_close(g, rg, dtype, rel=rel, name=f"grad {name}")


def assert_grad_close(g: torch.Tensor, rg: torch.Tensor, dtype: torch.dtype, rel=None, name="grad") -> None:
    """Gradients are compared at unit scale (both divided by the reference's rms), so the table's
    atol is relative to the gradient's typical size. This matters for WKV-7's dw: a reverse cumsum
    of terms larger than the result, so an element near zero carries an absolute error of ~1e-6 of
    the tensor's scale in fp32 (norm-wise the error is ~4e-7)."""
    sc = rg.detach().double().pow(2).mean().sqrt().clamp_min(1e-300).item()
    assert_close(g.detach().double() / sc, rg.detach().double() / sc, dtype, rel=rel, name=name)


class RerunRecorder:
    """A stand-in for `rwkv_ft.step_graph.CudaGraphRecorder` on a CPU: its replay runs the recorded
    function again (on the recorded input tensors) and overwrites the recorded output tensors in
    place, which is what a CUDA graph's replay does to them. Counts recordings and replays."""

    recorded = 0  # over every instance: the Trainer makes its own
    replays = 0

    def __call__(self, fn: Callable):
        RerunRecorder.recorded += 1
        outputs = fn()

        def replay():
            RerunRecorder.replays += 1
            loss, grads = fn()
            outputs[0].detach().copy_(loss.detach())
            for old, new in zip(outputs[1], grads):
                if old is not None:
                    old.copy_(new)

        return replay, outputs


def patch_the_triton_language_once_per_module_and_launch() -> None:
    """For tests (test speed only). Under the interpreter triton (3.7-3.9) patches triton.language again at every
    call of a @triton.jit helper inside a kernel: inspect.getmembers over four modules, ~0.3 ms a
    call, a third of our kernels' interpreted time. The launch has already patched it; repeating it
    changes nothing (the members are patched already). So inside a launch each module's helpers
    patch it once. Nothing without TRITON_INTERPRET=1, or where the interpreter is not shaped as
    expected."""
    import os
    import threading

    if os.environ.get("TRITON_INTERPRET") != "1":
        return

    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "once_per_launch", False):
        return
    local = threading.local()

    class AlreadyPatched:
        def restore(self) -> None:
            pass

    def patch_lang(fn):
        patched = getattr(local, "patched", None)  # the modules patched in the running launch
        module = id(getattr(fn, "__globals__", None))
        if patched is not None and module in patched:
            return AlreadyPatched()
        scope = original(fn)
        if patched is not None:  # a helper from another module, inside the launch
            patched.add(module)
            return scope
        local.patched = {module}  # a launch: its restore() ends it
        restore = scope.restore

        def restore_and_end_the_launch() -> None:
            local.patched = None
            restore()

        scope.restore = restore_and_end_the_launch
        return scope

    patch_lang.once_per_launch = True
    interpreter._patch_lang = patch_lang
