"""The cross-entropy row kernel as a custom op (`rwkv_ft.kernels.custom_ops` describes the pattern):

    torch.ops.rwkv_ft.cross_entropy_rows(logits, targets, with_grad, num_classes)
        -> loss (N,), grad (N, W) or absent      (logits: (N, W), the first num_classes columns scored)

No autograd formula: the gradient is an output (the caller, `rwkv_ft.models.loss`, computes it with
the loss, as the loss is the last thing of the forward). Triton is imported when the kernel first runs.
"""

from __future__ import annotations

import torch

from rwkv_ft.kernels.custom_ops import absent, kernel_op


def _fake(logits, targets, with_grad, num_classes):
    N, W = logits.shape
    loss = logits.new_empty(N, dtype=torch.promote_types(logits.dtype, torch.float32))
    return loss, logits.new_empty(N, W) if with_grad else absent(logits)


@kernel_op("cross_entropy_rows", fake=_fake)
def cross_entropy_rows_op(
    logits: torch.Tensor, targets: torch.Tensor, with_grad: bool, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_cross_entropy import cross_entropy_rows_fwd

    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    loss, grad = cross_entropy_rows_fwd(logits, targets.long().contiguous(), with_grad, num_classes)
    return loss, absent(logits) if grad is None else grad
