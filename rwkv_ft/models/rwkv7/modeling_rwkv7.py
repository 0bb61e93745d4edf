"""RWKV-7 ("Goose", x070) as a Hugging Face causal language model.

Exactly the reference (BlinkDL RWKV-LM `RWKV-v7/rwkv_v7_demo.py`, and the x070 path of the `rwkv`
package). Module and parameter names are BlinkDL's (`emb`, `blocks.N.ln0/ln1/ln2`,
`att.x_r ... att.x_g`, `att.w0/w1/w2`, `att.a0/a1/a2`, `att.v0/v1/v2`, `att.g1/g2`, `att.k_k`,
`att.k_a`, `att.r_k`, `att.receptance/key/value/output`, `att.ln_x`, `ffn.x_k`, `ffn.key/value`,
`ln_out`, `head`), in BlinkDL's shapes, so a `.pth` maps onto ours by adding the `rwkv.` prefix.

Per block, with xx = shift(x) - x and x_? = x + xx * x_? (six token-shift lerps):
    r = receptance(x_r); k = key(x_k); v = value(x_v)
    w = -softplus(-(w0 + tanh(x_w @ w1) @ w2)) - 0.5        per-step decay exp(-exp(w)) in [0.545, 1)
    a = sigmoid(a0 + (x_a @ a1) @ a2);  g = sigmoid(x_g @ g1) @ g2
    kk = normalize(k * k_k) per head;   k = k * (1 + (a - 1) * k_a)
    v += (v_first - v) * sigmoid(v0 + (x_v @ v1) @ v2)     layers >= 1; layer 0's v is v_first
    y = WKV7(r, -exp(w), k, v, -kk, kk * a)                 the (H, N, N) state, fp32
    y = ln_x(y) + (r * k * r_k).sum per head * v;  att = output(y * g)
    ffn = value(relu(key(x + xx * x_k)) ** 2)
`ln0` normalises the embedding in block 0. Masks, padding, packed rows (the WKV and the token
shift reset at each example's first token), the carried and the learned state are handled by the
shared `RwkvModelBase`; this file holds the RWKV-7 math.

The recurrent state is one fp32 tensor (B, L, 2C + H*N*N): per layer the last ln1 output
(time-mix shift), the last ln2 output (channel-mix shift), then the WKV state (H, N, N) in
BlinkDL's [value, key] layout, flattened. Its size is fixed: generation does O(1) work per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from rwkv_ft.kernels import wkv7
from rwkv_ft.models.modeling_utils import (
    LayerSchedule,
    RwkvBlock,
    RwkvForCausalLMBase,
    RwkvModelBase,
    RwkvPreTrainedModelMixin,
    masked,
    token_shift,
)
from rwkv_ft.models.registration import register_models

from .configuration_rwkv7 import Rwkv7Config
from .initial_state_rwkv7 import Rwkv7InitialState

TIME_MIX_LERPS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
# exp(-0.5): the largest per-step log-decay magnitude the reference's clamp allows.
MAX_DECAY = math.exp(-0.5)


def layer_state_size(config: Rwkv7Config) -> int:
    """Floats of one layer's state: two shift vectors and the (H, N, N) WKV state."""
    return 2 * config.hidden_size + config.num_heads * config.head_size**2


def split_layer_state(state: torch.Tensor, config: Rwkv7Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(att shift (B, C), ffn shift (B, C), WKV (B, H, N, N)) views of a (B, 2C + H*N*N) layer state."""
    C, H, N = config.hidden_size, config.num_heads, config.head_size
    return state[:, :C], state[:, C : 2 * C], state[:, 2 * C :].view(-1, H, N, N)


def join_layer_state(att_shift: torch.Tensor, ffn_shift: torch.Tensor, wkv: torch.Tensor) -> torch.Tensor:
    """(B, 2C + H*N*N) fp32 from the three parts."""
    return torch.cat([att_shift.float(), ffn_shift.float(), wkv.float().flatten(1)], dim=1)


def log_decay(w: torch.Tensor) -> torch.Tensor:
    """The WKV's log per-step decay, fp32: -exp(-softplus(-w) - 0.5) = -e^-0.5 * sigmoid(w)."""
    return -torch.exp(-F.softplus(-w.float()) - 0.5)


class Rwkv7TimeMix(nn.Module):
    """The RWKV-7 "attention": a delta-rule state update with in-context learning rate `a`."""

    def __init__(self, config: Rwkv7Config, layer_id: int):
        super().__init__()
        C, H, N = config.hidden_size, config.num_heads, config.head_size
        self.layer_id, self.num_heads, self.head_size = layer_id, H, N
        self.wkv_backend = config.wkv_backend
        for name in TIME_MIX_LERPS:
            setattr(self, name, nn.Parameter(torch.empty(1, 1, C)))
        self.w0 = nn.Parameter(torch.empty(1, 1, C))
        self.w1 = nn.Parameter(torch.empty(C, config.decay_low_rank))
        self.w2 = nn.Parameter(torch.empty(config.decay_low_rank, C))
        self.a0 = nn.Parameter(torch.empty(1, 1, C))
        self.a1 = nn.Parameter(torch.empty(C, config.a_low_rank))
        self.a2 = nn.Parameter(torch.empty(config.a_low_rank, C))
        if layer_id > 0:  # layer 0's value is the residual source, not mixed
            self.v0 = nn.Parameter(torch.empty(1, 1, C))
            self.v1 = nn.Parameter(torch.empty(C, config.v_low_rank))
            self.v2 = nn.Parameter(torch.empty(config.v_low_rank, C))
        self.g1 = nn.Parameter(torch.empty(C, config.gate_low_rank))
        self.g2 = nn.Parameter(torch.empty(config.gate_low_rank, C))
        self.k_k = nn.Parameter(torch.empty(1, 1, C))
        self.k_a = nn.Parameter(torch.empty(1, 1, C))
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=config.group_norm_epsilon)

    def forward(
        self,
        x: torch.Tensor,
        shift: torch.Tensor | None,
        wkv_state: torch.Tensor | None,
        mask: torch.Tensor | None,
        reset: torch.Tensor | None,
        v_first: torch.Tensor | None,
        recompute_wkv_states: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (B, T, C) ln1 output; shift: (B, C); wkv_state: (B, H, N, N) fp32; mask, reset: (B, T) bool
        B, T, C = x.shape
        H, N = self.num_heads, self.head_size
        shifted = token_shift(x, shift, reset)
        # x + (shifted - x) * x_?, one kernel each (rounded once, in fp32 for half inputs)
        xr, xw, xk, xv, xa, xg = (torch.lerp(x, shifted, getattr(self, name).to(x.dtype)) for name in TIME_MIX_LERPS)

        r = self.receptance(xr)  # (B, T, C)
        k = self.key(xk)
        v = self.value(xv)
        w = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)
        if not hasattr(self, "v0"):  # layer 0 (not `layer_id == 0`: the other layers share one compiled graph)
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)

        decay, b = log_decay(w), kk * a
        if mask is not None:  # a pad leaves the state exactly as it was: decay 1, no update
            pad = ~mask.unsqueeze(-1)
            decay, k, b = decay.masked_fill(pad, 0.0), k.masked_fill(pad, 0.0), b.masked_fill(pad, 0.0)
        # Under autocast the projections come out in its dtype, and their products with fp32
        # parameters are promoted back to fp32: the kernel takes one dtype (the decay may stay fp32).
        k, v, kk, b = (t.to(r.dtype) for t in (k, v, kk, b))
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        y, new_wkv_state = wkv7(
            heads(r), heads(decay), heads(k), heads(v), heads(-kk), heads(b), wkv_state,
            reset=reset, backend=self.wkv_backend, recompute_states=recompute_wkv_states,
        )  # fmt: skip
        y = self.ln_x(y.reshape(B * T, C).to(x.dtype)).view(B, T, C)
        bonus = (heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)  # (B, T, H, N)
        y = y + bonus.view(B, T, C)
        return self.output(y * g), new_wkv_state, v_first


class Rwkv7ChannelMix(nn.Module):
    """The RWKV-7 feed-forward: a squared-ReLU MLP over the token-shifted input."""

    def __init__(self, config: Rwkv7Config, layer_id: int):
        super().__init__()
        C = config.hidden_size
        self.layer_id = layer_id
        self.x_k = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, config.intermediate_size, bias=False)
        self.value = nn.Linear(config.intermediate_size, C, bias=False)

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None, reset: torch.Tensor | None) -> torch.Tensor:
        # x: (B, T, C) ln2 output; shift: (B, C)
        k = torch.relu(self.key(torch.lerp(x, token_shift(x, shift, reset), self.x_k.to(x.dtype)))) ** 2  # (B, T, F)
        return self.value(k)


class Rwkv7Block(RwkvBlock):
    def __init__(self, config: Rwkv7Config, layer_id: int):
        super().__init__(config, layer_id)
        self.config = config
        self.att = Rwkv7TimeMix(config, layer_id)
        self.ffn = Rwkv7ChannelMix(config, layer_id)

    def block_forward(
        self,
        hidden: torch.Tensor,
        layer_state: torch.Tensor | None,
        mask: torch.Tensor | None,
        reset: torch.Tensor | None = None,
        v_first: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # hidden: (B, T, C); layer_state: (B, 2C + H*N*N) fp32 or None (empty); v_first: (B, T, C)
        if hasattr(self, "ln0"):  # block 0
            hidden = self.ln0(hidden)
        att_shift = ffn_shift = wkv_state = None
        if layer_state is not None:
            att_shift, ffn_shift, wkv_state = split_layer_state(layer_state, self.config)

        x = masked(self.ln1(hidden), mask)
        # Under selective recompute the WKV keeps no per-chunk states for the backward (1 KB per
        # token and head, the largest activation of a block): its backward runs it again instead.
        att_out, new_wkv_state, v_first = self.att(
            x, att_shift, wkv_state, mask, reset, v_first, recompute_wkv_states=self.selective_recompute
        )
        hidden = hidden + att_out
        x2 = masked(self.ln2(hidden), mask)
        hidden = hidden + self.ffn(x2, ffn_shift, reset)
        return hidden, join_layer_state(x[:, -1], x2[:, -1], new_wkv_state), v_first


class Rwkv7PreTrainedModel(RwkvPreTrainedModelMixin, PreTrainedModel):
    config_class = Rwkv7Config
    config: Rwkv7Config
    base_model_prefix = "rwkv"
    _no_split_modules = ["Rwkv7Block"]
    # The decay's offset feeds an exponential whose products compound over the sequence: it stays
    # fp32 in any dtype, and so do the decay and the state themselves.
    _keep_in_fp32_modules_strict = ["w0"]

    mix_classes = (Rwkv7TimeMix, Rwkv7ChannelMix)

    def _init_mix(self, module: Rwkv7TimeMix | Rwkv7ChannelMix, schedule: LayerSchedule) -> None:
        """BlinkDL's RWKV-7 schedule (for models built from a config)."""
        ramp, ratio_1_to_almost0 = schedule.ramp, schedule.ratio_1_to_almost0
        if isinstance(module, Rwkv7ChannelMix):
            init.copy_(module.x_k, 1.0 - ramp.pow(ratio_1_to_almost0**4))
            return
        for name, power in zip(TIME_MIX_LERPS, (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)):
            init.copy_(getattr(module, name), 1.0 - ramp.pow(power * ratio_1_to_almost0))
        decay_offset = -7 + 5 * schedule.channel.pow(0.85 + schedule.ratio_0_to_1**0.5) + 0.5
        init.copy_(module.w0, decay_offset.view(1, 1, -1))
        init.zeros_(module.a0)
        for low, high in ((module.w1, module.w2), (module.a1, module.a2), (module.g1, module.g2)):
            init.zeros_(low)
            init.normal_(high, std=0.1 / math.sqrt(high.shape[0]))
        if schedule.layer > 0:
            init.ones_(module.v0)
            init.zeros_(module.v1)
            init.normal_(module.v2, std=0.1 / math.sqrt(module.v2.shape[0]))
        init.constant_(module.k_k, 0.85)
        init.ones_(module.k_a)
        init.zeros_(module.r_k)
        init.constant_(module.ln_x.weight, ((1 + schedule.layer) / schedule.num_layers) ** 0.7)
        init.zeros_(module.ln_x.bias)


class Rwkv7Model(RwkvModelBase, Rwkv7PreTrainedModel):
    """The RWKV-7 blocks between the embedding and the final layer norm (forward: `RwkvModelBase`)."""

    block_class = Rwkv7Block
    initial_state_class = Rwkv7InitialState
    supports_reset = True  # the WKV-7 kernel and the token shift reset at packed examples' starts

    def state_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.config.num_hidden_layers, layer_state_size(self.config))

    def empty_state(self, batch: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.zeros(self.state_shape(batch), device=device, dtype=torch.float32)


class Rwkv7ForCausalLM(RwkvForCausalLMBase, Rwkv7PreTrainedModel):
    """RWKV-7 language model (forward and generation: `RwkvForCausalLMBase`)."""

    def __init__(self, config: Rwkv7Config):
        super().__init__(config)
        self.rwkv = Rwkv7Model(config)
        self._init_head(config)
        self.post_init()


register_models(Rwkv7Config, Rwkv7Model, Rwkv7ForCausalLM)
