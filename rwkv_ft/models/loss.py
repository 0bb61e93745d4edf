"""The language-model head and its cross-entropy, a block of rows at a time: the B x T x V logits
(1 GiB in fp32 for 4 x 1024 tokens of a 65,536-token vocabulary, and as much again for their
gradient) never exist at once.

The loss is the last thing the forward computes, so its gradient is computed there too: each
block's logits go through one kernel that gives the rows' losses and softmax - onehot
(`rwkv_ft.kernels.cross_entropy`), which is multiplied into the hidden states' (and, for a trained
head, the head's) gradient at once. The backward only scales those by the incoming gradient: the
logits are computed once per step, not again in the backward.
"""

from __future__ import annotations

import torch

from rwkv_ft.kernels.cross_entropy import IGNORE_INDEX, cross_entropy_rows

# The head is padded with zero rows to a multiple of this inside the loss: a vocabulary such as
# 50,277 (RWKV-4 Pile, NeoX tokenizer) leaves the (rows, V) logits' row stride unaligned for cuBLAS.
# Unpadded, the loss took 15.0 ms at V = 50,277 against 3.8 ms at 65,536 (H100, 4,096 rows, C 2,048;
# benchmarks/NOTES.md). The padding costs a copy of the head per forward.
VOCAB_ALIGN = 64


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    # Each block of rows holds its (rows, V) logits and their gradient in the activations' dtype:
    # at 1,024 rows and V = 65,536 in bf16, 0.25 GiB.
    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, need_hidden, need_weight, backend):
        # hidden: (N, C); weight: (V, C); targets: (N,) with IGNORE_INDEX where not scored
        V = weight.shape[0]
        padded = weight if V % VOCAB_ALIGN == 0 else torch.nn.functional.pad(weight, (0, 0, 0, -V % VOCAB_ALIGN))
        # padded: (W, C), zero rows past V
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None  # (W, C) fp32 once the first block adds to it
        for begin in range(0, hidden.shape[0], rows):
            part = slice(begin, begin + rows)
            logits = hidden[part] @ padded.t()  # (rows, W)
            loss_rows, grad_logits = cross_entropy_rows(
                logits, targets[part], with_grad=need_hidden or need_weight, num_classes=V, backend=backend
            )  # grad_logits: (rows, W), 0 past V
            del logits
            total += loss_rows.sum()
            if need_hidden:
                grad_hidden[part] = grad_logits @ padded  # (rows, C)
            if need_weight:
                grad_weight = _add_product_fp32(grad_weight, grad_logits.t(), hidden[part])  # (W, C)
        if need_weight and grad_weight is None:  # no rows
            grad_weight = padded.new_zeros(padded.shape, dtype=torch.float32)
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight[:V])
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:  # scaled in fp32: the scale (1 / tokens, typically) is not rounded
            grad_hidden = (grad_hidden.float() * grad_total).to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = _scaled_to(grad_weight, grad_total, ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _scaled_to(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(x * scale).to(dtype), x and scale fp32, in one pass: the product is rounded to dtype as it is
    written, never held in fp32 (for a trained head's (V, C) gradient, 1 GiB at V = 65,536 and C =
    4,096). Out= takes no part in autograd, so a double backward (grad mode on) takes the two steps."""
    if dtype == x.dtype or torch.is_grad_enabled():
        return (x * scale).to(dtype)
    return torch.mul(x, scale, out=torch.empty(x.shape, dtype=dtype, device=x.device))


def _add_product_fp32(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a @ b in fp32, in place into acc (None: a @ b alone). Half inputs on CUDA: one
    tensor-core matmul with an fp32 output (not fp32 copies of both and an fp32 matmul: the head's
    gradient for 4,096 rows in 8.6 ms instead of 28.8 on an H100)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        product = torch.mm(a, b, out_dtype=torch.float32)
    else:
        product = a.float() @ b.float()
    return product if acc is None else acc.add_(product)


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.LongTensor,
    *,
    rows: int = 1024,
    backend: str = "auto",
) -> torch.Tensor:
    """sum over scored rows of cross_entropy(hidden @ weight.T, targets), fp32, `rows` rows at a time.
    hidden: (..., C); targets: (...) aligned with hidden's rows, -100 where not scored. `backend`
    is the cross-entropy kernel's (`rwkv_ft.kernels.cross_entropy_rows`). The gradients are
    computed in this forward when autograd will need them."""
    grad_on = torch.is_grad_enabled()
    return _ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets.reshape(-1),
        rows,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        backend,
    )


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.LongTensor,
    *,
    rows: int = 1024,
    num_items_in_batch: torch.Tensor | int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal-LM cross-entropy of `hidden @ weight.T` against `labels` shifted by one, as
    transformers' ForCausalLMLoss computes it (mean over scored tokens, or sum / num_items_in_batch),
    `rows` rows of logits at a time. hidden: (B, T, C); weight: (V, C); labels: (B, T), -100 ignored."""
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)  # (B*T,)
    total = linear_cross_entropy_sum(hidden, weight, targets, rows=rows, backend=backend)
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / (targets != IGNORE_INDEX).sum().clamp_min(1)
