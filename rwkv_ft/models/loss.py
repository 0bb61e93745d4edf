"""The language-model head and its cross-entropy, a block of rows at a time: the B x T x V logits
(1 GiB in fp32 for 4 x 1024 tokens of a 65,536-token vocabulary, and as much again for their
gradient) never exist at once. The backward recomputes each block's logits from the saved hidden
states, so the saving costs one extra head matmul per step.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    # Each block of rows holds its (rows, V) logits twice at most (the matmul's output and one fp32
    # buffer, worked on in place): at 1,024 rows and V = 65,536, 0.75 GiB.
    @staticmethod
    def forward(ctx, hidden, weight, targets, rows):
        # hidden: (N, C); weight: (V, C); targets: (N,) with IGNORE_INDEX where not scored
        lse = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        total = hidden.new_zeros((), dtype=torch.float32)
        for begin in range(0, hidden.shape[0], rows):
            part = slice(begin, begin + rows)
            logits = (hidden[part] @ weight.t()).float()  # (rows, V)
            lse[part] = torch.logsumexp(logits, dim=-1)
            t = targets[part]
            scored = t != IGNORE_INDEX
            picked = logits.gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1)
            del logits
            total += torch.where(scored, lse[part] - picked, 0.0).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.rows = rows
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        for begin in range(0, hidden.shape[0], ctx.rows):
            part = slice(begin, begin + ctx.rows)
            t = targets[part]
            scored = (t != IGNORE_INDEX).unsqueeze(1)
            probs = (hidden[part] @ weight.t()).float()  # (rows, V) logits, then in place: the softmax
            probs.sub_(lse[part].unsqueeze(1)).exp_()
            probs.scatter_add_(1, t.clamp_min(0).unsqueeze(1), -scored.float())
            grad_logits = probs.mul_(scored * grad_total).to(hidden.dtype)  # (rows, V)
            del probs
            if need_hidden:
                grad_hidden[part] = grad_logits @ weight
            if need_weight:
                grad_weight += grad_logits.t().float() @ hidden[part].float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.LongTensor, *, rows: int = 1024
) -> torch.Tensor:
    """sum over scored rows of cross_entropy(hidden @ weight.T, targets), fp32, `rows` rows at a time.
    hidden: (..., C); targets: (...) aligned with hidden's rows, -100 where not scored."""
    return _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), rows)


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.LongTensor,
    *,
    rows: int = 1024,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Causal-LM cross-entropy of `hidden @ weight.T` against `labels` shifted by one, as
    transformers' ForCausalLMLoss computes it (mean over scored tokens, or sum / num_items_in_batch),
    `rows` rows of logits at a time. hidden: (B, T, C); weight: (V, C); labels: (B, T), -100 ignored."""
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)  # (B*T,)
    total = linear_cross_entropy_sum(hidden, weight, targets, rows=rows)
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / (targets != IGNORE_INDEX).sum().clamp_min(1)
