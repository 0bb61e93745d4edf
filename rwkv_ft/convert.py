"""Checkpoint conversion between BlinkDL `.pth`, other libraries' directories and ours, for every
RWKV version rwkv_ft has (each version's key maps live in `models/rwkvN/conversion_rwkvN.py`).

- `load_any_checkpoint(src)`: a `.pth` file, one of our directories, or a foreign directory
  (transformers' `RwkvForCausalLM`, fla's `RWKV7ForCausalLM`), checked key by key against a model of
  the shape its tensors say, with every missing, unexpected or misshaped key listed.
- `convert_checkpoint` / `export_model`: the `rwkv-ft convert` / `rwkv-ft export` operations.
- `load_pretrained`: one of our directories through `from_pretrained` (dtype, bitsandbytes), after
  checking that its config and weights agree, so a wrong config never trains silently.
Values are copied bit for bit; each version names the tensors it keeps in fp32.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rwkv_ft.io import (
    DTYPES,
    CheckpointError,
    check_safetensors_header,
    prepare_output,
    read_json_object,
    read_pth,
    read_safetensors,
    require_path,
    write_atomically,
)
from rwkv_ft.models.architecture import (
    Architecture,
    architecture_for_model_type,
    architectures,
    detect_blinkdl,
)

logger = logging.getLogger("rwkv_ft.convert")

__all__ = [
    "DTYPES",
    "CheckpointError",
    "Checkpoint",
    "build_model",
    "cast_state_dict",
    "check_state_dict",
    "convert_checkpoint",
    "export_model",
    "load_any_checkpoint",
    "load_blinkdl",
    "load_pretrained",
    "model_type_of",
    "save_pth",
    "write_atomically",
]


@dataclass
class Checkpoint:
    """A checkpoint read into memory: its architecture, our config, our-named tensors, its format."""

    arch: Architecture
    config: Any
    state_dict: dict[str, torch.Tensor]
    kind: str  # "pth", "rwkv_ft" or a foreign format's name


# --------------------------------------------------------------------------------------------------
# Validation


def expected_shapes(arch: Architecture, config) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = arch.model_class(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    arch: Architecture,
    config,
    source: str,
    source_name: Callable[[str], str] = lambda key: key,
) -> dict[str, torch.Tensor]:
    """Return `state_dict` with squeezable shapes fixed, or raise listing every bad key.

    Missing, unexpected and misshaped keys are all reported at once, named as the source names
    them (`source_name` maps our key back). A tensor whose shape differs only by size-1 axes (e.g.
    time_mix stored as (C,) instead of (1, 1, C)) is reshaped.
    """
    shapes = expected_shapes(arch, config)
    state_dict = {k: v for k, v in state_dict.items() if k in shapes or not arch.ignorable_keys(k)}
    missing = sorted(source_name(k) for k in set(shapes) - set(state_dict))
    unexpected = sorted(source_name(k) for k in set(state_dict) - set(shapes))
    misshaped, fixed = [], {}
    for key, tensor in state_dict.items():
        if key not in shapes:
            continue
        want = shapes[key]
        if tensor.shape != want:
            if [s for s in tensor.shape if s != 1] == [s for s in want if s != 1]:
                tensor = tensor.reshape(want)
            else:
                misshaped.append(f"{source_name(key)}: {tuple(tensor.shape)}, expected {tuple(want)}")
                continue
        fixed[key] = tensor
    if missing or unexpected or misshaped:
        raise CheckpointError(_mismatch_report(source, arch.describe(config), missing, unexpected, misshaped))
    return fixed


def _mismatch_report(source: str, described: str, missing, unexpected, misshaped) -> str:
    lines = [f"{source}: the weights do not match the model its config describes ({described})"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if misshaped:
        lines.append(f"  misshaped keys ({len(misshaped)}): {'; '.join(misshaped)}")
    return "\n".join(lines)


def cast_state_dict(
    state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None, arch: Architecture | None = None
) -> dict[str, torch.Tensor]:
    """Cast floating tensors to `dtype` (None keeps them), then the architecture's fp32 tensors back to fp32."""
    arch = arch or _architecture_of_keys(state_dict)
    out = {}
    for key, value in state_dict.items():
        if value.is_floating_point():
            if arch.keeps_fp32(key):
                value = value.float()
            elif dtype is not None:
                value = value.to(dtype)
        out[key] = value
    return out


def _architecture_of_keys(state_dict: Mapping[str, torch.Tensor]) -> Architecture:
    for arch in architectures():
        if arch.matches_blinkdl(k.removeprefix("rwkv.") for k in state_dict):
            return arch
    raise CheckpointError("cannot tell the RWKV version of this state dict")


# --------------------------------------------------------------------------------------------------
# Reading


def load_blinkdl(path: str | os.PathLike) -> Checkpoint:
    """A BlinkDL `.pth` (or a bare `.safetensors` state dict with BlinkDL's names) of any supported version."""
    path = require_path(path, "checkpoint file")
    raw = read_safetensors(path) if path.suffix == ".safetensors" else read_pth(path)
    if "_strategy" in raw:
        raise CheckpointError(
            f"{path}: this file was pre-converted for a strategy by rwkv's convert_model; use the original .pth"
        )
    found = detect_blinkdl(raw)
    if isinstance(found, str):
        supported = ", ".join(a.name for a in architectures())
        raise CheckpointError(f"{path}: this is {found}; rwkv_ft loads {supported}")
    arch = found
    config = arch.config_from_blinkdl(raw, str(path))
    state_dict = check_state_dict(arch.blinkdl_to_ours(raw, config), arch, config, str(path), arch.blinkdl_key)
    return Checkpoint(arch, config, cast_state_dict(state_dict, None, arch), "pth")


def read_hf_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model directory: safetensors (single or sharded) or pytorch_model.bin."""
    directory = require_path(directory, "model directory")
    for index_name, reader in (
        ("model.safetensors.index.json", read_safetensors),
        ("pytorch_model.bin.index.json", read_pth),
    ):
        index = directory / index_name
        if index.exists():
            weight_map = (read_json_object(index) or {}).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object; the index file is damaged")
            state_dict = {}
            for shard in sorted(set(weight_map.values())):
                state_dict.update(reader(directory / shard))
            return state_dict
    if (directory / "model.safetensors").exists():
        return read_safetensors(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").exists():
        return read_pth(directory / "pytorch_model.bin")
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin (sharded or not) found")


def read_config_json(directory: Path) -> dict[str, Any]:
    config = read_json_object(directory / "config.json")
    if config is None:
        raise CheckpointError(f"{directory}: no config.json; not a model directory")
    return config


def model_type_of(directory: str | os.PathLike) -> str | None:
    """The `model_type` in a model directory's config.json, or None when it has none."""
    config = read_json_object(Path(directory) / "config.json")
    return None if config is None else config.get("model_type")


def _config_from_ours(arch: Architecture, directory: Path):
    try:
        return arch.config_class.from_pretrained(directory)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{directory / 'config.json'}: {exc}") from exc


def load_any_checkpoint(src: str | os.PathLike) -> Checkpoint:
    """A `.pth`/`.safetensors` file, one of our directories, or a foreign RWKV directory."""
    src = require_path(src)
    if src.is_file():
        return load_blinkdl(src)
    hf = read_config_json(src)
    model_type = hf.get("model_type")
    arch = architecture_for_model_type(model_type)
    if arch is not None:
        config = _config_from_ours(arch, src)
        state_dict = check_state_dict(read_hf_weights(src), arch, config, str(src))
        return Checkpoint(arch, config, cast_state_dict(state_dict, None, arch), "rwkv_ft")
    for arch in architectures():
        for fmt in arch.foreign_formats:
            if fmt.model_type == model_type:
                config, state_dict = fmt.load(src, hf)
                state_dict = check_state_dict(state_dict, arch, config, str(src))
                return Checkpoint(arch, config, cast_state_dict(state_dict, None, arch), fmt.name)
    known = [a.model_type for a in architectures()] + [f.model_type for a in architectures() for f in a.foreign_formats]
    raise CheckpointError(
        f"{src / 'config.json'}: model_type {model_type!r} is not an RWKV model rwkv_ft reads "
        f"(it reads model_type {', '.join(map(repr, known))} and BlinkDL .pth files)"
    )


def verify_model_dir(directory: str | os.PathLike) -> tuple[Architecture, Any]:
    """Check that one of our directories is complete and its weights fit its config, without loading
    the tensors (names and shapes from the safetensors headers). Returns (architecture, config)."""
    from safetensors import safe_open

    directory = require_path(directory, "model directory")
    hf = read_config_json(directory)
    arch = architecture_for_model_type(hf.get("model_type"))
    if arch is None:
        raise CheckpointError(
            f"{directory / 'config.json'}: model_type {hf.get('model_type')!r} is not one of rwkv_ft's "
            f"({', '.join(a.model_type for a in architectures())}); convert it first with `rwkv-ft convert`"
        )
    config = _config_from_ours(arch, directory)
    files = _weight_files(directory)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        check_safetensors_header(file)
        with safe_open(str(file), framework="pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    expected = {k: tuple(v) for k, v in expected_shapes(arch, config).items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(k for k in set(shapes) - set(expected) if not arch.ignorable_keys(k))
    common = sorted(set(shapes) & set(expected))
    misshaped = [f"{k}: {shapes[k]}, expected {expected[k]}" for k in common if shapes[k] != expected[k]]
    if missing or unexpected or misshaped:
        raise CheckpointError(_mismatch_report(str(directory), arch.describe(config), missing, unexpected, misshaped))
    return arch, config


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = (read_json_object(index) or {}).get("weight_map") or {}
        return [directory / name for name in sorted(set(weight_map.values()))]
    if (directory / "model.safetensors").exists():
        return [directory / "model.safetensors"]
    raise CheckpointError(f"{directory}: no model.safetensors; the model directory is incomplete")


def load_pretrained(directory: str | os.PathLike, **kwargs: Any) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained(directory, **kwargs)` for one of our directories, after
    `verify_model_dir`: a config that disagrees with the weights is an error naming the keys."""
    from transformers import AutoModelForCausalLM

    verify_model_dir(directory)
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, **kwargs)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointError(f"{directory}: weights do not match the model ({problems})")
    return model


def is_complete_model_dir(directory: Path) -> bool:
    """True when `directory` holds a model of ours that `verify_model_dir` accepts."""
    try:
        verify_model_dir(directory)
    except (CheckpointError, FileNotFoundError, OSError):
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Writing


def build_model(config, state_dict: Mapping[str, torch.Tensor], arch: Architecture | None = None):
    """Our model holding exactly these tensors (no re-initialisation, dtypes kept)."""
    arch = arch or architecture_for_model_type(config.model_type)
    with torch.device("meta"):
        model = arch.model_class(config)
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    return model.eval()


def pth_path(out: str | os.PathLike) -> Path:
    """`out`, with `.pth` added when it has no extension (so `export ... model` writes model.pth)."""
    out = Path(out)
    return out if out.suffix else out.with_name(out.name + ".pth")


def save_pth(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    arch: Architecture | None = None,
    config=None,
    overwrite: bool = False,
) -> Path:
    """Write our state dict as a BlinkDL `.pth` that BlinkDL's `rwkv` package loads."""
    arch = arch or _architecture_of_keys(state_dict)
    blink = {k: v.contiguous() for k, v in arch.ours_to_blinkdl(state_dict, config).items()}
    return write_atomically(pth_path(path), lambda tmp: torch.save(blink, tmp), overwrite=overwrite, is_dir=False)


def save_model_dir(model, out: str | os.PathLike, *, tokenizer=None, overwrite: bool = False, extra=None) -> Path:
    """`model.save_pretrained` (and the tokenizer) into `out`, atomically; `extra(tmp)` adds files."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)

    return write_atomically(out, write, overwrite=overwrite)


# --------------------------------------------------------------------------------------------------
# Tokenizers beside converted models


def resolve_tokenizer(spec: str, src: Path, arch: Architecture, config) -> tuple[Any, str]:
    """(tokenizer or None, a sentence saying which one and why), resolved before anything is written.

    "auto": the source directory's own tokenizer, else the one the vocabulary size means for this
    version (World for 65,536 rows; GPT-NeoX only when it can be had without waiting on the network),
    else none. A tokenizer whose ids do not fit the embedding is refused.
    """
    from rwkv_ft.tokenizers import TokenizerUnavailable, load_tokenizer

    if spec == "none":
        return None, "no tokenizer written (--tokenizer none)"
    if spec == "auto":
        if src.is_dir() and any((src / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            spec, why = str(src), "the source directory's own"
        else:
            spec = arch.tokenizer_for_vocab(config.vocab_size)
            if spec is None:
                return None, (
                    f"no tokenizer written: a vocabulary of {config.vocab_size} matches no tokenizer rwkv_ft knows; "
                    "add one with `rwkv-ft convert ... --tokenizer PATH` (a tokenizer.json or World vocabulary file)"
                    " or save one into the output directory with tokenizer.save_pretrained(OUT_DIR)"
                )
            why = f"the {spec} tokenizer, from the vocabulary size {config.vocab_size}"
            try:
                tokenizer = load_tokenizer(spec)
            except TokenizerUnavailable as exc:
                return None, f"no tokenizer written: {exc}; add it later with --tokenizer PATH"
            check_tokenizer_fits(tokenizer, config.vocab_size, f"--tokenizer {spec}")
            return tokenizer, f"tokenizer: {why}"
    else:
        why = spec
    try:
        tokenizer = load_tokenizer(spec)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"--tokenizer {spec}: {exc}\n(pass --tokenizer world, --tokenizer PATH to a tokenizer.json, "
            "or --tokenizer none to convert the weights alone)"
        ) from exc
    check_tokenizer_fits(tokenizer, config.vocab_size, f"--tokenizer {spec}")
    return tokenizer, f"tokenizer: {why}"


def check_tokenizer_fits(tokenizer, vocab_size: int, source: str) -> None:
    """Refuse a tokenizer that can produce ids the model's embedding does not have."""
    size = len(tokenizer)
    if size > vocab_size:
        raise ValueError(
            f"{source}: the tokenizer has {size} ids but the model's embedding has only {vocab_size} rows; "
            "it is not this model's tokenizer"
        )


# --------------------------------------------------------------------------------------------------
# The two CLI operations


def convert_checkpoint(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str = "auto",
    dtype: str | None = None,
    overwrite: bool = False,
    report: Callable[[str], None] = logger.info,
) -> Path:
    """Convert a BlinkDL `.pth` or a foreign RWKV directory into a directory of ours.

    The result loads with `AutoModelForCausalLM.from_pretrained(out_dir)` and, when a tokenizer was
    written, `AutoTokenizer.from_pretrained(out_dir)` (after `import rwkv_ft`). `report` receives the
    sentence saying which tokenizer was written, or why none was.
    """
    src = require_path(src)
    prepare_output(Path(out_dir), overwrite)  # refuse before the (slow) load, not after it
    ckpt = load_any_checkpoint(src)
    tok, why = resolve_tokenizer(tokenizer, src, ckpt.arch, ckpt.config)
    model = build_model(ckpt.config, cast_state_dict(ckpt.state_dict, DTYPES[dtype] if dtype else None, ckpt.arch))
    out = save_model_dir(model, out_dir, tokenizer=tok, overwrite=overwrite)
    report(why)
    return out


def export_model(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model as a BlinkDL `.pth` (`format="pth"`; `.pth` is added to an OUT without an
    extension) or a foreign format of its version (`"transformers"` for RWKV-4), tokenizer included."""
    ckpt = load_any_checkpoint(model_dir)
    state_dict = cast_state_dict(ckpt.state_dict, DTYPES[dtype] if dtype else None, ckpt.arch)
    if format == "pth":
        return save_pth(state_dict, out, arch=ckpt.arch, config=ckpt.config, overwrite=overwrite)
    fmt = next((f for f in ckpt.arch.foreign_formats if f.name == format and f.save is not None), None)
    if fmt is None:
        formats = ["pth"] + [f.name for f in ckpt.arch.foreign_formats if f.save is not None]
        raise ValueError(f"--format {format}: {ckpt.arch.name} models export as {', '.join(formats)}")

    def write(tmp: Path) -> None:
        fmt.save(ckpt.config, state_dict, tmp)
        copy_tokenizer(Path(model_dir), tmp)

    return write_atomically(out, write, overwrite=overwrite)


def copy_tokenizer(src: Path, out: Path) -> bool:
    """Save the tokenizer of model directory `src` (if it has one) into `out`; True if one was saved."""
    from rwkv_ft.tokenizers import load_tokenizer

    if src.is_dir() and any((src / name).exists() for name in ("tokenizer_config.json", "tokenizer.json")):
        load_tokenizer(str(src)).save_pretrained(out)
        return True
    return False
