"""Shared helpers for tests: one tolerance table and one assert, tiny models, a free port."""

from __future__ import annotations

import socket

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
