"""Adapters for every RWKV version: LoRA-family through peft (default targets registered when peft
is imported), state tuning, and the `rwkv_ft_adapter.json` record the merge and the Hub card read."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rwkv_ft.adapters.info import (
    ADAPTER_INFO_FILE,
    describe_adapters,
    read_adapter_info,
    trained_on_quantized_base,
    write_adapter_info,
)
from rwkv_ft.adapters.state_tuning import (
    STATE_TUNING_FILE,
    StateTuningConfig,
    add_state_tuning,
    blinkdl_state,
    find_base_model,
    find_initial_state,
    load_initial_state,
    load_state_tuning,
    remove_state_tuning,
    save_state_tuning,
)


def save_adapter(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    *,
    base_model: str | None = None,
    quantization: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Save everything trained on top of the base: the peft adapter (if `model` is a PeftModel), the
    learned initial state (if state tuning is attached) and `rwkv_ft_adapter.json`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        model.save_pretrained(directory)
    if find_initial_state(model) is not None:
        save_state_tuning(model, directory)
    write_adapter_info(directory, model, base_model=base_model, quantization=quantization, extra=extra)
    return directory


__all__ = [
    "ADAPTER_INFO_FILE",
    "STATE_TUNING_FILE",
    "StateTuningConfig",
    "add_state_tuning",
    "blinkdl_state",
    "describe_adapters",
    "find_base_model",
    "find_initial_state",
    "load_initial_state",
    "load_state_tuning",
    "read_adapter_info",
    "remove_state_tuning",
    "save_adapter",
    "save_state_tuning",
    "trained_on_quantized_base",
    "write_adapter_info",
]
