"""The learned initial state of an RWKV-4 model (state tuning's RWKV-4 part).

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
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn


class Rwkv4InitialState(nn.Module):
    """The learned (L, 5, C) initial state; called with a batch size it returns it as (B, L, 5, C) fp32."""

    def __init__(self, model_config, config):
        super().__init__()
        self.config = config
        L, C = model_config.num_hidden_layers, model_config.hidden_size
        self.wkv_value = nn.Parameter(torch.zeros(L, C))
        self.wkv_log_weight = nn.Parameter(torch.full((L, C), float(config.init_log_weight)))
        if config.train_token_shift:
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

    @staticmethod
    def matches(state: torch.Tensor) -> bool:
        """Whether a materialised state has this version's layout, (L, 5, C)."""
        return state.dim() == 3 and state.shape[1] == 5

    @staticmethod
    def rwkv_package_state(state: torch.Tensor) -> list[torch.Tensor]:
        """Our (L, 5, C) state as the list BlinkDL's `rwkv` package takes for RWKV-4:
        per layer [att shift, numerator, denominator, max, ffn shift]."""
        order = (0, 2, 3, 4, 1)
        return [state[layer, slot].float().clone() for layer in range(state.shape[0]) for slot in order]

    @staticmethod
    def blinkdl_state_dict(state: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """RWKV-4 has no BlinkDL state-file convention (RWKV-PEFT's time_state files are RWKV-5+)."""
        return None
