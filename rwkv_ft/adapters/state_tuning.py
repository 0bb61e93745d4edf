"""State tuning: learn the initial recurrent state of every layer, with the model frozen.

An RWKV model starts every sequence from an empty history. State tuning replaces that empty
history by a learned one, a few kilobytes to megabytes per layer, and trains nothing else (or
composes with LoRA). How a version parametrises its state lives beside its model
(`models/rwkvN/initial_state_rwkvN.py`, named by the base model's `initial_state_class`); this
module attaches, saves, loads and exports it for any version.

The learned state is used wherever the model gets no `state` argument: training batches (padded
or packed: every packed example starts from it), and the first call of `generate`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from rwkv_ft.io import CheckpointError, write_atomically

STATE_TUNING_FILE = "state_tuning.safetensors"
_FORMAT = "rwkv_ft.state_tuning"
_FORMAT_VERSION = "2"


@dataclass
class StateTuningConfig:
    """What state tuning learns.

    Args:
        train_token_shift: also learn the two token-shift states of each layer (default: the WKV
            state only).
        init_log_weight: RWKV-4 only: the initial log-weight of the learned virtual past token.
    """

    train_token_shift: bool = False
    init_log_weight: float = 0.0


def find_base_model(model: nn.Module) -> nn.Module:
    """Our RWKV base model inside `model` (a causal LM, a PeftModel around one, or the bare model)."""
    from rwkv_ft.models.modeling_utils import RwkvModelBase

    for module in model.modules():
        if isinstance(module, RwkvModelBase):
            return module
    raise TypeError(f"state tuning needs an RWKV model from rwkv_ft, got {type(model).__name__}")


def find_initial_state(model: nn.Module) -> nn.Module | None:
    """The attached learned initial state, or None."""
    try:
        return find_base_model(model).initial_state
    except TypeError:
        return None


def add_state_tuning(model: nn.Module, config: StateTuningConfig | None = None, *, freeze_base: bool = True):
    """Attach a trainable initial state to `model` and return it.

    With `freeze_base` every other parameter of `model` is frozen, except peft adapter weights: call
    this after `get_peft_model` to train LoRA and the state together (peft would freeze a state
    attached before it). On a quantized base, call it after `prepare_model_for_kbit_training`.
    """
    inner = find_base_model(model)
    if freeze_base:
        is_peft = hasattr(model, "peft_config")
        for p in model.parameters():
            if not (is_peft and p.requires_grad):  # keep the adapter's own trainable weights trainable
                p.requires_grad_(False)
    initial = inner.initial_state_class(inner.config, config or StateTuningConfig())
    inner.initial_state = initial.to(inner.get_input_embeddings().weight.device)
    return initial


def remove_state_tuning(model: nn.Module) -> nn.Module | None:
    """Detach the learned initial state (the model starts from an empty history again); return it."""
    inner = find_base_model(model)
    initial, inner.initial_state = inner.initial_state, None
    return initial


def save_state_tuning(model_or_state: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the learned state as `directory/state_tuning.safetensors`.

    Besides the parameters the file holds `initial_state`, the materialised (L, ...) fp32 state in
    the model's own layout, for tools that do not know the parametrisation.
    """
    from safetensors.torch import save_file

    initial = model_or_state if hasattr(model_or_state, "state") else find_initial_state(model_or_state)
    if initial is None:
        raise ValueError("save_state_tuning: the model has no learned initial state (call add_state_tuning first)")
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in initial.named_parameters()}
    tensors["initial_state"] = initial.state().detach().cpu().contiguous()
    metadata = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "state_class": type(initial).__name__,
        "config": json.dumps(asdict(initial.config)),
    }
    path = Path(directory) / STATE_TUNING_FILE
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=True, is_dir=False)


def _state_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / STATE_TUNING_FILE
    if not path.exists():
        raise FileNotFoundError(f"no state-tuning file: {path} does not exist")
    return path


def read_state_tuning(path: str | os.PathLike) -> tuple[StateTuningConfig, dict[str, torch.Tensor], dict]:
    """Config, tensors and metadata of a state-tuning file (or of the one in a directory)."""
    from safetensors import SafetensorError, safe_open

    path = _state_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); it is probably truncated") from exc
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{path}: not an rwkv_ft state-tuning file (metadata format={metadata.get('format')!r})")
    try:
        config = StateTuningConfig(**json.loads(metadata.get("config", "{}")))
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable state-tuning config in the metadata ({exc})") from exc
    return config, tensors, metadata


def load_state_tuning(model: nn.Module, path: str | os.PathLike, *, trainable: bool = False) -> nn.Module:
    """Attach the learned initial state saved at `path` (a file or a directory holding one) to `model`."""
    file = _state_file(path)
    config, tensors, metadata = read_state_tuning(file)
    inner = find_base_model(model)
    cls = inner.initial_state_class
    if metadata.get("state_class", cls.__name__) != cls.__name__:
        raise ValueError(
            f"{file}: the state was learned for a {metadata['state_class'].removesuffix('InitialState')} model, "
            f"not this {cls.__name__.removesuffix('InitialState')} one; load it onto the base model it was trained on"
        )
    initial = cls(inner.config, config)
    params = {k: v for k, v in tensors.items() if k != "initial_state"}
    expected = {k: tuple(v.shape) for k, v in sorted(initial.state_dict().items())}
    got = {k: tuple(v.shape) for k, v in sorted(params.items())}
    if expected != got:
        raise ValueError(
            f"{file}: the state has tensors {got}, but this model needs {expected}; "
            "load it onto the base model it was trained on"
        )
    initial.load_state_dict(params, strict=True)
    initial.requires_grad_(trainable)
    inner.initial_state = initial.to(inner.get_input_embeddings().weight.device)
    return initial


def load_initial_state(path: str | os.PathLike) -> torch.Tensor:
    """The materialised (L, ...) fp32 initial state of a state-tuning file; pass `.expand(B, ...)` as
    `state=` to a model without the adapter attached."""
    return read_state_tuning(path)[1]["initial_state"]


def blinkdl_state(state: torch.Tensor, model_or_class=None) -> list[torch.Tensor]:
    """A materialised initial state as the `state` argument of BlinkDL's `rwkv` package.

    `model_or_class`: the model (or its initial-state class) the state belongs to; by default the
    version whose state layout has this shape.
    """
    return _state_class(state, model_or_class).rwkv_package_state(state)


def _state_class(state: torch.Tensor, model_or_class):
    if isinstance(model_or_class, type):
        return model_or_class
    if model_or_class is not None:
        return find_base_model(model_or_class).initial_state_class
    from rwkv_ft.models.architecture import architectures

    for arch in architectures():
        if arch.base_model_class.initial_state_class.matches(state):
            return arch.base_model_class.initial_state_class
    raise ValueError(f"cannot tell the model of a state of shape {tuple(state.shape)}; pass the model")
