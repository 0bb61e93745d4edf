"""Instruction tuning entry point: `accelerate launch -m rwkv_ft.train RECIPE [section.key=value ...]`.

Also reachable as `rwkv-ft train RECIPE`. Builds the base model (from a checkpoint or a config),
wraps it with the recipe's adapter (LoRA, QLoRA on an 8-/4-bit base, state tuning, or none), loads
and masks the data, trains with the Hugging Face `Trainer`, and leaves in `training.output_dir`:

    adapter/ (or model/ for full fine-tuning)   the result, safetensors, tokenizer with its chat
                                              template, model card, training summary
    checkpoint-N/                             resumable checkpoints, each written atomically
    runs/                                     tensorboard logs
    loss_curve.png, training_summary.json     the loss curve and the whole run's numbers
    merged/                                   the merged model, when merge.enabled

Guarantees: paths are checked before any slow work; one run at a time per output folder (a lock);
a non-finite loss or weight stops training before anything poisoned is saved, naming the last
good checkpoint, which `--resume` then continues from; `--resume` on a finished run changes
nothing; the adapter's initialisation does not depend on what a restart skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rwkv_ft.recipe import Recipe, RecipeError, load_recipe

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("rwkv_ft.train")

PROGRESS_FILE = "rwkv_ft_progress.json"  # in every checkpoint: the run's time so far
SUMMARY_FILE = "training_summary.json"
REJECTED_DIR = "rejected-checkpoints"
CHECKPOINT_PREFIX = "checkpoint"


class RunComplete(Exception):
    """`--resume` found a finished run whose targets were not raised: nothing to do."""


# --------------------------------------------------------------------------------------------------
# Model, tokenizer, adapter


def prepare_base_model(recipe: Recipe, output_dir: Path, tokenizer) -> tuple[Path, str]:
    """(a directory of ours holding the base model, what adapters record as their base: its Hub
    id, or the directory's absolute path, so that they load from any working directory).

    Our own directory is used in place; a BlinkDL `.pth` or foreign directory is converted, and a
    `model.config` builds a fresh random model (seeded), once, into output_dir/base, so that a
    resumed run and the merge see exactly the same base. That folder is written atomically and
    reused only when complete.
    """
    from rwkv_ft.convert import is_complete_model_dir, model_type_of, save_model_dir
    from rwkv_ft.io import resolve_model_source
    from rwkv_ft.models.architecture import architecture_for_model_type

    spec, base = recipe.model, output_dir / "base"
    if spec.path is None:
        arch = architecture_for_model_type(spec.model_type)
        if _is_main_process() and not is_complete_model_dir(base):
            _discard_incomplete(base)
            with torch_rng_isolated(recipe.training.seed):
                model = arch.model_class(arch.config_class(**spec.config))
            save_model_dir(model, base, tokenizer=tokenizer, overwrite=True)
        _wait_for_everyone()  # every rank, unconditionally: a rank that skipped it would hang the others
        return base, str(base.resolve())
    source = resolve_model_source(spec.path, what="model.path")
    if source.path.is_dir() and architecture_for_model_type(model_type_of(source.path)) is not None:
        return source.path, source.record
    if _is_main_process() and not is_complete_model_dir(base):
        from rwkv_ft.convert import convert_checkpoint

        _discard_incomplete(base)
        convert_checkpoint(source.path, base, tokenizer="none", overwrite=True)
    _wait_for_everyone()
    return base, str(base.resolve())


def _discard_incomplete(base: Path) -> None:
    if base.exists():
        logger.warning("%s is incomplete (an interrupted write); building it again", base)
        shutil.rmtree(base) if base.is_dir() else base.unlink()


@contextlib.contextmanager
def objects_frozen_for_gc():
    """Python's cyclic garbage collector ignores the objects that exist on entry (the model, the
    tokenizer, the data: ~500k objects for a 24-layer LoRA model), until exit. Each full
    collection otherwise walks them all: 23 ms per step of a 24-layer LoRA step's host time on a
    2-core CPU, 4 ms frozen (benchmarks/trainer_vs_loop.py --host-time). Memory is still freed by
    reference counting; only cycles among those objects wait until the exit. A program that froze
    objects itself keeps its own arrangement."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.collect()  # what is already garbage goes now, not into the frozen set
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector does not run inside (a training step's forward and
    backward); it resumes on exit. A long-context step builds Python objects per chunk (the
    checkpoint's holders of every saved tensor) that live until its backward ends, and the
    collector walked them again and again: in 3 steps at 131,072 tokens (1.5-1.6B LoRA, H100;
    benchmarks/NOTES.md), 1.7-2.1 s with the collector as Python sets it, 0.29 s with the run's
    objects frozen (`objects_frozen_for_gc`, as `run` does), 0.004 s paused. Reference counting
    still frees memory inside; cycles wait for the exit."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class torch_rng_isolated:
    """Seed torch's RNG for a block without consuming the global RNG stream outside it."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        import torch

        self._fork = torch.random.fork_rng()
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


def load_tokenizer_for(recipe: Recipe, model_source: Path | None, vocab_size: int):
    """The recipe's tokenizer (or the model's own), checked against the embedding, with the recipe's
    prompt template as its chat template."""
    from rwkv_ft.convert import check_tokenizer_fits
    from rwkv_ft.data import get_template
    from rwkv_ft.tokenizers import load_tokenizer

    if recipe.tokenizer is not None:
        tokenizer, where = load_tokenizer(recipe.tokenizer), f"tokenizer: {recipe.tokenizer}"
    elif model_source is not None and model_source.is_dir() and _has_tokenizer(model_source):
        tokenizer, where = load_tokenizer(str(model_source)), f"the tokenizer of {model_source}"
    elif vocab_size == 65536:
        tokenizer, where = load_tokenizer("world"), "the World tokenizer (65,536-row embedding)"
    else:
        raise RecipeError(
            f"model.path {recipe.model.path}: the model has no tokenizer; set `tokenizer:` (world, neox or a path)"
        )
    check_tokenizer_fits(tokenizer, vocab_size, where)
    tokenizer.chat_template = get_template(recipe.data.template).chat_template()
    return tokenizer


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / f).exists() for f in ("tokenizer_config.json", "tokenizer.json"))


def model_vocab_size(recipe: Recipe) -> tuple[int, Path | None]:
    """The embedding size the recipe's model will have, and the local model source (None: from config)."""
    from rwkv_ft.convert import load_any_checkpoint, model_type_of, verify_model_dir
    from rwkv_ft.io import resolve_model_source
    from rwkv_ft.models.architecture import architecture_for_model_type

    spec = recipe.model
    if spec.path is None:
        arch = architecture_for_model_type(spec.model_type)
        if arch is None:
            from rwkv_ft.models.architecture import architectures

            known = ", ".join(a.model_type for a in architectures())
            raise RecipeError(f"recipe: model.model_type must be one of {known} for a model built from model.config")
        try:
            return arch.config_class(**spec.config).vocab_size, None
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"recipe: model.config: {exc}") from exc
    source = resolve_model_source(spec.path, what="model.path")
    if source.path.is_dir() and architecture_for_model_type(model_type_of(source.path)) is not None:
        return verify_model_dir(source.path)[1].vocab_size, source.path  # names a config/weights mismatch
    return load_any_checkpoint(source.path).config.vocab_size, source.path


def load_model(recipe: Recipe, base: Path, record: str):
    """The base model in the recipe's dtype (quantized with bitsandbytes when asked), its config
    and weights checked against each other first. `record` is what peft writes down as the base."""
    from rwkv_ft.convert import load_pretrained
    from rwkv_ft.io import DTYPES

    spec = recipe.model
    kwargs: dict[str, Any] = {"dtype": DTYPES[spec.dtype]}
    if spec.quantization is not None:
        from rwkv_ft.quantization import bnb_config

        kwargs["quantization_config"] = bnb_config(spec.quantization, compute_dtype=DTYPES[spec.dtype])
    model = load_pretrained(base, **kwargs)
    model.name_or_path = model.config._name_or_path = record  # peft writes it as base_model_name_or_path
    set_kernel_backend(model, spec.wkv_backend)
    return model


def set_kernel_backend(model, backend: str) -> None:
    """Point every block's WKV at `backend` ("auto", "triton" or "torch")."""
    model.config.wkv_backend = backend
    for module in model.modules():
        if hasattr(module, "wkv_backend"):
            module.wkv_backend = backend


def set_chunk_len(model, chunk_len: int | None, offload: float = 0.0) -> None:
    """Long-context training: the causal LM inside `model` (peft-wrapped or not) runs sequences
    longer than `chunk_len` in chunks with the exact gradient (`RwkvForCausalLMBase._chunked_loss`),
    keeping the activations of `offload` (0..1) of them in host memory instead of recomputing them.
    A non-finite chunk is reported, not raised: RwkvTrainer stops every rank together, naming it."""
    for module in causal_lms(model):
        module.train_chunk_len = chunk_len
        module.train_chunk_offload = offload
        module.raise_on_nonfinite_chunk = False


def causal_lms(model) -> list:
    """Our causal LMs inside `model` (peft-, DDP- or FSDP-wrapped or not)."""
    from rwkv_ft.models.modeling_utils import RwkvForCausalLMBase

    return [module for module in model.modules() if isinstance(module, RwkvForCausalLMBase)]


def attach_adapter(model, recipe: Recipe):
    """Wrap `model` as the recipe says; everything not trained is frozen. The adapter's initial
    values are drawn from a generator seeded by training.seed alone, whatever ran before."""
    from rwkv_ft.models.modeling_utils import enable_activation_checkpointing, recompute_last_blocks_selectively

    spec, quantized = recipe.adapter, recipe.model.quantization is not None
    checkpointing = recipe.training.gradient_checkpointing
    whole_blocks = checkpointing is True
    if quantized:
        from rwkv_ft.io import DTYPES
        from rwkv_ft.quantization import prepare_for_kbit_training

        frozen_dtype = DTYPES[recipe.model.dtype] if recipe.model.dtype != "fp32" else None
        model = prepare_for_kbit_training(model, gradient_checkpointing=whole_blocks, frozen_dtype=frozen_dtype)
    elif whole_blocks:
        enable_activation_checkpointing(model)
        if spec.type != "none":
            model.enable_input_require_grads()
    if checkpointing == "selective":
        enable_activation_checkpointing(model, "selective")
    if recipe.training.selective_blocks:
        try:
            recompute_last_blocks_selectively(model, recipe.training.selective_blocks)
        except ValueError as exc:
            raise RecipeError(f"recipe: training.{exc}") from None
    if recipe.training.compile:  # the blocks are compiled lazily, at their first call
        model.compile_blocks(**compile_options(recipe.training.compile))
    if spec.type == "none":
        if quantized:
            raise RecipeError("recipe: adapter.type none (full fine-tuning) cannot train a quantized base")
        return model
    with torch_rng_isolated(recipe.training.seed):
        if spec.type == "state":
            from rwkv_ft.adapters import StateTuningConfig, add_state_tuning

            add_state_tuning(model, StateTuningConfig(train_token_shift=spec.train_token_shift))
            return model
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=spec.r,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=spec.target_modules,
            modules_to_save=spec.modules_to_save,
            use_dora=spec.use_dora,
            use_rslora=spec.use_rslora,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    if spec.lora_compute == "base":
        from rwkv_ft.adapters.fast_lora import enable_fast_lora

        enable_fast_lora(model)
    return model


# --------------------------------------------------------------------------------------------------
# Checkpoints


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders holding a trainer_state.json, oldest first."""
    found = []
    for path in output_dir.glob(f"{CHECKPOINT_PREFIX}-*"):
        suffix = path.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and (path / "trainer_state.json").exists():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def reject_checkpoint_before(output_dir: Path, step: int) -> tuple[Path | None, Path | None]:
    """After a non-finite loss at `step`, move the checkpoint saved right before it (its weights
    produced that loss) aside into rejected-checkpoints/. Returns (moved to, last good checkpoint)."""
    moved = None
    for path in complete_checkpoints(output_dir):
        if checkpoint_step(path) == step - 1:
            target = output_dir / REJECTED_DIR / path.name
            target.parent.mkdir(exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            os.replace(path, target)
            moved = target
    remaining = complete_checkpoints(output_dir)
    return moved, remaining[-1] if remaining else None


def _nonfinite_tensors(named) -> list[str]:
    """Names of the tensors with a non-finite value in this process's part of them (its shard under
    FSDP2 or ZeRO-3: the ranks then agree, see RwkvTrainer._stop_if_any_rank)."""
    import torch

    local = ((name, _local_part(t)) for name, t in named if isinstance(t, torch.Tensor))
    return [name for name, t in local if t.is_floating_point() and not torch.isfinite(t).all()]


def _local_part(t):
    """The part of a (possibly sharded) tensor this process holds: an FSDP2 DTensor's local shard, a
    ZeRO-3 parameter's partition, or the tensor itself."""
    if hasattr(t, "to_local"):
        return t.to_local()
    return getattr(t, "ds_tensor", t)


def _optimizer_tensors(optimizer):
    for group_index, state in enumerate(optimizer.state.values()):
        for key, value in state.items():
            yield f"optimizer state {group_index}.{key}", value


# --------------------------------------------------------------------------------------------------
# Several processes: sharded models, their consolidated state


def sharding(accelerator) -> str:
    """How the processes hold the model: "fsdp2" or "deepspeed" (each rank holds a shard of the
    parameters, of the gradients or of the optimizer state), or "none" (one process, or DDP)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    if accelerator.distributed_type == DistributedType.FSDP:
        if not getattr(accelerator, "is_fsdp2", False):
            raise RecipeError(
                "accelerate config: FSDP needs fsdp_config.fsdp_version: 2 (FSDP2, accelerate >= 1.6); "
                "see recipes/accelerate/fsdp.yaml"
            )
        return "fsdp2"
    return "none"


def clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale `grads` in place so that their joint L2 norm is at most `max_norm`; returns the norm
    before scaling. What torch.nn.utils.clip_grad_norm_ computes (a test checks it bit for bit), for
    one process's (or DDP's) plain tensors, without its Python-level call per tensor: with LoRA on
    a 7.6B model (448 matrices) those calls cost the Trainer's step ~1-2 ms of host time while the
    GPU waits (benchmarks/NOTES.md, twenty-fourth session)."""
    import torch
    from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

    if not grads:
        return torch.tensor(0.0)
    groups = [ts for ([ts], _) in _group_tensors_by_device_and_dtype([grads]).values()]  # type: ignore[misc]
    first, norms = grads[0].device, []
    for ts in groups:
        group_norms = torch._foreach_norm(ts)
        norms.extend(group_norms if ts[0].device == first else [n.to(first) for n in group_norms])
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for ts in groups:
        torch._foreach_mul_(ts, scale.to(ts[0].device))
    return total


def is_adapter_model(model) -> bool:
    """Whether `model` trains an adapter (LoRA through peft and/or a learned initial state)."""
    from rwkv_ft.adapters import find_initial_state

    return hasattr(model, "peft_config") or find_initial_state(model) is not None


def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage the run uses, or None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def fp32_trained_parameters(model) -> None:
    """Keep every trained parameter in fp32 (master weights; compute still follows the base's dtype).
    FSDP2 needs one dtype for the trained parameters of a unit, and a bf16 one (a peft
    modules_to_save copy of a bf16 layer) beside fp32 LoRA or state weights would break that."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def consolidated_state_dict(model, how: str, *, trainable_only: bool) -> dict[str, Any] | None:
    """Whole CPU copies of `model`'s parameters by name, for the main process to save: the trained
    ones (an adapter) or all of them (full fine-tuning). None when the model is not sharded (`how`
    "none": save it as it is). Under FSDP2 and DeepSpeed this gathers the shards: a collective, so
    every rank must call it; under FSDP2 only the main process gets the tensors."""
    if how == "none":
        return None
    if how == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(model, options=options)
    else:
        state = _deepspeed_state_dict(model, trainable_only)
    if trainable_only:
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        state = {name: value for name, value in state.items() if name in trained}
    return state


def _deepspeed_state_dict(model, trainable_only: bool) -> dict[str, Any]:
    """Every (trained) parameter whole: the optimizer's fp32 master where it has one (ZeRO-1/2/3;
    the module's copy may be bf16), else the gathered ZeRO-3 parameter."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([p]):  # a no-op unless ZeRO-3 partitioned it
                full = p.detach().clone()
        state[name] = full.detach().cpu()
    return state


def load_trained_tensors(model, tensors: dict[str, Any], how: str) -> None:
    """Copy whole tensors (by parameter name) into `model`'s parameters, sharded or not."""
    import torch

    if how == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # (a copy: it replaces the dict's tensors with their shards)
        set_model_state_dict(model, dict(tensors), options=StateDictOptions(full_state_dict=True, strict=False))
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))


def pad_batch(batch: dict[str, Any], width: int, pad_token_id: int) -> dict[str, Any]:
    """A collated batch right-padded to `width` columns the way SFTDataCollator pads: masked, labels
    -100, position ids continuing (so padding never starts a packed segment)."""
    import torch
    import torch.nn.functional as F

    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    padded = dict(batch)
    for key, value in (("input_ids", pad_token_id), ("labels", -100), ("attention_mask", 0)):
        if key in batch:
            padded[key] = F.pad(batch[key], (0, extra), value=value)
    if "position_ids" in batch:
        positions = batch["position_ids"]
        following = positions[:, -1:] + 1 + torch.arange(extra, device=positions.device)
        padded["position_ids"] = torch.cat([positions, following], dim=1)
    return padded


def nonfinite_loss_message(rows: list[list[int]], step: int, epoch: float) -> str:
    """What stopped the run, from every rank's [rank, bad, chunk, first token, last token, length]
    (chunk -1: the sample was not run in chunks)."""
    from rwkv_ft.models.modeling_utils import describe_chunk

    def chunk(row: list[int], whose: str) -> str:
        return f" in {describe_chunk(tuple(row[2:]))} of {whose} batch" if row[2] >= 0 else ""

    bad = [row for row in rows if row[1]]
    if len(rows) == 1:
        where = chunk(bad[0], "this")
    else:
        where = " on " + "; on ".join(f"rank {row[0]}{chunk(row, 'its')}" for row in bad)
    return (
        f"the loss is not finite{where} at step {step} (epoch {epoch:.2f}); training stopped before the optimizer step"
    )


class StoppedOnEveryRank(FloatingPointError):
    """Every rank raised this at the same point of training, having agreed on it: the main process
    reports it (the others would only repeat it)."""


# --------------------------------------------------------------------------------------------------
# Trainer pieces


def compile_options(setting: bool | str) -> dict[str, Any]:
    """torch.compile options of `training.compile`: true -> inductor's defaults; "reduce-overhead" ->
    CUDA graphs too (each block's forward and backward replayed as one graph: on an H200 the 1.6B
    LoRA step went from 31.7k to 60.2k tokens/s, benchmarks/NOTES.md); "step-graph" -> inductor's
    defaults, the whole micro-step then recorded as one CUDA graph by the Trainer (rwkv_ft.step_graph)."""
    return {"mode": setting} if setting == "reduce-overhead" else {}


def check_step_graph_setup(processes: int, device: Any, gpus: int = 1) -> None:
    """training.compile: step-graph records one process's micro-step on one CUDA device."""
    import torch

    if processes > 1:
        # DDP's gradient hooks, FSDP2's and ZeRO's collectives run inside the backward: not recorded here.
        raise RecipeError(
            f"training.compile: step-graph runs on one process, not {processes}; use reduce-overhead or true"
        )
    if gpus > 1:
        raise RecipeError(
            f"training.compile: step-graph runs on one GPU, and this process sees {gpus} (the Trainer would "
            "split each batch over them); set CUDA_VISIBLE_DEVICES to one, or launch with accelerate and use true"
        )
    if torch.device(device).type != "cuda":
        raise RecipeError(f"training.compile: step-graph needs a CUDA GPU (the device is {device}); use true")


# Under CUDA graphs (`training.compile: reduce-overhead` or `step-graph`) each batch width is a graph recorded, and
# memory held, of its own; torch records one only once its width recurs, and warns past 8. Batches are
# right-padded (ignored labels) to a multiple of this: at most max_length / 128 widths.
GRAPHED_WIDTH_STEP = 128


def data_collator(recipe: Recipe, tokenizer):
    """The collator of a run: right padding, and under CUDA graphs widths in steps of `GRAPHED_WIDTH_STEP`."""
    from rwkv_ft.data import SFTDataCollator

    step = GRAPHED_WIDTH_STEP if recipe.training.compile in ("reduce-overhead", "step-graph") else None
    return SFTDataCollator.from_tokenizer(tokenizer, pad_to_multiple_of=step)


def _make_trainer_class():
    """RwkvTrainer, built on first use so that importing this module does not import transformers."""
    import warnings

    import torch
    from transformers import Trainer

    # transformers 5.0's non-padding token count wraps a tensor in torch.tensor(), which warns at
    # every step (later releases do not); nothing a user can act on.
    warnings.filterwarnings(
        "ignore", message="To copy construct from a tensor", category=UserWarning, module=r"transformers\.trainer"
    )

    class RwkvTrainer(Trainer):
        """The HF Trainer with these guarantees:

        - a non-finite loss on any rank stops training on every rank at the same step, naming the
          rank and (long context) the chunk, before the optimizer step; non-finite trainable weights or
          optimizer state on any rank are never saved. The ranks agree first, so none waits
          forever in a collective the others left;
        - checkpoints of an adapter run hold the adapter as `save_adapter` writes it (peft's
          adapter_model.safetensors, the state-tuning file), whole even when the model is sharded
          (FSDP2, DeepSpeed ZeRO), so `rwkv-ft merge` and `generate` read any checkpoint; `--resume`
          loads it back into the (sharded) model;
        - under FSDP2 or ZeRO-3 with training.chunk_len, every rank pads its batch to the longest
          on any rank, so all run the same number of chunks (each block call is a collective);
        - checkpoints appear only complete (written to a staging folder, then renamed), so a crash
          mid-save never leaves a checkpoint that `--resume` would pick; each carries the run's time
          so far, and the newest `save_total_limit` are kept;
        - the eval loss is the token-weighted mean over the whole eval set, the same with one
          process or many (each example is scored exactly once).
        """

        prior_runtime_s: float = 0.0
        prior_sessions: int = 0
        session_start: float = 0.0

        cudagraph_steps: bool = False  # training.compile: reduce-overhead
        step_graph: bool = False  # training.compile: step-graph (see _graphed_training_step)
        equal_chunk_counts: bool = False  # sharded model and training.chunk_len: see _pad_to_longest

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.how_sharded = sharding(self.accelerator)  # fixed for the run: read once, used every step

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.cudagraph_steps:  # a new step: the graphs may reuse the last step's output memory
                torch.compiler.cudagraph_mark_step_begin()
            self._walk_trained_parameters_only(model)
            if self.equal_chunk_counts:
                inputs = self._pad_to_longest(inputs)
            with collector_paused():
                if self.step_graph:
                    loss = self._graphed_training_step(model, inputs, num_items_in_batch)
                else:
                    loss = super().training_step(model, inputs, num_items_in_batch)
            # After the backward (whose collectives every rank runs alike, NaN or not), so that the
            # host never waits between forward and backward; before the optimizer step.
            self._stop_if_not_finite(loss)
            return loss

        _step_graphs: Any = None

        def _graphed_training_step(self, model, inputs, num_items_in_batch):
            """`Trainer.training_step` on one process, its forward and backward replayed from one CUDA
            graph per batch shape (`rwkv_ft.step_graph`): the loss scaled as the Trainer scales it,
            the gradients left in `.grad` as its backward leaves them."""
            from rwkv_ft.step_graph import StepGraphs

            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = dict(self._prepare_inputs(inputs))
            # As Trainer.training_step scales the loss (transformers 5.x), with the values as tensors: a
            # value that changes from batch to batch is a graph input, not a recorded constant.
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:
                scaled = (
                    self.model_accepts_loss_kwargs and num_items_in_batch is not None
                ) or self.compute_loss_func is not None
            device = self.args.device
            if num_items_in_batch is not None:
                inputs["num_items_in_batch"] = torch.as_tensor(num_items_in_batch, device=device)
            if not scaled:
                inputs["loss_scale"] = torch.tensor(1.0 / self.current_gradient_accumulation_steps, device=device)
            if self._step_graphs is None:

                def loss_fn(batch):
                    batch = dict(batch)
                    scale = batch.pop("loss_scale", None)
                    items = batch.pop("num_items_in_batch", None)
                    with self.compute_loss_context_manager():
                        loss = self.compute_loss(model, batch, num_items_in_batch=items)
                    return loss if scale is None else loss * scale

                vocab = getattr(getattr(model, "config", None), "vocab_size", None)
                self._step_graphs = StepGraphs(loss_fn, self.trained_parameters(), vocab_size=vocab)
            return self._step_graphs(inputs)

        # -- per-step host work ---------------------------------------------------------------
        # Each step the Trainer walks the whole model four times for bookkeeping that training does
        # not change: it recounts the parameters for its FLOP estimate, sets training mode, and zeroes
        # and clips the gradients of every parameter, the frozen base's included. With LoRA on 24
        # layers a walk visits ~2,000 modules and ~800 parameters: ~10 ms of host time each, on a step
        # whose GPU waits for the host (benchmarks/NOTES.md, "Training step"). Here the count is
        # made once, and the rest run over the trained parameters, collected once.

        _trained: list | None = None
        _counted_parameters: int | None = None
        _walks_skipped_on: Any = None

        def trained_parameters(self) -> list:
            if self._trained is None:
                self._trained = [p for p in self.model.parameters() if p.requires_grad]
            return self._trained

        def floating_point_ops(self, inputs) -> int:
            main_input = getattr(self.model, "main_input_name", "input_ids")
            if main_input not in inputs or not hasattr(self.model, "num_parameters"):
                return 0
            if self._counted_parameters is None:
                self._counted_parameters = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[main_input].numel() * self._counted_parameters

        def _clip_grad_norm(self, model):  # transformers >= 5.3 (earlier releases clip inline, over every parameter)
            if self.how_sharded != "none":  # FSDP2 and DeepSpeed clip their own way
                return super()._clip_grad_norm(model)
            self.accelerator.unscale_gradients()  # fp16's loss scale, as accelerate's clip does first
            grads = [p.grad for p in self.trained_parameters() if p.grad is not None]
            return clip_grad_norm(grads, self.args.max_grad_norm)

        def _walk_trained_parameters_only(self, model) -> None:
            """From the first step to the end of `train()`: `model.train()` returns at once when the
            model and the causal LM inside it are already in training mode (an `eval()` of either
            clears the LM's flag, so the next `train()` walks again), and `model.zero_grad()` clears
            the trained parameters' gradients only (the frozen ones have none). One process or DDP;
            FSDP2 and DeepSpeed keep their own."""
            if self._walks_skipped_on is model or self.how_sharded != "none":
                return
            trained, walking_train, lms = self.trained_parameters(), model.train, causal_lms(model)

            def train(mode: bool = True):
                if mode and model.training and all(lm.training for lm in lms):
                    return model
                return walking_train(mode)

            def zero_grad(set_to_none: bool = True) -> None:
                for p in trained:
                    if p.grad is None:
                        continue
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()

            model.train, model.zero_grad = train, zero_grad  # instance attributes: `del` restores
            self._walks_skipped_on = model

        def _restore_walks(self) -> None:
            model, self._walks_skipped_on = self._walks_skipped_on, None
            if model is not None:
                del model.train, model.zero_grad

        def _pad_to_longest(self, inputs):
            """`inputs` padded to the longest batch on any rank: a sharded model's every block call
            is a collective, so all ranks must run as many chunks, and chunk or not alike."""
            width = torch.tensor([inputs["input_ids"].shape[1]], device=self.args.device)
            longest = int(self.accelerator.gather(width).max())
            return pad_batch(inputs, longest, self.data_collator.pad_token_id)

        def _stop_if_not_finite(self, loss) -> None:
            """Raise StoppedOnEveryRank on every rank if the loss is not finite on any: one small
            gather per micro-batch; only when one is bad, a second says where (rank, chunk)."""
            bad = (~torch.isfinite(loss.detach())).any().reshape(1).long()
            world = self.accelerator.num_processes
            if not (self.accelerator.gather(bad) if world > 1 else bad).any():
                return
            chunks = [lm.nonfinite_chunk() for lm in causal_lms(self.model)]
            chunk = next((c for c in chunks if c is not None), (-1, -1, -1, -1))
            row = torch.tensor([[self.accelerator.process_index, int(bad), *chunk]], device=loss.device)
            rows = (self.accelerator.gather(row) if world > 1 else row).tolist()
            step = self.state.global_step + 1
            raise StoppedOnEveryRank(nonfinite_loss_message(rows, step, self.state.epoch or 0.0))

        def _stop_if_any_rank(self, problems: list[str], what: str) -> None:
            """Raise StoppedOnEveryRank on every rank if `problems` (this rank's) or any other rank's
            is non-empty, naming them with their ranks."""
            from accelerate.utils import gather_object

            world = self.accelerator.num_processes
            everyone = gather_object([(self.accelerator.process_index, problems)]) if world > 1 else [(0, problems)]
            found = [(rank, names) for rank, names in everyone if names]
            if found:
                listed = "; ".join(
                    (f"rank {rank}: " if world > 1 else "") + ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
                    for rank, names in found
                )
                raise StoppedOnEveryRank(what.format(listed))

        def _get_output_dir(self, trial):
            staging = getattr(self, "_staging_dir", None)
            return staging if staging is not None else super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            step = self.state.global_step
            bad = _nonfinite_tensors((n, p) for n, p in model.named_parameters() if p.requires_grad)
            if self.optimizer is not None:
                bad += _nonfinite_tensors(_optimizer_tensors(self.optimizer))
            self._stop_if_any_rank(
                bad, f"after step {step} these trained tensors are not finite: {{}}; checkpoint-{step} was not saved"
            )
            run_dir = super()._get_output_dir(trial)
            name = f"{CHECKPOINT_PREFIX}-{step}"
            self._staging_dir = os.path.join(run_dir, ".staging")
            try:
                super()._save_checkpoint(model, trial)
                if self.args.should_save:
                    progress = {"runtime_s": self.runtime_s(), "step": step, "sessions": self.prior_sessions + 1}
                    Path(self._staging_dir, name, PROGRESS_FILE).write_text(json.dumps(progress))
            finally:
                self._staging_dir = None
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                from rwkv_ft.io import apply_umask

                final = os.path.join(run_dir, name)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(os.path.join(run_dir, ".staging", name), final)
                apply_umask(Path(final))
                shutil.rmtree(os.path.join(run_dir, ".staging"), ignore_errors=True)
                self._keep_latest_checkpoints(Path(run_dir))
            self.accelerator.wait_for_everyone()

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            """An adapter run's checkpoint (and `trainer.save_model()`): the adapter as `save_adapter`
            writes it, gathered whole from every rank when the model is sharded. Full fine-tuning:
            the Trainer's own saving (sharded checkpoints under FSDP2 / ZeRO-3)."""
            if not is_adapter_model(self.model):
                return super().save_model(output_dir, _internal_call)
            from rwkv_ft.adapters import save_adapter

            output_dir = output_dir if output_dir is not None else self.args.output_dir
            tensors = consolidated_state_dict(self.model, self.how_sharded, trainable_only=True)
            if self.args.should_save:
                save_adapter(self.model, output_dir, state_dict=tensors)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            """`--resume` of an adapter run: the checkpoint's adapter, copied into the (possibly
            sharded) model. DeepSpeed resumes from its own engine checkpoint instead (the Trainer
            loads it, optimizer partitions included). Checkpoints of older releases (no
            rwkv_ft_adapter.json) load the Trainer's way."""
            from rwkv_ft.adapters import ADAPTER_INFO_FILE, read_trained_tensors

            checkpoint = Path(resume_from_checkpoint)
            if not is_adapter_model(self.model) or not (checkpoint / ADAPTER_INFO_FILE).exists():
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            tensors = read_trained_tensors(self.model, checkpoint)
            load_trained_tensors(model if model is not None else self.model, tensors, self.how_sharded)

        def _keep_latest_checkpoints(self, run_dir: Path) -> None:
            limit = self.args.save_total_limit
            if limit:
                for old in complete_checkpoints(run_dir)[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)

        def runtime_s(self) -> float:
            return self.prior_runtime_s + (time.time() - self.session_start if self.session_start else 0.0)

        def train(self, *args, **kwargs):
            self.session_start = time.time()
            try:
                with objects_frozen_for_gc():
                    return super().train(*args, **kwargs)
            finally:
                self._restore_walks()

        # -- evaluation -----------------------------------------------------------------------

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
            dataset = self.eval_dataset if eval_dataset is None else eval_dataset
            start = time.time()
            loss_sum, tokens = self._scored_tokens(dataset)
            loss = (loss_sum / tokens) if tokens > 0 else float("nan")
            metrics = {
                f"{metric_key_prefix}_loss": loss,
                f"{metric_key_prefix}_tokens": int(tokens),
                f"{metric_key_prefix}_runtime": round(time.time() - start, 4),
            }
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

        @torch.no_grad()
        def _scored_tokens(self, dataset) -> tuple[float, float]:
            """(sum of token losses, number of scored tokens) over `dataset`, all ranks together.

            Rank r scores examples r, r + world, r + 2 world, ...; every rank runs the same number
            of batches (a rank out of examples runs an all-masked one), so sharded models that
            communicate in forward stay in step."""
            world, rank = self.accelerator.num_processes, self.accelerator.process_index
            indices = list(range(rank, len(dataset), world))
            batch_size = self.args.per_device_eval_batch_size
            per_rank = math.ceil(len(dataset) / world)
            n_batches = math.ceil(per_rank / batch_size) if per_rank else 0
            model = self.model_wrapped if self.model_wrapped is not None else self.model
            was_training = model.training
            model.eval()
            totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)
            for b in range(n_batches):
                chunk = indices[b * batch_size : (b + 1) * batch_size]
                features = [dataset[i] for i in chunk] or [dataset[0]]
                batch = self._prepare_inputs(self.data_collator(features))
                labels = batch["labels"]
                if not chunk:
                    labels = torch.full_like(labels, -100)
                    batch["labels"] = labels
                scored = (labels[:, 1:] != -100).sum()
                with self.compute_loss_context_manager():
                    loss = model(**batch).loss
                if scored > 0:
                    totals[0] += loss.double() * scored
                    totals[1] += scored
            if was_training:
                model.train()
            if world > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            return float(totals[0]), float(totals[1])

    return RwkvTrainer


def _callbacks(output_dir: Path):
    from transformers import TrainerCallback

    class LossCurveCallback(TrainerCallback):
        """Writes loss_curve.png (train and eval loss against the step) whenever training ends."""

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                plot_loss_curve(state.log_history, output_dir / "loss_curve.png")

    class SaveAtEndCallback(TrainerCallback):
        """A checkpoint at the last step too, so a later `--resume` with more steps can continue."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                control.should_save = True
            return control

    return [LossCurveCallback(), SaveAtEndCallback()]


def plot_loss_curve(log_history: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("rwkv_ft training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from rwkv_ft.io import write_atomically

    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), overwrite=True, is_dir=False)
    plt.close(fig)
    return path


def _length_grouping(enabled: bool) -> dict[str, Any]:
    """Length-grouped batches, under the name this transformers release uses."""
    import dataclasses

    from transformers import TrainingArguments

    if "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        return {"train_sampling_strategy": "group_by_length" if enabled else "random"}
    return {"group_by_length": enabled}


def needs_autocast(recipe: Recipe) -> bool:
    """Whether training.precision bf16 needs autocast: not over plain bf16 weights, where the matmuls
    already run in bf16 and autocast would only upcast norms and some elementwise ops to fp32 (their
    outputs, and everything after them up to the next matmul, then cost twice the bytes and a cast)."""
    return not (recipe.model.dtype == "bf16" and recipe.model.quantization is None)


def training_arguments(recipe: Recipe, output_dir: Path, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    t = recipe.training
    eval_strategy = "no" if not has_eval else ("steps" if t.eval_steps else "epoch")
    save_strategy = "steps" if t.save_steps else "epoch"
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.schedule,
        warmup_steps=t.warmup_steps or (t.warmup_ratio if 0 < t.warmup_ratio < 1 else 0),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=t.precision == "bf16" and needs_autocast(recipe),
        fp16=t.precision == "fp16",
        logging_steps=t.logging_steps,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy=save_strategy,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,  # applied by RwkvTrainer to complete checkpoints
        seed=t.seed,
        data_seed=t.seed,
        report_to=["tensorboard"],
        remove_unused_columns=False,
        **_length_grouping(t.group_by_length),
        length_column_name="length",
        dataloader_num_workers=t.dataloader_workers,
        disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
        # RwkvTrainer.training_step stops on a non-finite loss already; the Trainer's own filter
        # would read the loss on the host once more every step.
        logging_nan_inf_filter=False,
    )


# --------------------------------------------------------------------------------------------------
# The run


def _targets(recipe: Recipe) -> dict[str, float]:
    return {"max_steps": recipe.training.max_steps, "epochs": recipe.training.epochs}


def _raised(old: dict[str, Any], new: dict[str, float]) -> bool:
    """Whether the new recipe asks for more training than the finished run did."""
    if new["max_steps"] > 0 or old.get("max_steps", -1) > 0:
        return new["max_steps"] > old.get("max_steps", -1)
    return new["epochs"] > old.get("epochs", 0)


def run(recipe: Recipe, *, resume: bool = False, callbacks: list | None = None) -> dict[str, Any]:
    """Train as `recipe` says. Returns the training summary (also written to training_summary.json)."""
    output_dir = Path(recipe.training.output_dir)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    with OutputLock(output_dir, enabled=_is_main_process()) as lock:
        try:
            return _run_locked(recipe, output_dir, resume=resume, callbacks=callbacks)
        except BaseException:
            if created:  # a run that failed before writing anything leaves no empty folder behind
                lock.remove_folder_if_unused()
            raise


def _run_locked(recipe: Recipe, output_dir: Path, *, resume: bool, callbacks) -> dict[str, Any]:
    import torch

    from rwkv_ft.data import check_data_source, prepare_sft_data
    from rwkv_ft.io import read_json_object

    previous = read_json_object(output_dir / SUMMARY_FILE) or {}
    if resume and previous.get("completed") and not _raised(previous.get("targets", {}), _targets(recipe)):
        raise RunComplete(
            f"{output_dir}: this run is complete ({previous.get('steps')} steps); nothing changed. "
            "Raise training.max_steps or training.epochs to train further."
        )
    checkpoints = complete_checkpoints(output_dir)
    if not resume and checkpoints:
        raise RecipeError(
            f"{output_dir} already holds checkpoints; pass --resume to continue that run, "
            "or choose another training.output_dir"
        )
    resume_from = checkpoints[-1] if resume and checkpoints else None
    if resume and resume_from is None:
        logger.warning("--resume: no good checkpoint in %s; training starts from step 0", output_dir)

    # Cheap checks first: paths, vocabulary, tokenizer, data file. Nothing slow runs before these.
    if recipe.training.compile == "step-graph":  # as the Trainer will see it: WORLD_SIZE from the launcher
        cuda = torch.cuda.is_available()
        gpus = torch.cuda.device_count() if cuda and "WORLD_SIZE" not in os.environ else 1
        check_step_graph_setup(int(os.environ.get("WORLD_SIZE", "1")), "cuda" if cuda else "cpu", gpus)
    vocab_size, model_source = model_vocab_size(recipe)
    tokenizer = load_tokenizer_for(recipe, model_source, vocab_size)
    check_data_source(recipe.data.path)

    from transformers import set_seed  # imports peft and bitsandbytes: only after the cheap checks

    set_seed(recipe.training.seed)
    # The data before the base: a bad row is named before a checkpoint is converted or a model built
    # (minutes for a large .pth), and output_dir gets nothing from a run that stops there.
    data = prepare_sft_data(
        recipe.data.path,
        tokenizer,
        template=recipe.data.template,
        max_length=recipe.data.max_length,
        format=recipe.data.format,
        split=recipe.data.split,
        strict=recipe.data.strict,
        append_eos=recipe.data.append_eos,
        pack=recipe.data.pack,
        eval_fraction=recipe.data.eval_fraction,
        eval_size=recipe.data.eval_size,
        seed=recipe.training.seed,
    )
    if data.skipped:
        logger.warning("skipped rows: %s", ", ".join(f"{n} {reason}" for reason, n in sorted(data.skipped.items())))

    base, base_record = prepare_base_model(recipe, output_dir, tokenizer)
    model = attach_adapter(load_model(recipe, base, base_record), recipe)
    set_chunk_len(model, recipe.training.chunk_len, recipe.training.chunk_offload)
    _log_trainable(model)
    has_eval = data.eval is not None and len(data.eval) > 0
    trainer = _make_trainer_class()(
        model=model,
        args=training_arguments(recipe, output_dir, has_eval),
        train_dataset=data.train,
        eval_dataset=data.eval if has_eval else None,
        data_collator=data_collator(recipe, tokenizer),
        processing_class=tokenizer,
        callbacks=[*_callbacks(output_dir), *(callbacks or [])],
    )
    trainer.cudagraph_steps = recipe.training.compile == "reduce-overhead"
    trainer.step_graph = recipe.training.compile == "step-graph"
    if trainer.step_graph:  # again as the Trainer set itself up (checked from the environment before)
        check_step_graph_setup(trainer.accelerator.num_processes, trainer.args.device, trainer.args.n_gpu)
    how = trainer.how_sharded
    trainer.equal_chunk_counts = how != "none" and recipe.training.chunk_len is not None
    zero3 = zero_stage(trainer.accelerator) == 3
    for lm in causal_lms(model):
        lm.recompute_last_chunk = zero3
    if (
        recipe.training.chunk_len
        and recipe.training.compile == "reduce-overhead"
        and trainer.accelerator.num_processes > 1
    ):
        # Under CUDA graphs each chunk's backward is a nested autograd pass (rwkv_ft.models.chunk_replay),
        # which accumulates every parameter's gradient once per chunk: DDP, FSDP and ZeRO expect once a step.
        raise RecipeError(
            "training.chunk_len with training.compile: reduce-overhead runs on one process only; "
            "use training.compile: true on several"
        )
    if recipe.training.chunk_offload and how != "none":
        # The offload tells parameters from activations by their storage; FSDP2 and ZeRO-3 gather
        # parameters into fresh memory at every step, which it would copy to the host as well (ZeRO-2
        # would work, but it has not been tried).
        raise RecipeError(
            f"training.chunk_offload works on one GPU or under DDP, not under {how} (the accelerate config); "
            "set training.chunk_offload=0"
        )
    if how == "fsdp2":  # before the Trainer shards the model
        fp32_trained_parameters(model)
    if recipe.training.compile and zero3:
        # ZeRO-3 gathers each layer's parameters in module hooks that torch.compile may not trace
        # (torch.compiler.disable), so a compiled block sees the empty partitions. FSDP2's hooks
        # are outside dynamo's view: its blocks compile whole.
        raise RecipeError(
            "training.compile does not work under DeepSpeed ZeRO-3 (its parameter gathering cannot be "
            "compiled); set training.compile=false, or use recipes/accelerate/fsdp.yaml (FSDP2) or ZeRO-2"
        )
    if resume_from is not None:
        progress = read_json_object(resume_from / PROGRESS_FILE) or {}
        trainer.prior_runtime_s = float(progress.get("runtime_s", 0.0))
        trainer.prior_sessions = int(progress.get("sessions", 1))
    try:
        train_output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except FloatingPointError as exc:
        raise type(exc)(_nonfinite_message(exc, output_dir, trainer.state.global_step + 1)) from exc
    metrics = trainer.evaluate() if has_eval else {}

    summary = {
        "completed": True,
        "base_model": base_record,
        "base_source": recipe.model.path or "model.config",
        "base_model_type": load_model_type(base),
        "adapter": recipe.adapter.type,
        "quantization": recipe.model.quantization,
        "data": recipe.data.path,
        "chat_template": recipe.data.template,
        "steps": trainer.state.global_step,
        "targets": _targets(recipe),
        "resumed_from_step": checkpoint_step(resume_from) if resume_from else None,
        "sessions": trainer.prior_sessions + 1,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "train_runtime_s": round(trainer.runtime_s(), 3),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "train_loss": whole_run_train_loss(trainer.state.log_history) or train_output.training_loss,
        "eval_loss": metrics.get("eval_loss"),
        "eval_tokens": metrics.get("eval_tokens"),
        "skipped_rows": data.skipped,
        "recipe": recipe.to_dict(),
    }
    # Every rank: a sharded model's parameters are gathered for the main process to save.
    tensors = consolidated_state_dict(trainer.model, how, trainable_only=recipe.adapter.type != "none")
    if trainer.is_world_process_zero():
        result_dir = save_result(trainer.model, tokenizer, recipe, output_dir, summary, state_dict=tensors)
        summary["result_dir"] = str(result_dir)
        plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png")
        if recipe.merge.enabled and recipe.adapter.type != "none":
            summary["merged_dir"] = str(merge_result(base, result_dir, recipe, output_dir))
        from rwkv_ft.io import write_json_atomically

        write_json_atomically(output_dir / SUMMARY_FILE, summary)
    trainer.accelerator.wait_for_everyone()
    return summary


def load_model_type(directory: Path) -> str | None:
    from rwkv_ft.convert import model_type_of

    return model_type_of(directory)


def _nonfinite_message(exc: FloatingPointError, output_dir: Path, step: int) -> str:
    if _is_main_process():
        moved, good = reject_checkpoint_before(output_dir, step)
    else:  # the main process moves the bad checkpoint aside; the last good one is the same for all
        older = [c for c in complete_checkpoints(output_dir) if checkpoint_step(c) != step - 1]
        moved, good = None, (older[-1] if older else None)
    lines = [str(exc) + "."]
    if moved is not None:
        lines.append(f"{moved.name} holds the weights that produced it and was moved to {moved.parent}.")
    if good is not None:
        lines.append(f"The last good checkpoint is {good}; --resume continues from it.")
    else:
        lines.append("There is no good checkpoint yet; --resume starts again from step 0.")
    lines.append(
        "Try a lower training.lr, training.precision=bf16 instead of fp16, or check the data around this step."
    )
    return " ".join(lines)


def whole_run_train_loss(log_history: list[dict[str, Any]]) -> float | None:
    """The mean train loss over every step of the run (all sessions), from the logged losses, each
    weighted by the number of steps it averages."""
    total = weight = 0.0
    last = 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            span = max(int(entry["step"]) - last, 1)
            total += float(entry["loss"]) * span
            weight += span
            last = int(entry["step"])
    return total / weight if weight else None


def save_result(
    model, tokenizer, recipe: Recipe, output_dir: Path, summary: dict[str, Any], state_dict: dict | None = None
) -> Path:
    """Save the adapter (or the full model) with the tokenizer (chat template included), the training
    summary and a model card. `state_dict`: the model's tensors gathered whole when it is sharded
    (`consolidated_state_dict`), saved instead of its parameters."""
    from rwkv_ft.hub import write_model_card
    from rwkv_ft.io import write_atomically

    result_dir = output_dir / ("model" if recipe.adapter.type == "none" else "adapter")

    def write(tmp: Path) -> None:
        if recipe.adapter.type == "none":
            model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        else:
            from rwkv_ft.adapters import save_adapter

            save_adapter(
                model,
                tmp,
                state_dict=state_dict,
                base_model=summary["base_model"],
                extra={
                    "data": summary["data"],
                    "recipe": summary["recipe"],
                    "base_model_type": summary["base_model_type"],
                    "chat_template": summary["chat_template"],
                },
            )
        tokenizer.save_pretrained(tmp)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
        write_model_card(tmp)

    return write_atomically(result_dir, write, overwrite=True)


def merge_result(base: Path, adapter_dir: Path, recipe: Recipe, output_dir: Path) -> Path:
    from rwkv_ft.merge import merge_adapter

    out = output_dir / ("merged.pth" if recipe.merge.format == "pth" else "merged")
    report = merge_adapter(base, adapter_dir, out, dtype=recipe.merge.dtype, format=recipe.merge.format, overwrite=True)
    for note in report.notes:
        logger.warning("merge: %s", note)
    return report.out


def _log_trainable(model) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "trainable parameters: %s of %s (%.3f%%)",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )


# --------------------------------------------------------------------------------------------------
# One run per output folder


class OutputLock:
    """An exclusive lock on `output_dir` for the length of a run (fcntl.flock on `.rwkv_ft.lock`).

    The kernel drops the lock when its process ends, however it ends, so a lock left by a killed
    run never blocks the next one. The file records the holder's pid for the error message.
    """

    NAME = ".rwkv_ft.lock"

    def __init__(self, output_dir: Path, *, enabled: bool = True):
        self.path = output_dir / self.NAME
        self.enabled = enabled
        self._fd: int | None = None

    def __enter__(self):
        if not self.enabled:
            return self
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, and say so
            logger.warning("no file locking on this platform: do not start two runs on %s", self.path.parent)
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RecipeError(
                f"{self.path.parent} is in use by another rwkv_ft run (pid {holder}); wait for it to finish, "
                "or choose another training.output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None
        return False

    def remove_folder_if_unused(self) -> None:
        """Remove the lock file and the output folder when they are all the folder holds (while the
        lock is still held, so no other run can be using them)."""
        if self._fd is None or any(p.name != self.NAME for p in self.path.parent.iterdir()):
            return
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()
        except OSError:  # something appeared in the meantime: keep it
            pass


def _distributed_state():
    """accelerate's process state, set up before anything touches the disk, so that rank 0 alone
    writes shared files (the base model) while the others wait. CPU-only machines train with gloo."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _is_main_process() -> bool:
    return _distributed_state().is_main_process


def _wait_for_everyone() -> None:
    _distributed_state().wait_for_everyone()


# --------------------------------------------------------------------------------------------------
# Sample generation after training


def sample_generation(model_dir: Path, recipe: Recipe) -> str:
    """The merged model's answer to `generate.prompt`, prompted through the saved chat template and
    stopped at the end of its turn."""
    from rwkv_ft.generation import generate_text

    return generate_text(
        model_dir,
        recipe.generate.prompt,
        chat=True,
        max_new_tokens=recipe.generate.max_new_tokens,
        temperature=recipe.generate.temperature,
        seed=recipe.training.seed,
    )


# --------------------------------------------------------------------------------------------------
# Command line


def build_parser(prog: str = "rwkv-ft train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune an RWKV model from a recipe. Example: "
        "accelerate launch -m rwkv_ft.train recipes/rwkv4_alpaca_lora.yaml training.lr=1e-4",
    )
    parser.add_argument("recipe", help="a recipe YAML file (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. training.max_steps=100")
    parser.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in output_dir")
    strict = parser.add_mutually_exclusive_group()
    strict.add_argument(
        "--strict", dest="strict", action="store_true", default=None, help="stop at the first bad data row"
    )
    strict.add_argument("--no-strict", dest="strict", action="store_false", help="skip bad data rows and count them")
    return parser


def main(argv: list[str] | None = None, prog: str = "rwkv-ft train") -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser(prog).parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.strict is not None:
        overrides.append(f"data.strict={str(args.strict).lower()}")
    from rwkv_ft.cli import user_errors

    try:
        recipe = load_recipe(args.recipe, overrides)
        summary = run(recipe, resume=args.resume)
        if _is_main_process():
            _report(summary, recipe)
    except RunComplete as done:
        print(f"{prog}: {done}")
        return 0
    except user_errors() as exc:
        if not (isinstance(exc, StoppedOnEveryRank) and _env_rank() > 0):  # agreed: the main process says it
            print(f"{prog}: error{_rank_label(exc)}: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not _lost_a_peer(exc):
            raise
        # Another rank failed and exited (its own message says why); the launcher stops this one too.
        print(f"{prog}: error{_rank_label(exc)}: another process of this run stopped (see its error)", file=sys.stderr)
        return 1
    return 0


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _rank_label(exc: BaseException) -> str:
    """ " (rank N)" in a run of several processes, for an error this rank alone met."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return f" (rank {_env_rank()})" if several and not isinstance(exc, StoppedOnEveryRank) else ""


def _lost_a_peer(exc: RuntimeError) -> bool:
    """Whether a collective failed because another process of the run is gone (gloo says so; NCCL
    waits until the launcher stops this process)."""
    text = str(exc)
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and ("closed by peer" in text or "reset by peer" in text)


def _report(summary: dict[str, Any], recipe: Recipe) -> None:
    out = Path(recipe.training.output_dir)
    lines = [
        f"train loss {summary['train_loss']:.4f}"
        + (f", eval loss {summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else ""),
        f"result: {summary.get('result_dir')}",
        f"loss curve: {out / 'loss_curve.png'}; tensorboard --logdir {out / 'runs'}",
    ]
    if summary.get("resumed_from_step") is not None:
        lines.insert(1, f"resumed from step {summary['resumed_from_step']}; {summary['steps']} steps in all")
    if "merged_dir" in summary:
        lines.append(f"merged model: {summary['merged_dir']}")
        if recipe.generate.prompt and recipe.merge.format == "hf":
            answer = sample_generation(Path(summary["merged_dir"]), recipe)
            lines.append(f"sample: {recipe.generate.prompt!r} -> {answer!r}")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main(prog="python -m rwkv_ft.train"))
