"""Public entry point of the cross-entropy row operator: validation and backend dispatch."""

from __future__ import annotations

import torch

from .ops import cross_entropy_rows_op
from .reference import cross_entropy_rows_reference

_BACKENDS = ("auto", "triton", "torch")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    with_grad: bool = False,
    num_classes: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy of each row of logits against its target, and optionally its gradient.

    Args:
        logits: (N, W) fp32, bf16, fp16 or fp64; any row stride.
        targets: (N,) integer class indices; `IGNORE_INDEX` (-100) marks a row that is not scored.
        with_grad: also return the gradient of the losses' sum with respect to the logits.
        num_classes: V, the classes are the first V columns (default: all W). The others are
            padding (a head padded to a multiple of 64 rows keeps its matmuls aligned): they take no
            part in the softmax and get gradient 0.
        backend: "auto", "triton" or "torch".

    Returns:
        loss: (N,) fp32 (fp64 for fp64 logits): logsumexp(row[:V]) - row[target], 0 on ignored rows,
            NaN where a target lies outside [0, V) (so a bad label stops training at the NaN check
            instead of reading out of bounds; no host synchronisation).
        grad: (N, W) in logits' dtype, softmax(row[:V]) - onehot(target) then zeros (zero rows where
            ignored), or None.

    Not differentiable itself: the gradient is computed here, with the loss. "auto" runs Triton on
    CUDA tensors (and the op's shape-only implementation on meta tensors) and the reference
    otherwise; "triton" on CPU tensors needs TRITON_INTERPRET=1 (set before triton is imported).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"cross_entropy_rows: backend must be one of {_BACKENDS}, got {backend!r}")
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy_rows: logits must be (N, V), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy_rows: targets must be (N,) = ({logits.shape[0]},), got shape {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"cross_entropy_rows: targets must be integer class indices, got {targets.dtype}")
    V = logits.shape[1] if num_classes is None else num_classes
    if not 1 <= V <= logits.shape[1]:
        raise ValueError(f"cross_entropy_rows: num_classes must be in [1, {logits.shape[1]}], got {num_classes}")
    if targets.device != logits.device:
        raise ValueError(f"cross_entropy_rows: targets on {targets.device}, logits on {logits.device}")
    use_kernel = backend == "triton" or (backend == "auto" and logits.dtype in _KERNEL_DTYPES and _on_gpu(logits))
    if not use_kernel:
        return cross_entropy_rows_reference(logits, targets, with_grad, V)
    loss, grad = cross_entropy_rows_op(logits, targets, with_grad, V)
    return loss, grad if with_grad else None


def _on_gpu(logits: torch.Tensor) -> bool:
    """ "auto" runs the kernel on CUDA (and its shape-only implementation on meta tensors), never on
    the CPU, even under TRITON_INTERPRET=1: interpreted, one call at a 65,536-word vocabulary takes
    ~1 s, and the model's loss would call it at every training step of every CPU test. Tests of the
    kernel name backend="triton"."""
    return logits.is_cuda or logits.is_meta
