"""RWKV-4 as a Hugging Face causal language model.

Module and parameter names follow BlinkDL's checkpoints (`emb`, `blocks.N.ln0/ln1/ln2`, `att.key`,
`att.time_decay`, `ffn.receptance`, `ln_out`, `head`), so a BlinkDL state dict maps onto ours by
adding the `rwkv.` prefix (see `conversion_rwkv4.py`).

Two modes compute the same function:
- parallel mode: a whole (B, T) sequence through `wkv4` (Triton on CUDA, PyTorch elsewhere);
- RNN mode: the same forward fed one token at a time with the recurrent state carried across.
Masks, padding, packed rows (the WKV and the token shifts reset at each example's first token), the
carried and the learned initial state are handled by the shared `RwkvModelBase`; this file holds the
RWKV-4 math.

The recurrent state is one fp32 tensor of shape (B, L, 5, C). Per layer the five slots are the last
ln1 output (time-mix token shift), the last ln2 output (channel-mix token shift), and the WKV state
(numerator / e^max, denominator / e^max, max). Its size is fixed: generation does O(1) work per token.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from rwkv_ft.kernels import EMPTY_MAX, wkv4
from rwkv_ft.models.modeling_utils import (
    LayerSchedule,
    RwkvBlock,
    RwkvCausalLMOutput,
    RwkvForCausalLMBase,
    RwkvModelBase,
    RwkvOutput,
    RwkvPreTrainedModelMixin,
    masked,
    token_shift,
)
from rwkv_ft.models.registration import register_models

from .configuration_rwkv4 import Rwkv4Config
from .initial_state_rwkv4 import Rwkv4InitialState

# Slots of the per-layer state.
ATT_SHIFT, FFN_SHIFT, WKV = 0, 1, slice(2, 5)
STATE_SLOTS = 5
# Key given to masked (padding) positions: exp(PAD_KEY - k) is exactly 0 in fp32 for any real key, so
# a padded token adds nothing to the WKV history.
PAD_KEY = -1e4

# Outputs are shared by every version; these names stay for code written against RWKV-4.
Rwkv4Output = RwkvOutput
Rwkv4CausalLMOutput = RwkvCausalLMOutput


def empty_state(batch: int, config: Rwkv4Config, device: torch.device | None = None) -> torch.Tensor:
    """A (B, L, 5, C) fp32 state holding no history."""
    state = torch.zeros(
        batch, config.num_hidden_layers, STATE_SLOTS, config.hidden_size, device=device, dtype=torch.float32
    )
    state[:, :, 4] = EMPTY_MAX
    return state


def mix(x: torch.Tensor, shifted: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """x * ratio + shifted * (1 - ratio), as one kernel (rounded once, in fp32 for half inputs)."""
    return torch.lerp(shifted, x, ratio.to(x.dtype))


class Rwkv4TimeMix(nn.Module):
    """The RWKV-4 "attention": receptance-gated WKV over the token-shifted input."""

    def __init__(self, config: Rwkv4Config, layer_id: int):
        super().__init__()
        C = config.hidden_size
        self.layer_id = layer_id
        self.wkv_backend = config.wkv_backend
        self.time_decay = nn.Parameter(torch.empty(C))
        self.time_first = nn.Parameter(torch.empty(C))
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        shift: torch.Tensor | None,
        wkv_state: torch.Tensor | None,
        mask: torch.Tensor | None,
        reset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, T, C) ln1 output; shift: (B, C); wkv_state: (B, 3, C) fp32; mask, reset: (B, T) bool
        shifted = token_shift(x, shift, reset)
        k = self.key(mix(x, shifted, self.time_mix_k))  # (B, T, C)
        v = self.value(mix(x, shifted, self.time_mix_v))
        r = torch.sigmoid(self.receptance(mix(x, shifted, self.time_mix_r)))
        if mask is not None:
            k = k.masked_fill(~mask.unsqueeze(-1), PAD_KEY)
        y, new_wkv_state = wkv4(
            self.time_decay, self.time_first, k, v, wkv_state, reset=reset, backend=self.wkv_backend
        )
        return self.output(r * y), new_wkv_state


class Rwkv4ChannelMix(nn.Module):
    """The RWKV-4 feed-forward: squared-ReLU MLP gated by a receptance."""

    def __init__(self, config: Rwkv4Config, layer_id: int):
        super().__init__()
        C, F_ = config.hidden_size, config.intermediate_size
        self.layer_id = layer_id
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None, reset: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, C) ln2 output; shift: (B, C); reset: (B, T) bool
        shifted = token_shift(x, shift, reset)
        k = torch.square(torch.relu(self.key(mix(x, shifted, self.time_mix_k))))  # (B, T, F)
        r = torch.sigmoid(self.receptance(mix(x, shifted, self.time_mix_r)))
        return r * self.value(k)


class Rwkv4Block(RwkvBlock):
    def __init__(self, config: Rwkv4Config, layer_id: int):
        super().__init__(config, layer_id)
        self.att = Rwkv4TimeMix(config, layer_id)
        self.ffn = Rwkv4ChannelMix(config, layer_id)

    def block_forward(
        self,
        hidden: torch.Tensor,
        layer_state: torch.Tensor | None,
        mask: torch.Tensor | None,
        reset: torch.Tensor | None = None,
        carry: None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        # hidden: (B, T, C); layer_state: (B, 5, C) fp32 or None (empty); mask, reset: (B, T) bool or None
        if hasattr(self, "ln0"):  # block 0 (not `layer_id == 0`: every other block shares one compiled graph)
            hidden = self.ln0(hidden)
        if layer_state is None:
            att_shift = ffn_shift = wkv_state = None
        else:
            att_shift, ffn_shift, wkv_state = layer_state[:, ATT_SHIFT], layer_state[:, FFN_SHIFT], layer_state[:, WKV]

        x = masked(self.ln1(hidden), mask)
        att_out, new_wkv_state = self.att(x, att_shift, wkv_state, mask, reset)
        hidden = hidden + att_out
        x2 = masked(self.ln2(hidden), mask)
        hidden = hidden + self.ffn(x2, ffn_shift, reset)

        new_state = torch.cat([x[:, -1:].float(), x2[:, -1:].float(), new_wkv_state], dim=1)  # (B, 5, C)
        return hidden, new_state, None


class Rwkv4PreTrainedModel(RwkvPreTrainedModelMixin, PreTrainedModel):
    config_class = Rwkv4Config
    config: Rwkv4Config
    base_model_prefix = "rwkv"
    _no_split_modules = ["Rwkv4Block"]
    # The decay is exponentiated twice: bf16 would move it visibly, so these stay fp32 in any dtype.
    _keep_in_fp32_modules_strict = ["time_decay", "time_first"]

    mix_classes = (Rwkv4TimeMix, Rwkv4ChannelMix)

    def _init_mix(self, module: Rwkv4TimeMix | Rwkv4ChannelMix, schedule: LayerSchedule) -> None:
        """BlinkDL's RWKV-4 schedule for the time parameters."""
        ramp, ratio_1_to_almost0 = schedule.ramp, schedule.ratio_1_to_almost0
        init.copy_(module.time_mix_k, ramp.pow(ratio_1_to_almost0))
        init.copy_(module.time_mix_r, ramp.pow(0.5 * ratio_1_to_almost0))
        if isinstance(module, Rwkv4TimeMix):
            init.copy_(module.time_mix_v, ramp.pow(ratio_1_to_almost0) + 0.3 * schedule.ratio_0_to_1)
            init.copy_(module.time_decay, -5 + 8 * schedule.channel.pow(0.7 + 1.3 * schedule.ratio_0_to_1))
            zigzag = 0.5 * (((torch.arange(module.time_first.numel()) + 1) % 3) - 1).float()
            init.copy_(module.time_first, math.log(0.3) + zigzag)


class Rwkv4Model(RwkvModelBase, Rwkv4PreTrainedModel):
    """The RWKV-4 blocks between the embedding and the final layer norm (forward: `RwkvModelBase`)."""

    block_class = Rwkv4Block
    initial_state_class = Rwkv4InitialState
    supports_reset = True  # the WKV-4 kernel and the token shifts reset at packed examples' starts

    def state_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.config.num_hidden_layers, STATE_SLOTS, self.config.hidden_size)

    def empty_state(self, batch: int, device: torch.device | None = None) -> torch.Tensor:
        return empty_state(batch, self.config, device)


class Rwkv4ForCausalLM(RwkvForCausalLMBase, Rwkv4PreTrainedModel):
    """RWKV-4 language model (forward and generation: `RwkvForCausalLMBase`)."""

    def __init__(self, config: Rwkv4Config):
        super().__init__(config)
        self.rwkv = Rwkv4Model(config)
        self._init_head(config)
        self.post_init()


register_models(Rwkv4Config, Rwkv4Model, Rwkv4ForCausalLM)
