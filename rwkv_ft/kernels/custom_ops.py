"""Kernels as `torch.library` custom ops: one pattern for every Triton kernel of rwkv_ft.

Why: `torch.compile` cannot see inside a Triton launcher with host-side logic (config choice,
workspace allocation, atomics) and an `autograd.Function` around it breaks the graph. A custom op is
opaque to dynamo and AOTAutograd: the compiled graph calls it like an aten op, its fake
implementation gives the output shapes while tracing (and serves meta tensors), and the autograd
formula registered for it calls a second op, the backward kernel. Model code calls a plain function;
nothing else changes.

The pattern (see `kernels/rwkv4/ops.py` for a complete example):

    @kernel_op("wkvN_forward", fake=_forward_fake)          # torch.ops.rwkv_ft.wkvN_forward
    def wkvN_forward(x: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        from .triton_wkvN import launch_forward             # triton is imported on first use only
        return launch_forward(x, state)                     # (y, new_state, saved for backward)

    @kernel_op("wkvN_backward", fake=_backward_fake)
    def wkvN_backward(...) -> tuple[Tensor, ...]: ...

    register_backward(wkvN_forward, _backward, _setup_context, aux_outputs=(2,))

Rules a kernel op follows:
- no output aliases an input or another output (return a fresh tensor, or `absent()`);
- an input or output that may be missing is `Tensor | None` on input and `absent()` (a 0-element
  tensor) on output: custom ops cannot return None; `optional()` turns it back;
- outputs that only exist for the backward (workspaces, fp32 copies, indices) are listed in
  `aux_outputs`: they are marked non-differentiable and the backward never sees their gradients;
- the implementation runs on any device its kernel runs on (CUDA, or CPU under
  `TRITON_INTERPRET=1` in tests), so `torch.library.opcheck` can check the registration on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

NAMESPACE = "rwkv_ft"
# Ops whose outputs selective recompute keeps (`kernel_op(..., keep_outputs=True)`): kernels slow to
# run again for their outputs' size. The others (like the WKV-4 forward: 0.06 ms per layer for 5
# bytes of outputs per element) are recomputed in the backward like elementwise work.
KEPT_BY_SELECTIVE_RECOMPUTE: set[Any] = set()


def kernel_op(
    name: str, *, fake: Callable[..., Any], keep_outputs: bool = False
) -> Callable[[Callable[..., Any]], Any]:
    """Decorator: the function becomes the custom op `torch.ops.rwkv_ft.<name>` (schema inferred from
    its type hints, no input mutated) with `fake` as its fake / meta implementation. `keep_outputs`:
    selective recompute keeps its outputs instead of running it again in the backward."""

    def define(fn: Callable[..., Any]):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        if keep_outputs:
            KEPT_BY_SELECTIVE_RECOMPUTE.add(getattr(getattr(torch.ops, NAMESPACE), name).default)
        return op

    return define


def register_backward(
    op,
    backward: Callable[..., tuple[torch.Tensor | None, ...]],
    setup_context: Callable[[Any, tuple, tuple], None],
    *,
    aux_outputs: Sequence[int] = (),
) -> None:
    """Make `op` differentiable. `setup_context(ctx, inputs, outputs)` saves what the backward needs;
    `backward(ctx, *grads)` gets the gradients of the outputs not in `aux_outputs` (None where an
    output was unused: gradients are not materialised) and returns one gradient (or None) per input."""
    aux = frozenset(aux_outputs)

    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        if aux:
            ctx.mark_non_differentiable(*(output[i] for i in sorted(aux)))
        setup_context(ctx, inputs, output)

    def backward_primary(ctx, *grads):
        return backward(ctx, *(g for i, g in enumerate(grads) if i not in aux))

    op.register_autograd(backward_primary, setup_context=setup)


def absent(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The stand-in for a missing output: a 0-element tensor on `like`'s device."""
    return like.new_empty(0, dtype=dtype or like.dtype)


def optional(t: torch.Tensor | None) -> torch.Tensor | None:
    """None for `absent()` (or None), else `t`."""
    return None if t is None or t.numel() == 0 else t


def runs_kernel(x: torch.Tensor) -> bool:
    """Whether a kernel op can take `x`: CUDA, meta (the fake implementation answers: shape-only
    tools such as memory estimates), or CPU under the Triton interpreter."""
    import os

    return x.is_cuda or x.is_meta or os.environ.get("TRITON_INTERPRET") == "1"
