"""Every Triton launch pins the options whose defaults Triton changes between releases, and the
WKV-7 rule's register cap reaches the compiler (CPU interpreter in CI, or CUDA)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels (see conftest.py)

import pytest
import rwkv_ft.kernels.cross_entropy.triton_cross_entropy as tce
import rwkv_ft.kernels.rwkv4.triton_wkv4 as tw4
import rwkv_ft.kernels.rwkv7.triton_wkv7 as tw7
import torch

from rwkv_ft.kernels import cross_entropy_rows, wkv4, wkv7
from rwkv_ft.kernels.launch_options import FIXED_LAUNCH_OPTIONS, register_cap

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_fp_fusion_is_pinned_on():
    # Triton 3.10 turns contraction off by default; the kernels were measured with it on.
    assert FIXED_LAUNCH_OPTIONS["enable_fp_fusion"] is True


class LaunchSpy:
    """Stands in for a @triton.jit kernel: records each launch's keyword options, then launches."""

    def __init__(self, kernel, seen: list[tuple[str, dict]], name: str):
        self.kernel, self.seen, self.name = kernel, seen, name

    def __getitem__(self, grid):
        def launch(*args, **options):
            self.seen.append((self.name, options))
            return self.kernel[grid](*args, **options)

        return launch


def spy_on(monkeypatch, module, names: list[str]) -> list[tuple[str, dict]]:
    seen: list[tuple[str, dict]] = []
    for name in names:
        monkeypatch.setattr(module, name, LaunchSpy(getattr(module, name), seen, name))
    return seen


def backward_through(y: torch.Tensor, state: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    (y.float().sum() + state.sum()).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in inputs)


def test_wkv7_launches_pin_options_and_cap_prep_registers(monkeypatch):
    seen = spy_on(monkeypatch, tw7, ["_prep_kernel", "_scan_fwd_kernel", "_scan_bwd_kernel", "_grad_kernel"])
    g = torch.Generator().manual_seed(0)
    B, T, H, N = 1, 20, 1, 64
    x = lambda scale=1.0: (torch.randn(B, T, H, N, generator=g) * scale).to(DEV)  # noqa: E731
    kk = torch.nn.functional.normalize(x(), dim=-1)
    inputs = [x(), -torch.rand(B, T, H, N, generator=g).to(DEV) * 0.5, x(0.5), x(), -kk, kk * 0.5]
    inputs = [t.requires_grad_() for t in inputs]
    y, state = wkv7(*inputs, backend="triton")
    backward_through(y, state, inputs)
    assert {name for name, _ in seen} == {"_prep_kernel", "_scan_fwd_kernel", "_scan_bwd_kernel", "_grad_kernel"}
    cap = tw7._config(B, T, H, N, torch.float32).regs_prep
    assert cap is not None  # the rule caps prep at N = 64
    for name, options in seen:
        assert options.items() >= FIXED_LAUNCH_OPTIONS.items(), name
        assert options.get("maxnreg") == (register_cap(cap).get("maxnreg") if name == "_prep_kernel" else None), name


def test_wkv4_launches_pin_options(monkeypatch):
    seen = spy_on(monkeypatch, tw4, ["_fwd_fused", "_bwd_fused"])
    g = torch.Generator().manual_seed(0)
    B, T, C = 1, 20, 8
    k, v = (torch.randn(B, T, C, generator=g).to(DEV).requires_grad_() for _ in range(2))
    decay, first = (torch.randn(C, generator=g).to(DEV).requires_grad_() for _ in range(2))
    y, state = wkv4(decay, first, k, v, backend="triton")
    backward_through(y, state, [k, v, decay, first])
    assert [name for name, _ in seen] == ["_fwd_fused", "_bwd_fused"]
    for name, options in seen:
        assert options.items() >= FIXED_LAUNCH_OPTIONS.items(), name


def test_cross_entropy_launch_pins_options(monkeypatch):
    seen = spy_on(monkeypatch, tce, ["_rows_kernel"])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=g).to(DEV)
    cross_entropy_rows(logits, torch.arange(5).to(DEV), with_grad=True, backend="triton")
    assert [name for name, _ in seen] == ["_rows_kernel"]
    assert seen[0][1].items() >= FIXED_LAUNCH_OPTIONS.items()
