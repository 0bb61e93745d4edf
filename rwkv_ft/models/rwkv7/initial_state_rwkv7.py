"""The learned initial state of an RWKV-7 model (state tuning's RWKV-7 part).

The WKV state of a layer is an unconstrained (H, N, N) matrix, so it is learned directly
("wkv", (L, H, N, N), starting at zero: the empty history), as RWKV-PEFT does. The token-shift
states (the previous ln1/ln2 outputs) are learned too with `train_token_shift=True`.
Export: `blinkdl_state_dict` gives `blocks.N.att.time_state` tensors of shape (H, N, N) in BlinkDL's
[value, key] layout, the state file RWKV-PEFT writes and RWKV-Runner loads.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn


class Rwkv7InitialState(nn.Module):
    """The learned (L, 2C + H*N*N) initial state; called with a batch size it returns (B, L, ...) fp32."""

    def __init__(self, model_config, config):
        super().__init__()
        self.config = config
        L, C = model_config.num_hidden_layers, model_config.hidden_size
        H, N = model_config.num_heads, model_config.head_size
        self.wkv = nn.Parameter(torch.zeros(L, H, N, N))
        if config.train_token_shift:
            self.att_shift = nn.Parameter(torch.zeros(L, C))
            self.ffn_shift = nn.Parameter(torch.zeros(L, C))
        self._hidden_size = C

    def state(self) -> torch.Tensor:
        """(L, 2C + H*N*N) fp32 in the model's layout: att shift, ffn shift, WKV."""
        L = self.wkv.shape[0]
        zeros = self.wkv.new_zeros(L, self._hidden_size, dtype=torch.float32)
        att = self.att_shift.float() if self.config.train_token_shift else zeros
        ffn = self.ffn_shift.float() if self.config.train_token_shift else zeros
        return torch.cat([att, ffn, self.wkv.float().flatten(1)], dim=1)

    def forward(self, batch: int) -> torch.Tensor:
        return self.state().unsqueeze(0).expand(batch, -1, -1)

    @torch.no_grad()
    def set_from_state(self, state: torch.Tensor) -> None:
        """Start from a real (L, 2C + H*N*N) state, e.g. the state after reading a prompt (`out.state[0]`)."""
        L, H, N, _ = self.wkv.shape
        C = self._hidden_size
        if tuple(state.shape) != (L, 2 * C + H * N * N):
            raise ValueError(f"set_from_state: expected a ({L}, {2 * C + H * N * N}) state, got {tuple(state.shape)}")
        self.wkv.copy_(state[:, 2 * C :].view(L, H, N, N))
        if self.config.train_token_shift:
            self.att_shift.copy_(state[:, :C])
            self.ffn_shift.copy_(state[:, C : 2 * C])

    def describe(self) -> dict:
        L, H, N, _ = self.wkv.shape
        return {
            "num_layers": L,
            "num_heads": H,
            "head_size": N,
            "parameters": sum(p.numel() for p in self.parameters()),
            **asdict(self.config),
        }

    @staticmethod
    def _parts(state: torch.Tensor) -> tuple[int, int, int]:
        """(C, H, N) of a materialised (L, 2C + H*N*N) state, given H*N = C."""
        size = state.shape[1]
        for N in (64, 32, 128, 16, 256, 8):
            # size = 2C + C*N with C = H*N
            if size % (N + 2) == 0 and (size // (N + 2)) % N == 0:
                C = size // (N + 2)
                return C, C // N, N
        raise ValueError(f"not an RWKV-7 state: a layer holds {size} floats")

    @classmethod
    def matches(cls, state: torch.Tensor) -> bool:
        """Whether a materialised state has this version's layout, (L, 2C + H*N*N)."""
        if state.dim() != 2:
            return False
        try:
            cls._parts(state)
        except ValueError:
            return False
        return True

    @classmethod
    def rwkv_package_state(cls, state: torch.Tensor) -> list[torch.Tensor]:
        """Our (L, 2C + H*N*N) state as the list BlinkDL's `rwkv` package takes for RWKV-7:
        per layer [att shift (C), WKV (H, N, N) fp32, ffn shift (C)]."""
        C, H, N = cls._parts(state)
        out = []
        for layer in state.float():
            out += [layer[:C].clone(), layer[2 * C :].view(H, N, N).clone(), layer[C : 2 * C].clone()]
        return out

    @classmethod
    def blinkdl_state_dict(cls, state: torch.Tensor) -> dict[str, torch.Tensor]:
        """`blocks.N.att.time_state` (H, N, N) fp32 per layer: RWKV-PEFT's state-tuning file format."""
        C, H, N = cls._parts(state)
        return {
            f"blocks.{i}.att.time_state": layer[2 * C :].view(H, N, N).clone() for i, layer in enumerate(state.float())
        }
