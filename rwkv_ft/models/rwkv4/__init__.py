"""RWKV-4: configuration, model and conversion. The model classes are imported on first use."""

from __future__ import annotations

import importlib
from typing import Any

from .configuration_rwkv4 import Rwkv4Config

_MODELING = "rwkv_ft.models.rwkv4.modeling_rwkv4"
_LAZY = ("Rwkv4CausalLMOutput", "Rwkv4ForCausalLM", "Rwkv4Model", "Rwkv4PreTrainedModel")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_MODELING), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Rwkv4Config", *_LAZY]
