"""RWKV-7 ("Goose", x070): configuration, model and conversion. The model classes are imported on first use."""

from __future__ import annotations

import importlib
from typing import Any

from .configuration_rwkv7 import Rwkv7Config

_MODELING = "rwkv_ft.models.rwkv7.modeling_rwkv7"
_LAZY = ("Rwkv7ForCausalLM", "Rwkv7Model", "Rwkv7PreTrainedModel")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_MODELING), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Rwkv7Config", *_LAZY]
