"""RWKV-4 as a Hugging Face causal language model.

Module and parameter names follow BlinkDL's checkpoints (`emb`, `blocks.N.ln0/ln1/ln2`, `att.key`,
`att.time_decay`, `ffn.receptance`, `ln_out`, `head`), so a BlinkDL state dict maps onto ours by
adding the `rwkv.` prefix (see `rwkv_ft.convert`).

Two modes compute the same function:
- parallel mode: a whole (B, T) sequence through `wkv4` (Triton on CUDA, PyTorch elsewhere);
- RNN mode: the same forward fed one token at a time with the recurrent state carried across.

The recurrent state is one fp32 tensor of shape (B, L, 5, C). Per layer the five slots are the last
ln1 output (time-mix token shift), the last ln2 output (channel-mix token shift), and the WKV state
(numerator / e^max, denominator / e^max, max). Its size is fixed: generation does O(1) work per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from rwkv_ft.kernels import EMPTY_MAX, wkv4

from .configuration_rwkv4 import Rwkv4Config

# Slots of the per-layer state.
ATT_SHIFT, FFN_SHIFT, WKV = 0, 1, slice(2, 5)
STATE_SLOTS = 5
# Key given to masked (padding) positions: exp(PAD_KEY - k) is exactly 0 in fp32 for any real key, so
# a padded token adds nothing to the WKV history.
PAD_KEY = -1e4


def empty_state(batch: int, config: Rwkv4Config, device: torch.device | None = None) -> torch.Tensor:
    """A (B, L, 5, C) fp32 state holding no history."""
    state = torch.zeros(
        batch, config.num_hidden_layers, STATE_SLOTS, config.hidden_size, device=device, dtype=torch.float32
    )
    state[:, :, 4] = EMPTY_MAX
    return state


def token_shift(x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, C) shifted one step right in time, `previous` (B, C) (zeros if None) filling t=0."""
    if previous is None:
        return F.pad(x, (0, 0, 1, -1))
    return torch.cat([previous.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)


def mix(x: torch.Tensor, shifted: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return x * ratio + shifted * (1 - ratio)


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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, T, C) ln1 output; shift: (B, C); wkv_state: (B, 3, C) fp32; mask: (B, T) bool
        shifted = token_shift(x, shift)
        k = self.key(mix(x, shifted, self.time_mix_k))  # (B, T, C)
        v = self.value(mix(x, shifted, self.time_mix_v))
        r = torch.sigmoid(self.receptance(mix(x, shifted, self.time_mix_r)))
        if mask is not None:
            k = k.masked_fill(~mask.unsqueeze(-1), PAD_KEY)
        y, new_wkv_state = wkv4(self.time_decay, self.time_first, k, v, wkv_state, backend=self.wkv_backend)
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

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        # x: (B, T, C) ln2 output; shift: (B, C)
        shifted = token_shift(x, shift)
        k = torch.square(torch.relu(self.key(mix(x, shifted, self.time_mix_k))))  # (B, T, F)
        r = torch.sigmoid(self.receptance(mix(x, shifted, self.time_mix_r)))
        return r * self.value(k)


class Rwkv4Block(GradientCheckpointingLayer):
    def __init__(self, config: Rwkv4Config, layer_id: int):
        super().__init__()
        C, eps = config.hidden_size, config.layer_norm_epsilon
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C, eps=eps)  # applied to the embeddings
        self.ln1 = nn.LayerNorm(C, eps=eps)
        self.ln2 = nn.LayerNorm(C, eps=eps)
        self.att = Rwkv4TimeMix(config, layer_id)
        self.ffn = Rwkv4ChannelMix(config, layer_id)

    def forward(
        self, hidden: torch.Tensor, layer_state: torch.Tensor | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # hidden: (B, T, C); layer_state: (B, 5, C) fp32 or None (empty); mask: (B, T) bool or None
        if self.layer_id == 0:
            hidden = self.ln0(hidden)
        if layer_state is None:
            att_shift = ffn_shift = wkv_state = None
        else:
            att_shift, ffn_shift, wkv_state = (
                layer_state[:, ATT_SHIFT],
                layer_state[:, FFN_SHIFT],
                layer_state[:, WKV],
            )

        x = self._masked(self.ln1(hidden), mask)
        att_out, new_wkv_state = self.att(x, att_shift, wkv_state, mask)
        hidden = hidden + att_out
        x2 = self._masked(self.ln2(hidden), mask)
        hidden = hidden + self.ffn(x2, ffn_shift)

        new_state = torch.cat([x[:, -1:].float(), x2[:, -1:].float(), new_wkv_state], dim=1)  # (B, 5, C)
        return hidden, new_state

    @staticmethod
    def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # A padded position must look like "no previous token" to the token shift of the next one.
        return x if mask is None else x.masked_fill(~mask.unsqueeze(-1), 0.0)


@dataclass
class Rwkv4Output(ModelOutput):
    """Output of `Rwkv4Model`. `state` is (B, L, 5, C) fp32 when `use_cache`, else None."""

    last_hidden_state: torch.Tensor | None = None
    state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class Rwkv4CausalLMOutput(ModelOutput):
    """Output of `Rwkv4ForCausalLM`. Pass `state` back in to continue the sequence."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class Rwkv4PreTrainedModel(PreTrainedModel):
    config_class = Rwkv4Config
    config: Rwkv4Config
    base_model_prefix = "rwkv"
    _no_split_modules = ["Rwkv4Block"]
    # The decay is exponentiated twice: bf16 would move it visibly, so these stay fp32 in any dtype.
    _keep_in_fp32_modules_strict = ["time_decay", "time_first"]
    supports_gradient_checkpointing = True
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BlinkDL's RWKV-4 initialisation schedule for the time parameters; small normals elsewhere."""
        C = self.config.hidden_size
        L = self.config.num_hidden_layers
        if isinstance(module, (Rwkv4TimeMix, Rwkv4ChannelMix)):
            layer = module.layer_id
            ratio_0_to_1 = layer / max(L - 1, 1)
            ratio_1_to_almost0 = 1.0 - layer / L
            ramp = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
            init.copy_(module.time_mix_k, ramp.pow(ratio_1_to_almost0))
            init.copy_(module.time_mix_r, ramp.pow(0.5 * ratio_1_to_almost0))
            if isinstance(module, Rwkv4TimeMix):
                init.copy_(module.time_mix_v, ramp.pow(ratio_1_to_almost0) + 0.3 * ratio_0_to_1)
                h = torch.arange(C, dtype=torch.float32) / max(C - 1, 1)
                init.copy_(module.time_decay, -5 + 8 * h.pow(0.7 + 1.3 * ratio_0_to_1))
                zigzag = 0.5 * (((torch.arange(C) + 1) % 3) - 1).float()
                init.copy_(module.time_first, math.log(0.3) + zigzag)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class Rwkv4Model(Rwkv4PreTrainedModel):
    def __init__(self, config: Rwkv4Config):
        super().__init__(config)
        self.emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList([Rwkv4Block(config, i) for i in range(config.num_hidden_layers)])
        self.ln_out = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        # State tuning (rwkv_ft.adapters.state_tuning) attaches a module here; called with a batch
        # size it returns the learned (B, L, 5, C) fp32 initial state, used wherever no `state` is given.
        self.initial_state: nn.Module | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.emb

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.emb = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Rwkv4Output | tuple:
        """Run the blocks over a (B, T) sequence, optionally continuing from `state`.

        Args:
            attention_mask: (B, T_total) with 1 for real tokens and 0 for padding; only its last T columns
                are read (generation passes the whole history). A padded token does not touch the state.
            state: (B, L, 5, C) fp32 from a previous call; None means an empty history.
            position_ids: only their zeros are read: a 0 after column 0 starts a new packed sequence,
                and the recurrent state is reset there (nothing flows between packed examples).
            use_cache: return the state after the last token. Defaults to `config.use_cache` outside
                training, unless the mask has padding that is not left padding (computing the exact
                state then needs a token-by-token pass; ask for it explicitly with use_cache=True).
        """
        output_hidden_states = bool(output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Rwkv4Model: pass exactly one of input_ids and inputs_embeds")
        hidden = self.emb(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        # The residual stream runs in the layer norms' dtype (fp32 after peft's kbit preparation,
        # which may leave the frozen embedding in bf16 to save memory).
        hidden = hidden.to(self.ln_out.weight.dtype)
        B, T, _ = hidden.shape
        if T == 0:
            raise ValueError("Rwkv4Model: the input sequence is empty (T=0)")
        mask = self._token_mask(attention_mask, B, T)
        if state is not None:
            self._check_state(state, B)

        explicit_cache = use_cache is not None
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if mask is not None and not explicit_cache and not _is_left_padded(mask):
            use_cache = False

        segments = _packed_segments(position_ids, mask, T)
        if segments is None and state is None:
            state = self._learned_initial_state(B)
        if segments is not None:
            if state is not None:
                raise ValueError("Rwkv4Model: packed sequences (position_ids restarting at 0) cannot take a state")
            hidden, all_hidden = self._forward_packed(hidden, segments, output_hidden_states)
            new_state = None
        elif (
            mask is not None
            and (state is not None or not _is_left_padded(mask))
            and (use_cache or not _is_right_padded(mask))
        ):
            hidden, new_state, all_hidden = self._forward_stepwise(hidden, state, mask, output_hidden_states)
        else:
            hidden, new_state, all_hidden = self._run_blocks(hidden, state, mask, output_hidden_states)

        hidden = self.ln_out(hidden)
        if output_hidden_states:
            all_hidden = all_hidden + (hidden,)
        out = Rwkv4Output(
            last_hidden_state=hidden,
            state=new_state if use_cache else None,
            hidden_states=all_hidden if output_hidden_states else None,
        )
        return out if return_dict else out.to_tuple()

    # -- the three ways through the blocks ---------------------------------------------------------

    def _run_blocks(
        self,
        hidden: torch.Tensor,
        state: torch.Tensor | None,
        mask: torch.Tensor | None,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """Parallel mode: every block over the whole sequence. Returns hidden, state (B, L, 5, C), hiddens."""
        all_hidden: tuple[torch.Tensor, ...] = ()
        layer_states = []
        for i, block in enumerate(self.blocks):
            if output_hidden_states:
                all_hidden += (hidden,)
            hidden, layer_state = block(hidden, None if state is None else state[:, i], mask)
            layer_states.append(layer_state)
        return hidden, torch.stack(layer_states, dim=1), all_hidden

    def _forward_stepwise(
        self,
        hidden: torch.Tensor,
        state: torch.Tensor | None,
        mask: torch.Tensor,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """RNN mode with a mask: one token at a time, keeping the state unchanged on padded tokens."""
        B = hidden.shape[0]
        current = state if state is not None else empty_state(B, self.config, hidden.device)
        outputs, per_step_hidden = [], []
        for t in range(hidden.shape[1]):
            out, new_state, step_hidden = self._run_blocks(hidden[:, t : t + 1], current, None, output_hidden_states)
            keep = mask[:, t].view(B, 1, 1, 1)
            current = torch.where(keep, new_state, current)
            outputs.append(out)
            per_step_hidden.append(step_hidden)
        all_hidden = tuple(torch.cat(layer, dim=1) for layer in zip(*per_step_hidden)) if output_hidden_states else ()
        return torch.cat(outputs, dim=1), current, all_hidden

    def _forward_packed(
        self, hidden: torch.Tensor, segments: list[tuple[int, int, int]], output_hidden_states: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Packed rows: lay every packed example out as its own row, run them fresh, scatter back."""
        B, T, C = hidden.shape
        longest = max(length for _, _, length in segments)
        rows, cols, seg_rows, seg_cols = [], [], [], []
        for i, (row, start, length) in enumerate(segments):
            rows += [row] * length
            cols += range(start, start + length)
            seg_rows += [i] * length
            seg_cols += range(length)
        index = [torch.tensor(ix, device=hidden.device) for ix in (rows, cols, seg_rows, seg_cols)]
        unpacked = hidden.new_zeros(len(segments), longest, C)  # right-padded: padding follows each example
        unpacked[index[2], index[3]] = hidden[index[0], index[1]]
        initial = self._learned_initial_state(len(segments))
        out, _, seg_hidden = self._run_blocks(unpacked, initial, None, output_hidden_states)

        def repack(x: torch.Tensor) -> torch.Tensor:
            packed = x.new_zeros(B, T, C)
            packed[index[0], index[1]] = x[index[2], index[3]]
            return packed

        return repack(out), tuple(repack(h) for h in seg_hidden)

    def _learned_initial_state(self, batch: int) -> torch.Tensor | None:
        """The state-tuned initial state for `batch` rows, or None (empty history) when none is attached."""
        return None if self.initial_state is None else self.initial_state(batch)

    # -- input checks -----------------------------------------------------------------------------

    def _token_mask(self, attention_mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
        """(B, T) bool mask of real tokens, or None when there is no padding."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
            raise ValueError(
                f"attention_mask must be (batch, >= seq_len) = ({B}, >={T}), got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask[:, -T:].bool()
        return None if bool(mask.all()) else mask

    def _check_state(self, state: torch.Tensor, B: int) -> None:
        expected = (B, self.config.num_hidden_layers, STATE_SLOTS, self.config.hidden_size)
        if tuple(state.shape) != expected:
            raise ValueError(f"state must have shape (B, L, 5, C) = {expected}, got {tuple(state.shape)}")


def _is_left_padded(mask: torch.Tensor) -> bool:
    """Every row is padding followed by real tokens."""
    return bool((mask[:, 1:] >= mask[:, :-1]).all())


def _is_right_padded(mask: torch.Tensor) -> bool:
    """Every row is real tokens followed by padding."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def _packed_segments(
    position_ids: torch.Tensor | None, mask: torch.Tensor | None, T: int
) -> list[tuple[int, int, int]] | None:
    """(row, start, length) of every packed example, or None when no row restarts after column 0.

    A packed example starts at a real token with position id 0 that follows another real token.
    (generate() passes position ids that are 0 on left padding and on the first real token: those
    are not restarts.)
    """
    if position_ids is None:
        return None
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    starts = position_ids[:, -T:] == 0
    if mask is not None:
        starts[:, 1:] &= mask[:, 1:] & mask[:, :-1]
    if not bool(starts[:, 1:].any()):
        return None
    starts[:, 0] = True
    segments = []
    for row, row_starts in enumerate(starts.cpu()):
        begin = row_starts.nonzero().flatten().tolist() + [T]
        segments += [(row, s, e - s) for s, e in zip(begin[:-1], begin[1:])]
    return segments


class Rwkv4ForCausalLM(Rwkv4PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"head.weight": "rwkv.emb.weight"}

    def __init__(self, config: Rwkv4Config):
        super().__init__(config)
        self.rwkv = Rwkv4Model(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> Rwkv4CausalLMOutput | tuple:
        """Logits for every position (or the last `logits_to_keep`), the loss when `labels` are given
        (shifted inside, -100 ignored), and the state after the last token. See `Rwkv4Model.forward`."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.rwkv(
            input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            state=state,
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.head(hidden.to(self.head.weight.dtype))  # (B, T, V)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        result = Rwkv4CausalLMOutput(loss=loss, logits=logits, state=out.state, hidden_states=out.hidden_states)
        return result if return_dict else result.to_tuple()
