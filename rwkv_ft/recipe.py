"""Training recipes: YAML files with a fixed schema, overridable from the command line.

A recipe has the sections below; every key has a default, unknown keys are errors that name the
key and the file. Overrides are `section.key=value` (the value is parsed as YAML), e.g.
`training.lr=3e-4 data.max_length=2048 adapter.type=state`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class RecipeError(ValueError):
    """A recipe that cannot be used, with the file and key at fault."""


@dataclass
class ModelSection:
    path: str | None = None  # our directory, a BlinkDL .pth, another library's RWKV dir, or a Hub id
    model_type: str | None = None  # rwkv4 | rwkv7_ft: the architecture of a model built from `config`
    config: dict[str, Any] | None = None  # config kwargs (e.g. Rwkv4Config) for a from-scratch model
    dtype: str = "fp32"  # fp32 | bf16 | fp16: dtype of the (frozen) base weights
    quantization: str | None = None  # null | int8 | nf4 | fp4 (bitsandbytes; QLoRA)
    wkv_backend: str = "auto"  # auto | triton | torch


@dataclass
class DataSection:
    path: str = "data/alpaca_sample.jsonl"  # local .json/.jsonl/.parquet/.txt or a Hub dataset name
    format: str = "auto"  # auto | alpaca | sharegpt | openai | document ({"text": ...} rows or .txt files)
    split: str = "train"
    template: str = "world"
    max_length: int = 1024
    pack: bool = False
    eval_fraction: float | None = 0.1
    eval_size: int | None = None
    strict: bool = True
    append_eos: bool = False


@dataclass
class AdapterSection:
    type: str = "lora"  # lora | state | none (full fine-tuning)
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None  # null: RWKV defaults (att/ffn key, value, receptance; att output)
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    use_rslora: bool = False
    # base: LoRA matmuls in the activations' dtype (bf16 on a bf16 base), fp32 master weights; fp32: peft's
    # own forward, which upcasts every adapted layer's input to fp32 (slower; see rwkv_ft/adapters/fast_lora.py)
    lora_compute: str = "base"
    train_token_shift: bool = False  # state tuning: also learn the token-shift states


@dataclass
class TrainingSection:
    output_dir: str = "outputs/run"
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    eval_batch_size: int | None = None
    grad_accum: int = 1
    lr: float = 2e-4
    schedule: str = "cosine"  # cosine | linear | constant_with_warmup | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; none needed with bf16 weights, see rwkv_ft.train)
    # false | true (whole blocks: least memory) | selective (keep the large matmuls' outputs, recompute the rest)
    gradient_checkpointing: bool | str = False
    # with gradient_checkpointing: true, this many blocks (the last ones) recompute selectively instead:
    # memory to spare traded for speed (RWKV-4 7.6B, batch 1, ctx 1024: ~90 MiB and ~0.7 ms a step each)
    selective_blocks: int = 0
    # false | true (torch.compile every block: fused elementwise work, far fewer kernel launches) |
    # reduce-overhead (also CUDA graphs of each block's forward and backward: no per-op launch cost) |
    # step-graph (one CUDA graph per micro-step, forward and backward: no per-block host cost either;
    # one process, no chunk_len, no quantized base; see rwkv_ft.step_graph)
    compile: bool | str = False
    chunk_len: int | None = None  # long-context training: run samples in chunks of this many tokens (exact gradient)
    # long-context training on a GPU: share (0..1) of the chunks whose activations wait in pinned host
    # memory instead of being recomputed in the backward (needs host memory; on an H100, RWKV-7 ran 9%
    # faster at 0.5, RWKV-4 no faster: rwkv_ft.models.offload)
    chunk_offload: float = 0.0
    logging_steps: int = 1
    eval_steps: int | None = None  # null: evaluate at the end of each epoch
    save_steps: int | None = None  # null: save at the end of each epoch
    save_total_limit: int | None = 2
    group_by_length: bool = False
    seed: int = 42
    dataloader_workers: int = 0


@dataclass
class MergeSection:
    enabled: bool = False
    dtype: str = "fp32"
    format: str = "hf"  # hf | pth | transformers


@dataclass
class GenerateSection:
    prompt: str | None = None  # a user message; rendered with the data template
    max_new_tokens: int = 48
    temperature: float = 0.0  # 0: greedy; otherwise nucleus sampling (top_p 0.9), seeded by training.seed


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: str | None = None  # world | neox | PATH; null: the model directory's own
    data: DataSection = field(default_factory=DataSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    merge: MergeSection = field(default_factory=MergeSection)
    generate: GenerateSection = field(default_factory=GenerateSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "model.dtype": ("fp32", "bf16", "fp16"),
    "model.quantization": (None, "int8", "nf4", "fp4"),
    "model.wkv_backend": ("auto", "triton", "torch"),
    "data.format": ("auto", "alpaca", "sharegpt", "openai", "document"),
    "adapter.type": ("lora", "state", "none"),
    "adapter.lora_compute": ("base", "fp32"),
    "training.schedule": ("cosine", "linear", "constant_with_warmup", "constant"),
    "training.precision": ("fp32", "bf16", "fp16"),
    "training.gradient_checkpointing": (False, True, "selective"),
    "training.compile": (False, True, "reduce-overhead", "step-graph"),
    "merge.dtype": ("fp32", "bf16", "fp16"),
    "merge.format": ("hf", "pth", "transformers"),
}


def _build(cls: type, values: dict[str, Any], where: str, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from `values`, type-checking each key and recursing into sections."""
    if not isinstance(values, dict):
        raise RecipeError(
            f"{where}: {prefix.rstrip('.') or 'the recipe'} must be a mapping, got {type(values).__name__}"
        )
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown key '{prefix}{unknown[0]}' (known keys: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        key, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, where, key + ".")
        else:
            kwargs[name] = _check_type(value, hint, key, where)
    recipe_part = cls(**kwargs)
    for f in fields(recipe_part):
        allowed = CHOICES.get(prefix + f.name)
        if allowed is not None and getattr(recipe_part, f.name) not in allowed:
            raise RecipeError(
                f"{where}: {prefix}{f.name} must be one of {', '.join(map(str, allowed))}, "
                f"got {getattr(recipe_part, f.name)!r}"
            )
    return recipe_part


def _check_type(value: Any, hint: Any, key: str, where: str) -> Any:
    """`value` if it fits the annotation `hint` (ints widen to float), else a RecipeError naming `key`."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise RecipeError(f"{where}: {key} cannot be null")
    for option in options:
        kind = typing.get_origin(option) or option
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind in (int, bool, str, dict) and isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return value
        if kind is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise RecipeError(f"{where}: {key} should be {expected}, got {value!r}")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["training.lr=3e-4", "data.pack=true"]` -> nested dict, values parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else None
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads "3e-4" as a string
        node = nested
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML (None: defaults only) and apply command-line overrides."""
    values: dict[str, Any] = {}
    where = "recipe defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe not found: {path}")
        where = str(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise RecipeError(f"{path}: not UTF-8 text ({exc})") from exc
        values = _numeric_strings_to_floats(values)
    if overrides:
        values = _merge(values, parse_overrides(overrides))
        where += " + command-line overrides"
    recipe = _build(Recipe, values, where)
    _check_ranges(recipe, where)
    return recipe


# Keys that must be >= 1 (when set), and keys that must be >= 0.
AT_LEAST_ONE = (
    "data.max_length",
    "adapter.r",
    "training.batch_size",
    "training.grad_accum",
    "training.logging_steps",
    "training.eval_batch_size",
    "training.eval_steps",
    "training.save_steps",
    "training.save_total_limit",
    "training.chunk_len",
    "generate.max_new_tokens",
)
NON_NEGATIVE = (
    "training.lr",
    "training.selective_blocks",
    "training.weight_decay",
    "training.warmup_steps",
    "generate.temperature",
    "adapter.dropout",
)


def _check_ranges(recipe: Recipe, where: str) -> None:
    for key in AT_LEAST_ONE + NON_NEGATIVE:
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        low = 1 if key in AT_LEAST_ONE else 0
        if value is not None and not value >= low:  # `not >=` also catches nan
            raise RecipeError(f"{where}: {key} must be >= {low}, got {value!r}")
    if recipe.training.selective_blocks and recipe.training.gradient_checkpointing is not True:
        raise RecipeError(
            f"{where}: training.selective_blocks needs training.gradient_checkpointing: true (it turns some of "
            "the whole-block checkpointed blocks into selective ones)"
        )
    offload = recipe.training.chunk_offload
    if not 0 <= offload <= 1:  # `not` also catches nan
        raise RecipeError(f"{where}: training.chunk_offload must be between 0 and 1, got {offload!r}")
    if offload and recipe.training.chunk_len is None:
        raise RecipeError(f"{where}: training.chunk_offload needs training.chunk_len (it offloads chunks)")
    if offload and recipe.training.gradient_checkpointing == "selective" and not recipe.training.compile:
        raise RecipeError(
            f"{where}: training.chunk_offload with gradient_checkpointing: selective needs training.compile: true "
            "(uncompiled, selective recompute keeps what it saves on the GPU, out of the offload's reach)"
        )
    if offload and recipe.training.compile == "reduce-overhead":
        raise RecipeError(
            f"{where}: training.chunk_offload cannot be combined with training.compile: reduce-overhead (a CUDA "
            "graph's next replay would overwrite the activations being copied out); set one of them off"
        )
    if recipe.training.compile == "step-graph" and recipe.training.chunk_len is not None:
        raise RecipeError(
            f"{where}: training.compile: step-graph cannot record long-context chunks (training.chunk_len); "
            "use reduce-overhead"
        )
    if recipe.training.compile == "step-graph" and recipe.model.quantization is not None:
        raise RecipeError(
            f"{where}: training.compile: step-graph is not available with a quantized base (model.quantization); "
            "use true"
        )
    if recipe.model.path is None and recipe.model.config is not None and recipe.model.model_type is None:
        raise RecipeError(f"{where}: model.model_type must name the architecture of the model built from model.config")


def _numeric_strings_to_floats(values: Any) -> Any:
    """YAML 1.1 reads `2e-4` as a string; recipes mean a number."""
    if isinstance(values, dict):
        return {k: _numeric_strings_to_floats(v) for k, v in values.items()}
    if isinstance(values, str) and _looks_numeric(values) and any(c in values for c in "eE"):
        return float(values)
    return values
