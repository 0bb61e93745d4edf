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


class FastLoraLinear(LoraLinear):
    """peft's LoRA Linear with the fast forward above (state dict, merging, saving: peft's own)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not self._fast_path_applies(x):
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        rows = x.reshape(-1, x.shape[-1])  # (N, in)
        lora = None  # (N, out): the active adapters' terms, summed
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            # Under autocast x may be fp32 here: F.linear, mm and addmm then cast everything to its dtype.
            a = self.lora_A[name].weight.to(x.dtype)  # (r, in)
            b = (self.lora_B[name].weight * self.scaling[name]).to(x.dtype)  # (out, r)
            xa = F.linear(self.lora_dropout[name](rows), a)  # (N, r)
            lora = torch.mm(xa, b.t()) if lora is None else torch.addmm(lora, xa, b.t())
        if lora is None:
            return base(x)
        if base.bias is not None:
            lora = lora + base.bias.to(lora.dtype)
        return torch.addmm(lora, rows, base.weight.t()).view(*x.shape[:-1], -1)  # (..., out)

    def _fast_path_applies(self, x: torch.Tensor) -> bool:
        if self.disable_adapters or self.merged or not isinstance(self.base_layer, nn.Linear):
            return False
        if x.dtype == torch.float16 and not torch.is_autocast_enabled(x.device.type):
            return False
        variants = getattr(self, "lora_variant", {})
        for name in self.active_adapters:
            if name in variants or self.use_dora.get(name, False) or getattr(self, "lora_bias", {}).get(name, False):
                return False
        return True


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
