"""bitsandbytes 8-bit and 4-bit loading of RWKV-4 models, the standard transformers way.

`AutoModelForCausalLM.from_pretrained(dir, quantization_config=BitsAndBytesConfig(...))` works on
our directories unchanged: transformers swaps every `nn.Linear` except the head (the output
embedding, which it never quantizes; we also name it in `llm_int8_skip_modules` to be explicit)
for `Linear8bitLt` / `Linear4bit`. That is the att and ffn key/value/receptance and att output of
every block. The embedding (an `nn.Embedding`), the layer norms and the time_* vectors are not
Linear layers and keep their dtype; time_decay/time_first stay fp32 in any case.

CPU (bitsandbytes >= 0.49): 8-bit, NF4 and FP4, with or without double quantization, forward and
backward (LoRA on top trains) all run on CPU. 8-bit matmuls cast their inputs to fp16 on CPU.

Measured logits error against the fp32 model (random weights scaled like a trained model, C=128,
L=2, V=97; relative Frobenius norm over all logits), which tests/test_quantization.py bounds:
8-bit ~1.1e-2, NF4 (double quant, bf16 compute) ~9e-2, FP4 ~1.3e-1. This is the weight rounding
itself (4-bit codes keep ~3 significant bits), not a bug; LoRA training on top absorbs it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig

QUANT_MODES = ("int8", "nf4", "fp4")  # "8bit" is accepted as another name for int8
# Never quantized: the head's rows are the output distribution and it is a small share of the weights.
SKIP_MODULES = ["head"]


def bnb_config(
    mode: str,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    skip_modules: list[str] | None = None,
) -> BitsAndBytesConfig:
    """The BitsAndBytesConfig for `mode` ("int8" (or "8bit"), "nf4" or "fp4").

    Args:
        compute_dtype: dtype 4-bit layers dequantize to for their matmul (bf16 is the usual choice).
        double_quant: also quantize the 4-bit blocks' scales (saves ~0.4 bit per weight).
        skip_modules: modules left unquantized (default: the head).
    """
    skip = list(SKIP_MODULES if skip_modules is None else skip_modules)
    if mode in ("int8", "8bit"):
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if mode in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=mode,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    raise ValueError(f"quantization mode must be one of {', '.join(QUANT_MODES)}, got {mode!r}")


def load_quantized(
    model_dir: str | os.PathLike,
    mode: str,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    dtype: torch.dtype | str = "auto",
    device_map: str | dict | None = None,
) -> nn.Module:
    """Load one of our model directories with its Linear layers quantized by bitsandbytes.

    `dtype` is the dtype of everything left unquantized ("auto": as saved). Same as calling
    `AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config(mode), ...)`.
    """
    from transformers import AutoModelForCausalLM

    import rwkv_ft  # noqa: F401  (registers the Auto classes)

    config = bnb_config(mode, compute_dtype=compute_dtype, double_quant=double_quant)
    kwargs: dict[str, Any] = {"quantization_config": config, "dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def quantized_linear_names(model: nn.Module) -> list[str]:
    """Names of the modules bitsandbytes replaced (Linear8bitLt / Linear4bit)."""
    import bitsandbytes as bnb

    return [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]


def quantization_info(model: nn.Module) -> dict[str, Any] | None:
    """The quantization config of a loaded model as a plain dict (for rwkv_ft_adapter.json), or None."""
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    info = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    keep = (
        "quant_method",
        "load_in_8bit",
        "load_in_4bit",
        "bnb_4bit_quant_type",
        "bnb_4bit_use_double_quant",
        "bnb_4bit_compute_dtype",
        "llm_int8_threshold",
        "llm_int8_skip_modules",
    )
    return {k: _plain(info[k]) for k in keep if k in info}


def _plain(value: Any) -> Any:
    """A JSON-friendly copy: dtypes as their name, enums as their value."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return getattr(value, "value", value)


def prepare_for_kbit_training(
    model: nn.Module, *, gradient_checkpointing: bool = False, frozen_dtype: torch.dtype | None = torch.bfloat16
) -> nn.Module:
    """peft's `prepare_model_for_kbit_training`, then the frozen embedding and head back to `frozen_dtype`.

    peft upcasts every weight that is not quantized to fp32 so that what is trained on top of it is
    stable. The embedding and the head are frozen and are 2 x V x C weights: in fp32 they are about a
    quarter of a 4-bit 7B model's memory, for nothing. Pass frozen_dtype=None to keep peft's fp32.
    """
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    if frozen_dtype is not None:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if not any(p.requires_grad for p in module.parameters()):
                module.to(frozen_dtype)
    return model
