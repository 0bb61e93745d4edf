"""State tuning: learn the initial recurrent state of every layer, with the model frozen.

RWKV-4 starts every sequence from an empty history. State tuning replaces that empty history by a
learned one, a few kilobytes per layer, and trains nothing else (or composes with LoRA).

Parametrisation. A layer's WKV state is (a, b, p): numerator / e^p, denominator / e^p, and the
running max p. Learning (a, b) directly is fragile: nothing keeps b > 0, and b <= 0 makes the WKV
output divide by ~0 and blow up. Any valid state is equivalent to (a/b, 1, p + log b), i.e. a single
virtual past token whose value is v = a/b and whose weight is e^w with w = p + log b. We learn
v ("wkv_value") and w ("wkv_log_weight") per channel, both unconstrained: the state
(v, 1, w) is valid for every real v, w, and all of it receives gradient. The output at the first
token is then a softmax-weighted mix of v and the token's own value, so its gradients stay bounded.
Initialised to v = 0, w = `init_log_weight` (default 0: as much weight as one past token with key 0).
The token-shift states (the previous ln1/ln2 outputs) are plain vectors; they are learned only with
`train_token_shift=True`, starting at 0, the value of an empty history.

The learned state is used wherever the model gets no `state` argument: training batches (padded
or packed: every packed example starts from it), and the first call of `generate`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rwkv_ft.models.rwkv4 import Rwkv4Config
from rwkv_ft.models.rwkv4.modeling_rwkv4 import Rwkv4Model

STATE_TUNING_FILE = "state_tuning.safetensors"
_FORMAT = "rwkv_ft.state_tuning"
_FORMAT_VERSION = "1"


@dataclass
class StateTuningConfig:
    """What state tuning learns.

    Args:
        train_token_shift: also learn the two token-shift states of each layer (default: WKV only).
        init_log_weight: initial w, the log-weight of the learned virtual past token.
    """

    train_token_shift: bool = False
    init_log_weight: float = 0.0


class Rwkv4InitialState(nn.Module):
    """The learned (L, 5, C) initial state; called with a batch size it returns it as (B, L, 5, C) fp32."""

    def __init__(self, num_layers: int, hidden_size: int, config: StateTuningConfig | None = None):
        super().__init__()
        self.config = config or StateTuningConfig()
        L, C = num_layers, hidden_size
        self.wkv_value = nn.Parameter(torch.zeros(L, C))
        self.wkv_log_weight = nn.Parameter(torch.full((L, C), float(self.config.init_log_weight)))
        if self.config.train_token_shift:
            self.att_shift = nn.Parameter(torch.zeros(L, C))
            self.ffn_shift = nn.Parameter(torch.zeros(L, C))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.wkv_value.shape)

    def state(self) -> torch.Tensor:
        """(L, 5, C) fp32 in the model's slot order: att shift, ffn shift, WKV (value, 1, log-weight)."""
        value = self.wkv_value.float()
        zeros = torch.zeros_like(value)
        att = self.att_shift.float() if self.config.train_token_shift else zeros
        ffn = self.ffn_shift.float() if self.config.train_token_shift else zeros
        return torch.stack([att, ffn, value, torch.ones_like(value), self.wkv_log_weight.float()], dim=1)

    def forward(self, batch: int) -> torch.Tensor:
        return self.state().unsqueeze(0).expand(batch, -1, -1, -1)

    @torch.no_grad()
    def set_from_state(self, state: torch.Tensor) -> None:
        """Start from a real (L, 5, C) state, e.g. the state after reading a prompt (`out.state[0]`).

        The WKV part is brought to the canonical form (a/b, 1, p + log b); a channel with no
        history (b = 0) gets log-weight -60, i.e. no weight.
        """
        if tuple(state.shape) != (*self.shape[:1], 5, self.shape[1]):
            raise ValueError(
                f"set_from_state: expected a ({self.shape[0]}, 5, {self.shape[1]}) state, got {tuple(state.shape)}"
            )
        state = state.float()
        den = state[:, 3]
        has_history = den > 0
        self.wkv_value.copy_(torch.where(has_history, state[:, 2] / den.clamp_min(1e-30), 0.0))
        self.wkv_log_weight.copy_(torch.where(has_history, state[:, 4] + den.clamp_min(1e-30).log(), -60.0))
        if self.config.train_token_shift:
            self.att_shift.copy_(state[:, 0])
            self.ffn_shift.copy_(state[:, 1])

    def describe(self) -> dict:
        L, C = self.shape
        return {
            "num_layers": L,
            "hidden_size": C,
            "parameters": sum(p.numel() for p in self.parameters()),
            **asdict(self.config),
        }


def find_rwkv4_model(model: nn.Module) -> Rwkv4Model:
    """The `Rwkv4Model` inside `model` (ours, a PeftModel around ours, or the bare model)."""
    for module in model.modules():
        if isinstance(module, Rwkv4Model):
            return module
    raise TypeError(f"state tuning needs an RWKV-4 model from rwkv_ft, got {type(model).__name__}")


def find_initial_state(model: nn.Module) -> Rwkv4InitialState | None:
    """The attached learned initial state, or None."""
    try:
        return find_rwkv4_model(model).initial_state
    except TypeError:
        return None


def add_state_tuning(
    model: nn.Module, config: StateTuningConfig | None = None, *, freeze_base: bool = True
) -> Rwkv4InitialState:
    """Attach a trainable initial state to `model` and return it.

    With `freeze_base` every other parameter of `model` is frozen, except peft adapter weights: call
    this after `get_peft_model` to train LoRA and the state together (peft would freeze a state
    attached before it). On a quantized base, call it after `prepare_model_for_kbit_training`.
    """
    inner = find_rwkv4_model(model)
    if freeze_base:
        is_peft = hasattr(model, "peft_config")
        for p in model.parameters():
            if not (is_peft and p.requires_grad):  # keep the adapter's own trainable weights trainable
                p.requires_grad_(False)
    cfg: Rwkv4Config = inner.config
    initial = Rwkv4InitialState(cfg.num_hidden_layers, cfg.hidden_size, config).to(inner.emb.weight.device)
    inner.initial_state = initial
    return initial


def remove_state_tuning(model: nn.Module) -> Rwkv4InitialState | None:
    """Detach the learned initial state (the model starts from an empty history again); return it."""
    inner = find_rwkv4_model(model)
    initial, inner.initial_state = inner.initial_state, None
    return initial


def save_state_tuning(model_or_state: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the learned state as `directory/state_tuning.safetensors`.

    Besides the parameters the file holds `initial_state`, the materialised (L, 5, C) fp32 state in
    our slot order, for tools that do not know the parametrisation (see `blinkdl_state`).
    """
    initial = model_or_state if isinstance(model_or_state, Rwkv4InitialState) else find_initial_state(model_or_state)
    if initial is None:
        raise ValueError("save_state_tuning: the model has no learned initial state (call add_state_tuning first)")
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in initial.named_parameters()}
    tensors["initial_state"] = initial.state().detach().cpu().contiguous()
    metadata = {"format": _FORMAT, "version": _FORMAT_VERSION, "config": json.dumps(asdict(initial.config))}
    path = Path(directory) / STATE_TUNING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def _state_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / STATE_TUNING_FILE
    if not path.exists():
        raise FileNotFoundError(f"no state-tuning file: {path} does not exist")
    return path


def read_state_tuning(path: str | os.PathLike) -> tuple[StateTuningConfig, dict[str, torch.Tensor]]:
    """Config and tensors of a state-tuning file (or of the one in a directory)."""
    path = _state_file(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"{path}: not an rwkv_ft state-tuning file (metadata format={metadata.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        config = StateTuningConfig(**json.loads(metadata.get("config", "{}")))
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable state-tuning config in the metadata ({exc})") from exc
    return config, tensors


def load_state_tuning(model: nn.Module, path: str | os.PathLike, *, trainable: bool = False) -> Rwkv4InitialState:
    """Attach the learned initial state saved at `path` (a file or a directory holding one) to `model`."""
    file = _state_file(path)
    config, tensors = read_state_tuning(file)
    inner = find_rwkv4_model(model)
    L, C = inner.config.num_hidden_layers, inner.config.hidden_size
    if tuple(tensors["wkv_value"].shape) != (L, C):
        raise ValueError(
            f"{file}: the state is for L={tensors['wkv_value'].shape[0]}, C={tensors['wkv_value'].shape[1]}, "
            f"but the model has L={L}, C={C}; load it onto the base model it was trained on"
        )
    initial = Rwkv4InitialState(L, C, config)
    params = {k: v for k, v in tensors.items() if k != "initial_state"}
    initial.load_state_dict(params, strict=True)
    initial.requires_grad_(trainable)
    inner.initial_state = initial.to(inner.emb.weight.device)
    return initial


def load_initial_state(path: str | os.PathLike) -> torch.Tensor:
    """The materialised (L, 5, C) fp32 initial state of a state-tuning file; pass `.expand(B, ...)` as
    `state=` to a model without the adapter attached."""
    return read_state_tuning(path)[1]["initial_state"]


def blinkdl_state(state: torch.Tensor) -> list[torch.Tensor]:
    """Our (L, 5, C) state as the list BlinkDL's `rwkv` package takes for RWKV-4:
    per layer [att shift, numerator, denominator, max, ffn shift]."""
    order = (0, 2, 3, 4, 1)
    return [state[layer, slot].float().clone() for layer in range(state.shape[0]) for slot in order]
