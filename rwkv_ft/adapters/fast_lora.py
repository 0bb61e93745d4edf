"""LoRA computed in the activations' dtype, with fp32 master weights.

peft keeps a LoRA adapter's weights in fp32 when the base is bf16 (`autocast_adapter_dtype`), which
is right for the optimizer, and then computes the adapter in fp32 too: each adapted Linear copies its
input to fp32, runs two fp32 matmuls, scales and adds an fp32 (B, T, out) tensor to the bf16 base
output and casts the sum back. On a 1.6B RWKV-4 LoRA step that is ~25 ms of fp32 GEMMs and most of
~55 ms of copies and elementwise work, against ~29 ms of base matmuls (H200 profile, issue 11).

`enable_fast_lora(model)` switches every plain LoRA Linear of a peft model to this forward:

    lora = (dropout(x) @ A^T) @ (scaling * B)^T     A, B cast to x's dtype per call
    out  = addmm(lora, x, W^T)                      the base product added onto the LoRA term

The base product comes last so that the adapted Linear's output is one op: selective recompute
(`rwkv_ft.models.modeling_utils`) keeps the outputs of products over a large inner dimension, so
it keeps `out` itself and recomputes nothing of the Linear in the backward. (With the LoRA term
added last, it kept the base product and ran the addition again, with its copy, for every adapted
Linear: measured on an H100 under CUDA graphs, the RWKV-4 1.6B step went from 84.0 to 78.4 ms and
the RWKV-7 1.5B one from 139.1 to 133.2 ms, batch 4, ctx 1024.)

With one adapter, no bias and no autocast (how `rwkv-ft train` runs bf16 LoRA), the second line is
the custom op `linear_plus_low_rank`, which accumulates the base product onto the LoRA term in
place. As a plain `addmm` under torch.compile the product goes to a new tensor, into which the
LoRA term is first copied: one device-to-device copy of every adapted Linear's output, in the
forward and in every recompute (H100, 2026-12-06: without those copies the RWKV-4 1.6B step runs
1.03x as fast, 7.6B with whole-block checkpointing 1.03x, RWKV-7 1.5B 1.02x).

Numerically (bf16 activations): A and scaling*B are rounded to bf16 (relative 2^-9) for the
product, x @ A^T and the LoRA term are rounded to bf16, and the base product is accumulated onto
the LoRA term in fp32 before the one rounding of the output to bf16 (peft rounds the base output
and an fp32 LoRA term's sum, i.e. rounds the large base output twice). In the backward
the adapters' gradients come out of bf16 matmuls (fp32 accumulation), rounded to bf16, then
accumulated into the fp32 `.grad`: exactly what bf16 autocast does with peft's layers. The optimizer
still updates fp32 weights, and a saved adapter is unchanged in format. With fp32 activations the
math is peft's up to the scaling's association (fp32 rounding).

Only vanilla LoRA on `nn.Linear` bases takes this path; DoRA and the other variants, lora_bias,
mixed-adapter batches (`adapter_names=`), fp16 activations outside autocast (fp16 gradients would
need loss scaling), merged or disabled adapters and quantized bases keep peft's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from rwkv_ft.kernels.custom_ops import kernel_op, register_backward


def _linear_plus_low_rank_fake(x, weight, xa, b):
    return x.new_empty(x.shape[0], weight.shape[0])


@kernel_op("linear_plus_low_rank", fake=_linear_plus_low_rank_fake, keep_outputs=True)
def _linear_plus_low_rank_op(x: torch.Tensor, weight: torch.Tensor, xa: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.mm(xa, b.t())  # (N, out): the LoRA term
    return out.addmm_(x, weight.t())  # in place: addmm into a new tensor first copies the term there


def _linear_plus_low_rank_setup(ctx, inputs, output):
    x, weight, xa, b = inputs
    need_x, need_weight, need_xa, need_b = ctx.needs_input_grad[:4]
    ctx.save_for_backward(
        x if need_weight else None, weight if need_x else None, xa if need_b else None, b if need_xa else None
    )


def _linear_plus_low_rank_backward(ctx, grad):
    if grad is None:
        return None, None, None, None
    x, weight, xa, b = ctx.saved_tensors
    need_x, need_weight, need_xa, need_b = ctx.needs_input_grad[:4]
    return (
        grad @ weight if need_x else None,  # (N, in)
        grad.t() @ x if need_weight else None,  # (out, in)
        grad @ b if need_xa else None,  # (N, r)
        grad.t() @ xa if need_b else None,  # (out, r)
    )


register_backward(_linear_plus_low_rank_op, _linear_plus_low_rank_backward, _linear_plus_low_rank_setup)


def linear_plus_low_rank(x: torch.Tensor, weight: torch.Tensor, xa: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x @ weight.T + xa @ b.T: an adapted Linear's output (weight: the base's (out, in); xa: (N, r),
    the input times A; b: (out, r), B times the scaling), all in one dtype, x: (N, in).

    One op so that the base product is accumulated onto the LoRA term in place. As plain ops under
    torch.compile, `addmm(term, x, weight.T)` writes a new tensor, so the term is first copied into
    it (a device-to-device copy of every adapted Linear's output, in the forward and in every
    recompute: 448 copies, 3.1 ms of a 96 ms RWKV-4 7.6B step on an H100). Selective recompute
    keeps its output (`keep_outputs`), as it kept the addmm's."""
    return _linear_plus_low_rank_op(x, weight, xa, b)


class FastLoraLinear(LoraLinear):
    """peft's LoRA Linear with the fast forward above (state dict, merging, saving: peft's own)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not self._fast_path_applies(x):
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        active = [name for name in self.active_adapters if name in self.lora_A]
        if not active:
            return base(x)
        rows = x.reshape(-1, x.shape[-1])  # (N, in)
        out_shape = (*x.shape[:-1], -1)
        if len(active) == 1 and base.bias is None and x.dtype == base.weight.dtype and not _autocast_on(x):
            # the common case as one op (a custom op would not follow autocast, hence the condition)
            return linear_plus_low_rank(rows, base.weight, *self._low_rank_factors(active[0], rows)).view(out_shape)
        lora = None  # (N, out): the active adapters' terms, summed
        for name in active:
            xa, b = self._low_rank_factors(name, rows)
            lora = torch.mm(xa, b.t()) if lora is None else torch.addmm(lora, xa, b.t())
        if base.bias is not None:
            lora = lora + base.bias.to(lora.dtype)
        return torch.addmm(lora, rows, base.weight.t()).view(out_shape)  # (..., out)

    def _low_rank_factors(self, name: str, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dropout(rows) @ A^T, scaling * B) of adapter `name` in rows' dtype: (N, r), (out, r). Under
        autocast rows may be fp32 here: F.linear, mm and addmm then cast everything to its dtype."""
        a = self.lora_A[name].weight.to(rows.dtype)  # (r, in)
        b = (self.lora_B[name].weight * self.scaling[name]).to(rows.dtype)  # (out, r)
        return F.linear(self.lora_dropout[name](rows), a), b

    def _fast_path_applies(self, x: torch.Tensor) -> bool:
        if self.disable_adapters or self.merged or not isinstance(self.base_layer, nn.Linear):
            return False
        if x.dtype == torch.float16 and not _autocast_on(x):
            return False
        variants = getattr(self, "lora_variant", {})
        for name in self.active_adapters:
            if name in variants or self.use_dora.get(name, False) or getattr(self, "lora_bias", {}).get(name, False):
                return False
        return True


def _autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device; never on meta, which has no autocast to ask (and
    `torch.amp.is_autocast_available` would break a fullgraph compile)."""
    return x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)


def enable_fast_lora(model: nn.Module) -> int:
    """Switch every plain LoRA Linear inside `model` to `FastLoraLinear`; returns how many."""
    return _switch_class(model, LoraLinear, FastLoraLinear)


def disable_fast_lora(model: nn.Module) -> int:
    """Back to peft's forward everywhere; returns how many layers changed."""
    return _switch_class(model, FastLoraLinear, LoraLinear)


def _switch_class(model: nn.Module, old: type, new: type) -> int:
    """Give every module of exactly class `old` inside `model` the class `new`; returns how many."""
    modules = [module for module in model.modules() if type(module) is old]
    for module in modules:
        module.__class__ = new
    return len(modules)
