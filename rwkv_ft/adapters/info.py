"""`rwkv_ft_adapter.json`: what an adapter was trained on, written beside it at training time.

peft's `adapter_config.json` names the base model but not how it was loaded. The merge needs to
know whether training saw an 8-/4-bit base (it then still folds the adapter into the original
full-precision weights, and says so), and the Hub model card reports it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from rwkv_ft.io import read_json_object, write_json_atomically

ADAPTER_INFO_FILE = "rwkv_ft_adapter.json"
ADAPTER_INFO_VERSION = 1


def describe_adapters(model: torch.nn.Module) -> dict[str, Any]:
    """{"lora": {...peft config...}, "state_tuning": {...}} for what is attached to `model`."""
    from rwkv_ft.adapters.state_tuning import find_initial_state

    found: dict[str, Any] = {}
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        active = getattr(model, "active_adapter", None) or next(iter(peft_config))
        active = active if isinstance(active, str) else active[0]
        config = json.loads(json.dumps(peft_config[active].to_dict(), default=_jsonable))
        found[str(config.get("peft_type") or "lora").lower()] = config
    initial = find_initial_state(model)
    if initial is not None:
        found["state_tuning"] = initial.describe()
    return found


def _jsonable(value: Any) -> Any:
    """Enums as their value, sets as sorted lists, anything else as its string."""
    if isinstance(value, set):
        return sorted(value)
    return getattr(value, "value", str(value))


def write_adapter_info(
    adapter_dir: str | os.PathLike,
    model: torch.nn.Module | None = None,
    *,
    base_model: str | None = None,
    quantization: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write `rwkv_ft_adapter.json` into `adapter_dir` (the trainer calls this when it saves).

    Args:
        model: the trained model (a PeftModel or ours); its quantization and adapters are read off it.
        base_model: the path or Hub id the base was loaded from (defaults to the model's
            `config._name_or_path`).
        quantization: overrides what is read from the model (e.g. {"load_in_4bit": True, ...}).
        extra: more keys to record (data, recipe, ...); the Hub model card shows "data" and "recipe".
    """
    from rwkv_ft import __version__
    from rwkv_ft.quantization import quantization_info

    info: dict[str, Any] = {"rwkv_ft_adapter_version": ADAPTER_INFO_VERSION, "rwkv_ft_version": __version__}
    if model is not None:
        config = getattr(model, "config", None)
        base_model = base_model or getattr(config, "_name_or_path", None) or None
        quantization = quantization if quantization is not None else quantization_info(model)
        info["adapters"] = describe_adapters(model)
        info["base_model_type"] = getattr(config, "model_type", None)
    info["base_model"] = base_model
    info["quantization"] = quantization
    info.update(extra or {})
    return write_json_atomically(Path(adapter_dir) / ADAPTER_INFO_FILE, info)


def read_adapter_info(adapter_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The contents of `rwkv_ft_adapter.json` in `adapter_dir`, or None if there is none."""
    return read_json_object(Path(adapter_dir) / ADAPTER_INFO_FILE)


def trained_on_quantized_base(info: dict[str, Any] | None) -> str | None:
    """ "8-bit", "4-bit nf4", ... when the adapter info records a quantized base, else None."""
    q = (info or {}).get("quantization")
    if not q:
        return None
    if q.get("load_in_8bit"):
        return "8-bit"
    if q.get("load_in_4bit"):
        return f"4-bit {q.get('bnb_4bit_quant_type', '')}".strip()
    return str(q.get("quant_method", "quantized"))
