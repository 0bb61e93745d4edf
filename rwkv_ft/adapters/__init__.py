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
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save everything trained on top of the base: the peft adapter (if `model` is a PeftModel), the
    learned initial state (if state tuning is attached) and `rwkv_ft_adapter.json`.

    `state_dict`: whole tensors of the trained parameters, by `model.named_parameters()` name, to
    write instead of the parameters themselves (a model sharded over several processes, whose
    parameters each hold a shard, gathered by `rwkv_ft.train.consolidated_state_dict`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        model.save_pretrained(directory, **({} if state_dict is None else {"state_dict": state_dict}))
    initial = find_initial_state(model)
    if initial is not None:
        save_state_tuning(initial if state_dict is None else _initial_state_from(model, state_dict), directory)
    write_adapter_info(directory, model, base_model=base_model, quantization=quantization, extra=extra)
    return directory


def _initial_state_prefix(model: torch.nn.Module) -> str:
    """The `named_parameters` prefix of the learned initial state inside `model` ("...rwkv.initial_state")."""
    initial = find_initial_state(model)
    return next(name for name, module in model.named_modules() if module is initial)


def _initial_state_from(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain CPU copy of `model`'s learned initial state holding the values of `state_dict`."""
    initial, inner = find_initial_state(model), find_base_model(model)
    prefix = _initial_state_prefix(model) + "."
    copy = type(initial)(inner.config, initial.config)
    copy.load_state_dict({k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}, strict=True)
    return copy


def read_trained_tensors(model: torch.nn.Module, directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter saved in `directory` (by `save_adapter`) as whole tensors keyed by the names of
    `model`'s parameters they belong to: what a resumed run copies back into its (possibly sharded)
    model."""
    from safetensors.torch import load_file

    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    if hasattr(model, "peft_config"):
        saved = load_file(directory / "adapter_model.safetensors")
        names = _peft_saved_names(model)
        unknown = sorted(set(saved) - set(names))
        if unknown:
            raise ValueError(f"{directory}: adapter_model.safetensors has tensors this model lacks: {unknown[:5]}")
        tensors.update({names[key]: value for key, value in saved.items()})
    if find_initial_state(model) is not None:
        from rwkv_ft.adapters.state_tuning import read_state_tuning

        prefix = _initial_state_prefix(model)
        _, state, _ = read_state_tuning(directory)
        tensors.update({f"{prefix}.{k}": v for k, v in state.items() if k != "initial_state"})
    return tensors


def _peft_saved_names(model: torch.nn.Module) -> dict[str, str]:
    """{key in adapter_model.safetensors: parameter name} for `model`'s trainable peft weights: peft's
    own renaming (get_peft_model_state_dict), run on tensors that carry their parameter's index."""
    from peft import get_peft_model_state_dict

    names = [name for name, p in model.named_parameters() if p.requires_grad]
    tagged = {name: torch.tensor([index]) for index, name in enumerate(names)}
    saved = get_peft_model_state_dict(model, state_dict=tagged)
    return {key: names[int(value[0])] for key, value in saved.items()}


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
    "read_trained_tensors",
    "remove_state_tuning",
    "save_adapter",
    "save_state_tuning",
    "trained_on_quantized_base",
    "write_adapter_info",
]
