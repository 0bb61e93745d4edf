"""Plain-PyTorch cross-entropy over rows of logits: the reference the Triton kernel is tested
against, and the CPU path. Arithmetic in fp32 (fp64 for fp64 logits)."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def cross_entropy_rows_reference(
    logits: torch.Tensor, targets: torch.Tensor, with_grad: bool = False, num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """See `cross_entropy_rows`: per-row losses (fp32, or fp64 for fp64 logits) and, with
    `with_grad`, the gradient of their sum with respect to the logits, in the logits' dtype."""
    W = logits.shape[-1]
    V = W if num_classes is None else num_classes
    x = logits[:, :V].to(torch.promote_types(logits.dtype, torch.float32))  # (N, V)
    scored = targets != IGNORE_INDEX
    in_range = (targets >= 0) & (targets < V)
    index = targets.clamp(0, V - 1).unsqueeze(1)  # (N, 1)
    lse = torch.logsumexp(x, dim=-1)  # (N,)
    picked = x.gather(1, index).squeeze(1)
    nan = torch.full_like(lse, float("nan"))
    loss = torch.where(scored, torch.where(in_range, lse - picked, nan), torch.zeros_like(lse))
    if not with_grad:
        return loss, None
    grad = torch.exp(x - lse.unsqueeze(1))  # softmax
    grad.scatter_add_(1, index, -in_range.to(grad.dtype).unsqueeze(1))
    grad = torch.where(scored.unsqueeze(1), grad, 0.0)  # an ignored row: 0, whatever its logits
    return loss, torch.nn.functional.pad(grad, (0, W - V)).to(logits.dtype)  # (N, W): 0 past the classes
