"""What every RWKV model of ours shares with transformers: generation with a recurrent state, the
activation-checkpointing switches, and a few input checks. Nothing here knows an RWKV version.

Generation. An RWKV model's whole history is a fixed-size state, returned by `forward` as
`output.state` and taken back as `forward(..., state=...)`. Which key `generate()` carries a cache
under, and whether and how beam search reorders it, have moved between transformers releases
(`past_key_values`, `cache_params`, `state`, `cache`; 5.0 reorders only `past_key_values`). We rely
on none of it: `_update_model_kwargs_for_generation` keeps the state in an object of our own under
our own key (which no release treats as a cache), `prepare_inputs_for_generation` (ours, not the
base class's) feeds only the newest token, and matches every sequence to the state of the
sequence it continues, so beam search's reordering of sequences is followed exactly whatever the
release does with caches. Both hooks have had the same signatures across the releases we support.
Every step is O(1) in the sequence length.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from rwkv_ft.models.offload import ChunkOffload

# model_kwargs key holding our _GenerationState (not a cache name any transformers release knows).
_GENERATION_KEY = "rwkv_generation"


@dataclass
class _GenerationState:
    """The state between generation steps, and which token ids each of its rows covers."""

    state: torch.Tensor | None = None
    covered: torch.Tensor | None = None  # (rows, length) ids the state covers; None: rows align already
    pending: torch.Tensor | None = None  # ids the step in flight will cover

    def rows_for(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """The state rows continuing each row of `input_ids` (whose last column is the new token).

        Beam search may reorder and duplicate sequences between steps; a sequence's state is that
        of the previous sequence equal to its prefix (equal prefixes have equal states)."""
        prefix, covered = input_ids[:, :-1], self.covered
        if covered is None or torch.equal(covered, prefix):
            return self.state
        if covered.shape != prefix.shape:
            raise RuntimeError(
                f"generate(): the state covers {tuple(covered.shape)} ids but the sequences continue from "
                f"{tuple(prefix.shape)}; start a new generate() call"
            )
        same = (prefix[:, None, :] == covered[None, :, :]).all(-1)  # (rows, previous rows)
        if not bool(same.any(1).all()):
            raise RuntimeError("generate(): a sequence continues none of the previous ones; cannot follow its state")
        return self.state.index_select(0, same.to(torch.int8).argmax(1).to(self.state.device))


class RwkvGenerationMixin(GenerationMixin):
    """`generate()` for our stateful RWKV models: greedy, sampling and beam search, batched, left padding."""

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        state: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The inputs of one generation step.

        With a current state (every step after the first, when `use_cache`), only the newest token is
        fed, with the state of the sequence it continues. Otherwise the whole sequence is: on the
        first step (from `state`, if the caller passed one to `generate`, else from the empty or
        learned initial state), and on every step with `use_cache=False`. Keys transformers passes
        that an RWKV model has no use for (caches, position ids, cache positions) are dropped: the
        state carries all the history.
        """
        held: _GenerationState | None = kwargs.get(_GENERATION_KEY)
        inputs: dict[str, Any] = {"use_cache": use_cache, "attention_mask": attention_mask}
        if held is not None and held.state is not None and use_cache is not False:
            inputs["input_ids"] = input_ids[:, -1:]
            inputs["state"] = held.rows_for(input_ids)
            held.pending = input_ids
        elif inputs_embeds is not None:
            if input_ids.shape[1] > 0:  # generated tokens that the embeddings do not cover
                raise ValueError("generate() with inputs_embeds needs use_cache=True (the state carries the prompt)")
            inputs["inputs_embeds"], inputs["state"] = inputs_embeds, state
        else:
            inputs["input_ids"], inputs["state"] = input_ids, state
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        if output_hidden_states is not None:
            inputs["output_hidden_states"] = output_hidden_states
        return inputs

    def _update_model_kwargs_for_generation(
        self, outputs, model_kwargs: dict[str, Any], is_encoder_decoder: bool = False, num_new_tokens: int = 1
    ) -> dict[str, Any]:
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        state = getattr(outputs, "state", None)
        if state is not None and model_kwargs.get("use_cache", True) is not False:
            held = model_kwargs.setdefault(_GENERATION_KEY, _GenerationState())
            # After the prompt, rows are aligned (beam search's copies of one prompt share a state).
            held.state, held.covered, held.pending = state, held.pending, None
            # A state the caller passed to generate() is consumed; under a cache name, some releases
            # would try to reorder it for beam search.
            model_kwargs.pop("state", None)
        return model_kwargs

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # A DynamicCache (attention keys/values) has no meaning for an RNN state.
        return False


class LayerSchedule:
    """The per-layer ratios and per-channel ramp of BlinkDL's initialisation, as every version uses them."""

    def __init__(self, layer: int, config) -> None:
        C, L = config.hidden_size, config.num_hidden_layers
        self.layer, self.num_layers = layer, L
        self.ratio_0_to_1 = layer / max(L - 1, 1)
        self.ratio_1_to_almost0 = 1.0 - layer / L
        self.ramp = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)  # (1, 1, C)
        self.channel = torch.arange(C, dtype=torch.float32) / max(C - 1, 1)  # (C,), 0 to 1


class RwkvPreTrainedModelMixin:
    """Activation checkpointing through the current transformers API, without deprecation noise.

    peft (0.17-0.21) still calls the deprecated `gradient_checkpointing_enable` and reads
    `is_gradient_checkpointing`; on transformers releases that deprecate them every train and merge
    would print a FutureWarning the user can do nothing about. We answer both names ourselves.
    """

    supports_gradient_checkpointing = True
    _is_stateful = True
    mix_classes: tuple[type[nn.Module], ...] = ()  # the version's time- and channel-mix modules

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BlinkDL's initialisation: the version's schedule for its mix modules (`_init_mix`), small
        normals for linear maps and embeddings, unit layer norms."""
        if isinstance(module, self.mix_classes):
            self._init_mix(module, LayerSchedule(module.layer_id, self.config))
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def _init_mix(self, module: nn.Module, schedule: LayerSchedule) -> None:
        raise NotImplementedError

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        kwargs_ = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*gradient_checkpointing_enable.*deprecated", category=FutureWarning
            )
            PreTrainedModel.gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=kwargs_, **kwargs)
        # transformers (5.23+) counts `every_n_layers` over its own layer class only: count our blocks.
        every_n_layers = kwargs.get("every_n_layers", 1)
        for index, block in enumerate(rwkv_blocks(self)):
            block.gradient_checkpointing = index % every_n_layers == 0

    def save_pretrained(self, *args: Any, **kwargs: Any):
        """The model's own weights; an attached learned initial state (state tuning) is an adapter,
        saved by `rwkv_ft.adapters.save_adapter` / `save_state_tuning`, not part of the model."""
        inner = self if isinstance(self, RwkvModelBase) else getattr(self, "rwkv", None)
        initial = getattr(inner, "initial_state", None)
        if initial is None:
            return PreTrainedModel.save_pretrained(self, *args, **kwargs)
        inner.initial_state = None
        try:
            return PreTrainedModel.save_pretrained(self, *args, **kwargs)
        finally:
            inner.initial_state = initial

    def gradient_checkpointing_disable(self) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*gradient_checkpointing_disable.*deprecated", category=FutureWarning
            )
            PreTrainedModel.gradient_checkpointing_disable(self)
        for block in rwkv_blocks(self):
            block.selective_recompute = False

    def compile_blocks(self, **compile_kwargs: Any) -> None:
        """`torch.compile` every block (`fullgraph=True` unless overridden), in place.

        The blocks are where the time goes; compiling each one fuses its elementwise chains (token
        shift and lerps, sigmoid / squared ReLU, norms, LoRA's scale-and-add) and removes most
        kernel launches, while the embedding, the head and the loss stay eager. Every block after
        the first shares one compiled graph; the WKV kernels are custom ops the graph calls as they
        are. Works with peft's LoRA (call it after `get_peft_model`, or on the peft model: peft
        forwards the call), with gradient checkpointing and selective recompute, in training and
        inference. Compilation happens at the first call; a new sequence length compiles once more
        (then with a dynamic length). `rwkv_ft.train` calls this for `training.compile: true`.
        """
        kwargs = {"fullgraph": True, **compile_kwargs}
        # Every block of every model shares one code object, so dynamo's per-code cache holds one
        # entry per (first block / others) x (train / no-grad) x (static / dynamic length) x (with
        # a state / mask, ...) x models in this process; past its limit a fullgraph compile fails.
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, COMPILED_BLOCK_VARIANTS)
        for block in rwkv_blocks(self):
            block.compile(**kwargs)
            block.cudagraphs = kwargs.get("mode") in CUDAGRAPH_COMPILE_MODES

    def set_activation_recompute(self, mode: str, selective_blocks: int = 0) -> None:
        """What the backward recomputes instead of keeping: "none"; "full" (whole-block activation
        checkpointing, as `gradient_checkpointing_enable`: only each block's input is kept); or
        "selective" (each block keeps its large matmuls' outputs and recomputes everything else:
        norms, token shifts, elementwise chains, low-rank products, and the WKV kernels unless
        their op is registered with `keep_outputs`, see `rwkv_ft.kernels.custom_ops`).
        selective_blocks: with "full", this many blocks (the last ones) recompute selectively
        instead (`recompute_last_blocks_selectively`)."""
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"activation recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {mode!r}")
        if selective_blocks and mode != "full":
            raise ValueError(f"selective_blocks applies to the 'full' recompute mode, not {mode!r}")
        if self.is_gradient_checkpointing:
            self.gradient_checkpointing_disable()
        if mode == "full":
            enable_activation_checkpointing(self)
        for block in rwkv_blocks(self):
            block.selective_recompute = mode == "selective"
        recompute_last_blocks_selectively(self, selective_blocks)


def is_compiled_module(module: nn.Module) -> bool:
    """Whether `module.compile()` has been called on `module`."""
    return getattr(module, "_compiled_call_impl", None) is not None


RECOMPUTE_MODES = ("none", "full", "selective")
# torch.compile modes that replay CUDA graphs (CUDA graph trees)
CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
# dynamo's recompile limit while blocks are compiled (its default, 8, is reached by one model's
# training, evaluation and generation graphs at a few sequence lengths).
COMPILED_BLOCK_VARIANTS = 64


def recompute_last_blocks_selectively(model: torch.nn.Module, count: int) -> None:
    """Under whole-block checkpointing, let the last `count` blocks recompute selectively instead:
    each keeps its large matmuls' outputs, so its backward skips the forward's matmuls. Memory left
    under a budget buys speed this way, block by block (RWKV-4 7.6B, batch 1, ctx 1024: ~90 MiB
    reserved and ~0.7 ms of the step per block, between the two modes' measured ends; see
    benchmarks/NOTES.md). Selective recompute, where set, takes precedence over a block's
    `gradient_checkpointing`."""
    blocks = rwkv_blocks(model)
    if not 0 <= count <= len(blocks):
        raise ValueError(f"selective_blocks must be between 0 and the model's {len(blocks)} blocks, got {count}")
    for block in blocks[len(blocks) - count :]:
        block.selective_recompute = True


def enable_activation_checkpointing(model: torch.nn.Module, mode: str = "full") -> None:
    """Turn on activation checkpointing on a transformers model (or a peft wrapper): "full"
    (non-reentrant, through whichever name this transformers release offers) or "selective" (see
    `RwkvPreTrainedModelMixin.set_activation_recompute`)."""
    if mode == "selective":
        for block in rwkv_blocks(model):
            block.selective_recompute = True
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def rwkv_blocks(model: torch.nn.Module) -> list[RwkvBlock]:
    """Every RWKV block inside `model` (a model of ours, or a peft / DDP wrapper around one)."""
    return [m for m in model.modules() if isinstance(m, RwkvBlock)]


# --------------------------------------------------------------------------------------------------
# Blocks: selective recompute


# Matmuls whose outputs selective recompute keeps: recomputing them would cost a large share of the
# forward. A product over an inner dimension this small (LoRA's r, RWKV-7's low-rank maps) is cheap
# to recompute and its output may be as large as a big one's.
SELECTIVE_MIN_INNER_DIM = 128


def _selective_recompute_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    from rwkv_ft.kernels.custom_ops import KEPT_BY_SELECTIVE_RECOMPUTE

    if op in KEPT_BY_SELECTIVE_RECOMPUTE:
        return CheckpointPolicy.MUST_SAVE
    aten = torch.ops.aten
    if op in (aten.mm.default, aten.bmm.default) and args[0].shape[-1] >= SELECTIVE_MIN_INNER_DIM:
        return CheckpointPolicy.MUST_SAVE
    if op in (aten.addmm.default, aten.baddbmm.default) and args[1].shape[-1] >= SELECTIVE_MIN_INNER_DIM:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_recompute_context():
    """The `context_fn` of `torch.utils.checkpoint.checkpoint` for selective recompute."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_recompute_policy)


class RwkvBlock(nn.Module):
    """What every version's block shares. A block is called as `block(hidden, layer_state, mask,
    reset, carry)` and returns `(hidden, new_layer_state, carry)` (see `RwkvModelBase`); the version
    implements `block_forward` with that contract.

    Both kinds of recompute run inside `forward`, so a compiled block (`compile_blocks`) compiles
    the checkpoint with it and the recompute is part of its backward graph (and of its CUDA graphs
    under `mode="reduce-overhead"`):
    - whole-block activation checkpointing, switched on by transformers' `gradient_checkpointing_enable`
      (which sets `gradient_checkpointing` and `_gradient_checkpointing_func` on every module that has
      the attribute). transformers' own `GradientCheckpointingLayer` is not used: before its
      5.23 release it checkpoints around `__call__`, i.e. around the compiled block, and an eager
      checkpoint around CUDA-graphed code fails at the recompute (the block inputs it saved are
      graph outputs that a later replay overwrites).
    - selective recompute (`selective_recompute`, set by `set_activation_recompute("selective")`):
      the outputs of the large matmuls are kept, all else is recomputed in the backward.
    """

    gradient_checkpointing: bool = False
    selective_recompute: bool = False
    cudagraphs: bool = False  # compiled with a mode that replays CUDA graphs (`compile_blocks`)

    def __init__(self, config: PretrainedConfig, layer_id: int):
        """The pre-norm layout every version has: `ln1` before the time mix, `ln2` before the channel
        mix, and on block 0 `ln0` over the embeddings (the checkpoints' names). The version adds
        `att` and `ffn`."""
        super().__init__()
        C, eps = config.hidden_size, config.layer_norm_epsilon
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C, eps=eps)  # applied to the embeddings
        self.ln1 = nn.LayerNorm(C, eps=eps)
        self.ln2 = nn.LayerNorm(C, eps=eps)

    def forward(
        self,
        hidden: torch.Tensor,
        layer_state: torch.Tensor | None,
        mask: torch.Tensor | None,
        reset: torch.Tensor | None = None,
        carry: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        args = (hidden, layer_state, mask, reset, carry)
        if not (self.training and torch.is_grad_enabled()):
            return self.block_forward(*args)
        from torch.utils.checkpoint import checkpoint

        if self.selective_recompute:
            return checkpoint(self.block_forward, *args, use_reentrant=False, context_fn=selective_recompute_context)
        if self.gradient_checkpointing:
            if torch.compiler.is_compiling():  # traced into the graph: only the non-reentrant form compiles
                return checkpoint(self.block_forward, *args, use_reentrant=False)
            return self._gradient_checkpointing_func(self.block_forward, *args)
        return self.block_forward(*args)

    def block_forward(
        self,
        hidden: torch.Tensor,
        layer_state: torch.Tensor | None,
        mask: torch.Tensor | None,
        reset: torch.Tensor | None = None,
        carry: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """A clear error for ids outside the embedding (instead of an IndexError or a CUDA assert)."""
    if input_ids.numel() == 0 or input_ids.is_meta or torch.compiler.is_compiling():
        return
    if input_ids.is_cuda and torch.cuda.is_current_stream_capturing():  # recorded once, replayed: the
        return  # replaying code checks each batch (rwkv_ft.step_graph)
    low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one host sync for both
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"token id {bad} is outside the model's vocabulary of {vocab_size} ids (0..{vocab_size - 1}); "
            "the tokenizer does not match this model's embedding"
        )


# --------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class RwkvOutput(ModelOutput):
    """Output of an RWKV base model. `state` is the (B, L, ...) fp32 state when `use_cache`, else None."""

    last_hidden_state: torch.Tensor | None = None
    state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class RwkvCausalLMOutput(ModelOutput):
    """Output of an RWKV causal LM. Pass `state` back in to continue the sequence."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


# --------------------------------------------------------------------------------------------------
# Token shift, masks and packed rows


def token_shift(x: torch.Tensor, previous: torch.Tensor | None, reset: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, T, C) shifted one step right in time: position t sees x[t-1], t=0 sees `previous` (B, C)
    (zeros if None), and a packed example's first token (`reset`, (B, T) bool) sees zeros."""
    if previous is None:
        shifted = torch.nn.functional.pad(x, (0, 0, 1, -1))
    else:
        shifted = torch.cat([previous.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)
    return shifted if reset is None else shifted.masked_fill(reset.unsqueeze(-1), 0.0)


def masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, C) with padded positions zeroed: a pad must look like "no previous token" to the
    token shift of the next one."""
    return x if mask is None else x.masked_fill(~mask.unsqueeze(-1), 0.0)


def is_left_padded(mask: torch.Tensor) -> bool:
    """Every row is padding followed by real tokens."""
    return bool((mask[:, 1:] >= mask[:, :-1]).all())


def is_right_padded(mask: torch.Tensor) -> bool:
    """Every row is real tokens followed by padding."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def has_inner_padding(mask: torch.Tensor) -> bool:
    """Some row has padding between two of its real tokens."""
    runs = (mask[:, 1:] & ~mask[:, :-1]).sum(1) + mask[:, 0]  # runs of real tokens per row
    return bool((runs > 1).any())


def segment_starts(position_ids: torch.Tensor | None, mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """(B, T) bool: True where a packed example starts after column 0, or None when no row restarts.

    A packed example starts at a real token with position id 0 that follows another real token.
    (generate() may pass position ids that are 0 on left padding and on the first real token:
    those are not restarts.)
    """
    if position_ids is None:
        return None
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    starts = position_ids[:, -T:] == 0
    if mask is not None:
        starts[:, 1:] &= mask[:, 1:] & mask[:, :-1]
    starts[:, 0] = False
    return starts if bool(starts.any()) else None


def packed_segments(starts: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, length) of every packed example, from the (B, T) restart flags."""
    B, T = starts.shape
    segments = []
    for row, row_starts in enumerate(starts.cpu()):
        begin = [0] + row_starts.nonzero().flatten().tolist() + [T]
        segments += [(row, s, e - s) for s, e in zip(begin[:-1], begin[1:])]
    return segments


# --------------------------------------------------------------------------------------------------
# The base model: embeddings -> blocks -> ln_out, with every way through the blocks


class RwkvModelBase:
    """Forward plumbing shared by every RWKV version: masks, left/right/inner padding, packed rows,
    the carried state and the learned initial state (state tuning).

    Mixed into a version's `PreTrainedModel` (`class Rwkv4Model(RwkvModelBase, Rwkv4PreTrainedModel)`),
    which names its `block_class` (built as `block_class(config, layer_id)`) and implements
    `empty_state` and `state_shape`. Each block is called as `block(hidden, layer_state, mask, reset, carry)` and
    returns `(hidden, new_layer_state, carry)`: `layer_state` is `state[:, i]` (None: empty),
    `mask` the (B, T) real-token mask or None, `reset` the (B, T) packed-example starts or None
    (only passed when the class sets `supports_reset`), and `carry` whatever a block hands to the
    next one (RWKV-7's value residual) or None.
    """

    # True when the blocks reset their state at `reset` flags themselves; otherwise packed rows are
    # re-laid out one example per row (exact, but each example is padded to the longest).
    supports_reset: bool = False
    block_class: type[RwkvBlock]
    # Called with each block's output hidden state in parallel mode, or None. Long-context offloading
    # (`rwkv_ft.models.offload`) sets it for a chunked forward, to time its prefetch by the backward.
    block_output_hook: Callable[[torch.Tensor], None] | None = None

    def __init__(self, config) -> None:
        super().__init__(config)
        self.emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList([self.block_class(config, i) for i in range(config.num_hidden_layers)])
        self.ln_out = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        # State tuning (rwkv_ft.adapters.state_tuning) attaches a module here; called with a batch size
        # it returns the learned (B, L, ...) fp32 initial state, used wherever no `state` is given.
        self.initial_state: nn.Module | None = None
        self.post_init()

    def empty_state(self, batch: int, device: torch.device | None = None) -> torch.Tensor:
        raise NotImplementedError

    def state_shape(self, batch: int) -> tuple[int, ...]:
        raise NotImplementedError

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
        reset: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> RwkvOutput | tuple:
        """Run the blocks over a (B, T) sequence, optionally continuing from `state`.

        Args:
            attention_mask: (B, T_total) with 1 for real tokens and 0 for padding; only its last T columns
                are read (generation passes the whole history). A padded token does not touch the state.
            state: the (B, L, ...) fp32 state from a previous call; None means an empty history (or the
                learned initial state, when state tuning is attached).
            position_ids: only their zeros are read: a 0 after column 0 starts a new packed sequence,
                and the recurrent state is reset there (nothing flows between packed examples).
            use_cache: return the state after the last token. Defaults to `config.use_cache` outside
                training, unless the mask has padding that is not left padding (computing the exact
                state then needs a token-by-token pass; ask for it explicitly with use_cache=True).
            reset: (B, T) bool, instead of position_ids: where true the state is reset before that
                token, column 0 included (a packed example that starts a chunk of a long row).
        """
        name = type(self).__name__
        output_hidden_states = bool(output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{name}: pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            check_token_ids(input_ids, self.emb.num_embeddings)
        hidden = self.emb(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        # The residual stream runs in the layer norms' dtype (fp32 after peft's kbit preparation,
        # which may leave the frozen embedding in bf16 to save memory).
        hidden = hidden.to(self.ln_out.weight.dtype)
        B, T, _ = hidden.shape
        if T == 0:
            raise ValueError(f"{name}: the input sequence is empty (T=0)")
        mask = _token_mask(attention_mask, B, T)
        if state is not None and tuple(state.shape) != self.state_shape(B):
            raise ValueError(f"{name}: state must have shape {self.state_shape(B)}, got {tuple(state.shape)}")

        explicit_cache = use_cache is not None
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if mask is not None and not explicit_cache and not is_left_padded(mask):
            use_cache = False

        starts = reset if reset is not None else segment_starts(position_ids, mask, T)
        if starts is not None and bool(starts.any()):
            if self.supports_reset and self.initial_state is None:
                _check_packed_padding(mask, state, name)
                hidden, new_state, all_hidden = self._run_blocks(hidden, state, mask, starts, output_hidden_states)
            elif state is not None:
                raise ValueError(
                    f"{name}: packed sequences (position_ids restarting at 0) cannot take a state for this model "
                    "(its blocks cannot reset the state mid-row, or a learned initial state is attached)"
                )
            else:
                hidden, all_hidden = self._forward_packed(hidden, packed_segments(starts), output_hidden_states)
                new_state = None
        else:
            if state is None:
                state = self._learned_initial_state(B)
            if (
                mask is not None
                and (state is not None or not is_left_padded(mask))
                and (use_cache or not is_right_padded(mask))
            ):
                hidden, new_state, all_hidden = self._forward_stepwise(hidden, state, mask, output_hidden_states)
            else:
                hidden, new_state, all_hidden = self._run_blocks(hidden, state, mask, None, output_hidden_states)

        hidden = self.ln_out(hidden)
        if output_hidden_states:
            all_hidden = all_hidden + (hidden,)
        out = RwkvOutput(
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
        reset: torch.Tensor | None,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """Parallel mode: every block over the whole sequence. Returns hidden, state (B, L, ...), hiddens."""
        all_hidden: tuple[torch.Tensor, ...] = ()
        layer_states, carry = [], None
        for i, block in enumerate(self.blocks):
            if output_hidden_states:
                all_hidden += (hidden,)
            hidden, layer_state, carry = block(hidden, None if state is None else state[:, i], mask, reset, carry)
            if self.block_output_hook is not None:
                self.block_output_hook(hidden)
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
        current = state if state is not None else self.empty_state(B, hidden.device)
        outputs, per_step_hidden = [], []
        for t in range(hidden.shape[1]):
            out, new_state, step_hidden = self._run_blocks(
                hidden[:, t : t + 1], current, None, None, output_hidden_states
            )
            keep = mask[:, t].view(B, *([1] * (current.dim() - 1)))
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
        out, _, seg_hidden = self._run_blocks(unpacked, initial, None, None, output_hidden_states)

        def repack(x: torch.Tensor) -> torch.Tensor:
            packed = x.new_zeros(B, T, C)
            packed[index[0], index[1]] = x[index[2], index[3]]
            return packed

        return repack(out), tuple(repack(h) for h in seg_hidden)

    def _learned_initial_state(self, batch: int) -> torch.Tensor | None:
        """The state-tuned initial state for `batch` rows, or None (empty history) when none is attached."""
        return None if self.initial_state is None else self.initial_state(batch)


def _check_packed_padding(mask: torch.Tensor | None, state: torch.Tensor | None, name: str) -> None:
    """Packed rows run in parallel mode with resets, which is exact with padding after a row's
    tokens, and before them when the row starts empty. Elsewhere a pad would still decay (RWKV-4)
    or hide the previous token from the token shift: refuse rather than return wrong values."""
    if mask is None:
        return
    if has_inner_padding(mask) or (state is not None and not is_right_padded(mask)):
        raise ValueError(
            f"{name}: packed sequences (position_ids restarting at 0) take padding only after a row's tokens, "
            "or before them when no state is passed; split rows with inner padding into separate rows"
        )


def _token_mask(attention_mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """(B, T) bool mask of real tokens, or None when there is no padding."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
        raise ValueError(
            f"attention_mask must be (batch, >= seq_len) = ({B}, >={T}), got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask[:, -T:].bool()
    return None if bool(mask.all()) else mask


class RwkvForCausalLMBase(RwkvGenerationMixin):
    """The language-model head over an RWKV base model (`self.rwkv`), shared by every version."""

    _tied_weights_keys = {"head.weight": "rwkv.emb.weight"}
    # Long-context training (set by rwkv_ft.train from training.chunk_len): sequences longer than
    # this many tokens are run in chunks with the state carried, gradient included (see
    # `_chunked_loss`). None: one pass over the whole sequence.
    train_chunk_len: int | None = None
    # What a non-finite chunk loss does: raise FloatingPointError naming the chunk (True), or leave
    # the returned loss non-finite and name the chunk through `nonfinite_chunk()` (False: rwkv_ft.train,
    # where every rank must reach the cross-rank check of the step's loss before any of them stops).
    raise_on_nonfinite_chunk: bool = True
    # Whether the last chunk is recomputed in the backward like the others. It need not be (its
    # backward runs first, so keeping its activations does not raise the peak), but under DeepSpeed
    # ZeRO-3 a chunk recomputed after one that was not sees some parameters still partitioned
    # (a CheckpointError on 2 processes); rwkv_ft.train sets this there.
    recompute_last_chunk: bool = False
    # Share (0..1) of the chunks before the last whose activations wait in host memory instead of
    # being recomputed in the backward (`rwkv_ft.models.offload`; set from training.chunk_offload).
    train_chunk_offload: float = 0.0
    # How a chunk before the last is recomputed in the backward: "checkpoint" (torch.utils.checkpoint,
    # non-reentrant) or "replay" (`rwkv_ft.models.chunk_replay`: run without autograd, then again with
    # it in the backward). Blocks compiled with CUDA graphs always replay: graph trees cannot run
    # under the checkpoint's recompute.
    chunk_recompute: str = "checkpoint"
    _chunk_report: tuple[torch.Tensor, list[tuple[int, int]], int] | None = None
    # In training, the head's logits and their cross-entropy are computed this many rows at a time
    # (`rwkv_ft.models.loss`): the B x T x V fp32 logits are never held; the forward returns
    # logits=None then. None: the plain head and loss.
    # 1,024 rows of a 65,536-token vocabulary: 0.75 GiB of logits at a time, and the head's matmuls
    # still run at full rate (4,096 rows held ~3 GiB in the backward: a third of a 1.6B LoRA step's peak).
    loss_chunk_rows: int | None = 1024

    @classmethod
    def can_generate(cls) -> bool:
        # transformers looks for GenerationMixin among the direct bases; ours is one level down.
        return True

    def _init_head(self, config) -> None:
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.head = new_embeddings

    def get_decoder(self) -> RwkvModelBase:
        return self.rwkv

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
        **kwargs: Any,
    ) -> RwkvCausalLMOutput | tuple:
        """Logits for every position (or the last `logits_to_keep`), the loss when `labels` are given
        (shifted inside, -100 ignored), and the state after the last token. See the base model's
        `forward` for the other arguments."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._chunk_report = None
        chunk = self.train_chunk_len
        if labels is not None and chunk and (input_ids if input_ids is not None else inputs_embeds).shape[1] > chunk:
            loss = self._chunked_loss(
                input_ids, inputs_embeds, labels, attention_mask, position_ids, state, chunk, **kwargs
            )
            result = RwkvCausalLMOutput(loss=loss)
            return result if return_dict else result.to_tuple()
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
        if labels is not None and self._fused_head_loss():
            from rwkv_ft.models.loss import chunked_causal_lm_loss

            loss = chunked_causal_lm_loss(
                hidden.to(self.head.weight.dtype),
                self.head.weight,
                labels,
                rows=self.loss_chunk_rows,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
            result = RwkvCausalLMOutput(loss=loss, state=out.state, hidden_states=out.hidden_states)
            return result if return_dict else result.to_tuple()
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.head(hidden.to(self.head.weight.dtype))  # (B, T, V)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        result = RwkvCausalLMOutput(loss=loss, logits=logits, state=out.state, hidden_states=out.hidden_states)
        return result if return_dict else result.to_tuple()

    def _fused_head_loss(self) -> bool:
        """Whether the loss skips materialising the logits: in training, with a plain Linear head
        (not one peft wraps to train or bitsandbytes quantized)."""
        return bool(self.training and self.loss_chunk_rows) and type(self.head) is nn.Linear

    def _head_loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """sum of the cross-entropy of the head's logits against aligned `targets` (-100 ignored)."""
        if self._fused_head_loss():
            from rwkv_ft.models.loss import linear_cross_entropy_sum

            return linear_cross_entropy_sum(
                hidden.to(self.head.weight.dtype), self.head.weight, targets, rows=self.loss_chunk_rows
            )
        logits = self.head(hidden.to(self.head.weight.dtype)).float()  # (B, T, V)
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
        )

    def _chunked_loss(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        labels: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        state: torch.Tensor | None,
        chunk_len: int,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The causal-LM loss of a long sequence, computed `chunk_len` tokens at a time with the
        exact whole-sequence gradient (not truncated backpropagation).

        Each chunk but the last runs under activation checkpointing with the incoming state as an
        input and the outgoing state as an output, so autograd keeps only the chunk-boundary states
        (B x L x state each) and, in the backward, recomputes one chunk at a time from its boundary
        state while the state's gradient flows back across every boundary. The last chunk keeps its
        activations (unless `recompute_last_chunk`): its backward comes first, so it needs no
        recompute. With `train_chunk_offload`, a share of the chunks skip the checkpoint and keep
        their activations in host memory instead (`rwkv_ft.models.offload`): the same gradient
        without their recompute. Blocks compiled with CUDA graphs (or `chunk_recompute="replay"`)
        replace the checkpoint by a chunk run without autograd and replayed with it in the backward
        (`rwkv_ft.models.chunk_replay`), each run a CUDA-graph generation of its own. Peak activation
        memory is that of one chunk. The loss is token-weighted over all chunks (or divided by
        `num_items_in_batch`, as the Trainer passes under gradient accumulation); a non-finite chunk
        loss raises naming the chunk, or is reported by `nonfinite_chunk()`
        (`raise_on_nonfinite_chunk`). Right padding (the collator's, and under CUDA graphs the last
        chunk's, `graphed_length`) runs as ordinary tokens with ignored targets: it only follows a
        row's real tokens, so it can change nothing they see; packed rows keep their resets, column 0
        of a chunk included.
        """
        from torch.utils.checkpoint import checkpoint

        from rwkv_ft.models.chunk_replay import allocate_grads, replayed_chunk

        graphs = any(block.cudagraphs for block in self.rwkv.blocks)
        replay = graphs or self.chunk_recompute == "replay"
        source = input_ids if input_ids is not None else inputs_embeds
        B, T = source.shape[:2]
        if attention_mask is not None:
            mask = attention_mask[:, -T:].bool()
            if not is_right_padded(mask):
                raise ValueError("training.chunk_len: only right padding is supported in long-context training")
        starts = segment_starts(position_ids, None, T) if position_ids is not None else None
        # targets[t] is the token position t predicts, so a chunk's last position scores the next chunk's first.
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)

        if input_ids is not None:
            # Checked once here: the base model's own check would wait on the device (a host sync)
            # at every chunk, and again at every chunk's recompute in the backward.
            check_token_ids(input_ids, self.rwkv.emb.num_embeddings)
        real_T = T
        if graphs:  # few last-chunk lengths, each recorded once (a pad is right padding: it changes nothing)
            T = graphed_length(T, chunk_len)
            source, targets, starts = (
                pad_time(x, T, fill) for x, fill in ((source, 0), (targets, -100), (starts, False))
            )

        def run_chunk(piece, piece_targets, piece_reset, incoming):
            out = self.rwkv(
                inputs_embeds=self.rwkv.emb(piece) if input_ids is not None else piece,  # (B, chunk, C)
                state=incoming,
                reset=piece_reset,
                use_cache=True,
                return_dict=True,
            )
            return self._head_loss_sum(out.last_hidden_state, piece_targets), out.state

        total = source.new_zeros((), dtype=torch.float32)
        finite, bounds = [], []
        offload, offloaded = self._chunk_offload_plan(source.device, -(-T // chunk_len), replay)
        if replay and torch.is_grad_enabled():
            allocate_grads(self.parameters())
        try:
            for index, begin in enumerate(range(0, T, chunk_len)):
                end = min(begin + chunk_len, T)
                piece = (source[:, begin:end], targets[:, begin:end], None if starts is None else starts[:, begin:end])
                if state is None:  # the first chunk: the learned initial state, if any, as a differentiable input
                    state = self.rwkv._learned_initial_state(B)
                if offload is not None:
                    offload.enter_chunk(index)
                    if end == T:  # the last chunk keeps its activations: no chunk's copies may be in flight
                        offload.drain()
                if offloaded[index] and offload.start_chunk():
                    with offload.saving():
                        loss_sum, state = run_chunk(*piece, state)
                elif (end < T or self.recompute_last_chunk) and replay:
                    loss_sum, state = replayed_chunk(run_chunk, graphs, *piece, state)
                elif end < T or self.recompute_last_chunk:
                    loss_sum, state = checkpoint(run_chunk, *piece, state, use_reentrant=False)
                else:
                    if graphs:  # a CUDA-graph generation of its own, as every replayed chunk
                        torch.compiler.cudagraph_mark_step_begin()
                    loss_sum, state = run_chunk(*piece, state)
                # Every chunk runs even after a non-finite one: under FSDP or ZeRO-3 each block call is a
                # collective, so every rank must make the same calls. The flags stay on the device (no sync).
                finite.append(torch.isfinite(loss_sum.detach()))
                bounds.append((begin, min(end, real_T)))
                total = total + loss_sum
        finally:
            self.rwkv.block_output_hook = None
        if offload is not None:
            offload.finish_forward()
            if offload.host_full:
                from rwkv_ft.models.offload import warn_host_memory_short

                warn_host_memory_short()
        self._chunk_report = (torch.stack(finite), bounds, real_T)
        if self.raise_on_nonfinite_chunk:
            bad = self.nonfinite_chunk()
            if bad is not None:
                raise FloatingPointError(f"the loss is not finite in {describe_chunk(bad)} of this batch")
        if num_items_in_batch is None:  # counted on the device: no host sync
            num_items_in_batch = (targets != -100).sum().clamp_min(1)
        return total / num_items_in_batch

    def _chunk_offload_plan(
        self, device: torch.device, n_chunks: int, replay: bool
    ) -> tuple[ChunkOffload | None, list[bool]]:
        """The offload of this chunked forward (None: every chunk but the last is recomputed) and
        which chunks it takes (`train_chunk_offload`)."""
        from rwkv_ft.models.offload import ChunkOffload, offloaded_chunks

        offloaded = offloaded_chunks(n_chunks, self.train_chunk_offload)
        if not (any(offloaded) and torch.is_grad_enabled()):
            return None, [False] * n_chunks
        if replay:  # checked before the block hook is set: an error here leaves the model as it was
            raise ValueError(
                "training.chunk_offload cannot be combined with blocks compiled with CUDA graphs "
                "(training.compile: reduce-overhead): a graph's next replay would overwrite the activations "
                "while they are copied out; set training.chunk_offload=0 or training.compile: true"
            )
        eager_selective = [
            block for block in self.rwkv.blocks if block.selective_recompute and not is_compiled_module(block)
        ]
        if eager_selective:
            raise ValueError(
                "training.chunk_offload needs compiled blocks with selective recompute (training.compile: "
                "true): uncompiled, selective recompute keeps the tensors it saves on the device, out of "
                "the offload's reach; compile the blocks, or use gradient_checkpointing true or false"
            )
        offload = ChunkOffload.for_model(self, device)
        self.rwkv.block_output_hook = offload.block_output_hook
        return offload, offloaded

    def nonfinite_chunk(self) -> tuple[int, int, int, int] | None:
        """(chunk index, first token, last token, sequence length) of the first chunk of the last
        chunked forward whose loss was not finite, or None (all finite, or the last forward was not
        chunked). Reads the chunk flags from the device."""
        if self._chunk_report is None:
            return None
        finite, bounds, T = self._chunk_report
        bad = (~finite).nonzero()
        if len(bad) == 0:
            return None
        index = int(bad[0])
        begin, end = bounds[index]
        return index, begin, end - 1, T


# Under CUDA graphs a new sequence length is a new graph, recorded only once that length recurs
# (until then the chunk runs without graphs), and torch warns past 8 of them. So a long sample's last
# chunk is padded to a multiple of this many tokens: at most chunk_len / 512 lengths.
GRAPHED_CHUNK_STEP = 512


def graphed_length(T: int, chunk_len: int, step: int = GRAPHED_CHUNK_STEP) -> int:
    """T with its last chunk of `chunk_len` tokens rounded up to a multiple of `step` (at most a full chunk)."""
    last = T - (T - 1) // chunk_len * chunk_len
    return T - last + min(chunk_len, -(-last // step) * step)


def pad_time(x: torch.Tensor | None, T: int, fill) -> torch.Tensor | None:
    """x (B, t, ...) right-padded with `fill` to T steps (dimension 1)."""
    if x is None or x.shape[1] == T:
        return x
    pad = x.new_full((x.shape[0], T - x.shape[1], *x.shape[2:]), fill)
    return torch.cat([x, pad], dim=1)


def describe_chunk(chunk: tuple[int, int, int, int]) -> str:
    """A `nonfinite_chunk()` result as "chunk I (tokens A..B of T)"."""
    index, first, last, T = chunk
    return f"chunk {index} (tokens {first}..{last} of {T})"
