"""Shared numerical comparison for tests: one tolerance table, one assert."""

from __future__ import annotations

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
        if name.endswith("time_decay"):
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


# Every model version the shared tests (generation, padding, packing, adapters) run on.
MODEL_FACTORIES = {"rwkv4": tiny_rwkv4}
