"""Checkpoint conversion between BlinkDL `.pth`, transformers' RWKV directories and ours.

Our state dict is BlinkDL's with an `rwkv.` prefix on everything but `head.weight`, so the BlinkDL
direction is a rename; the transformers direction renames modules (`emb` <-> `embeddings`,
`ln0` <-> `pre_ln`, `att` <-> `attention`, `ffn` <-> `feed_forward`, `time_mix_k` <-> `time_mix_key`, ...).
Values are copied bit for bit; only `time_decay` and `time_first` are kept in fp32.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from rwkv_ft.models.rwkv4 import Rwkv4Config, Rwkv4ForCausalLM

FP32_PARAMS = ("time_decay", "time_first")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as RWKV-4, with what is wrong and where."""


# --------------------------------------------------------------------------------------------------
# Key names


def blinkdl_to_ours(key: str) -> str:
    return key if key == "head.weight" else "rwkv." + key


def ours_to_blinkdl(key: str) -> str:
    return key if key == "head.weight" else key.removeprefix("rwkv.")


# (ours, transformers) fragment pairs, applied in order.
_TRANSFORMERS_RENAMES = [
    ("rwkv.emb.", "rwkv.embeddings."),
    (".ln0.", ".pre_ln."),
    (".att.", ".attention."),
    (".ffn.", ".feed_forward."),
    (".time_mix_k", ".time_mix_key"),
    (".time_mix_v", ".time_mix_value"),
    (".time_mix_r", ".time_mix_receptance"),
]


def ours_to_transformers(key: str) -> str:
    for ours, theirs in _TRANSFORMERS_RENAMES:
        key = key.replace(ours, theirs)
    return key


def transformers_to_ours(key: str) -> str:
    for ours, theirs in _TRANSFORMERS_RENAMES:
        key = key.replace(theirs, ours)
    return key


# --------------------------------------------------------------------------------------------------
# Version detection and validation


def detect_rwkv_version(keys: Iterable[str]) -> str:
    """'4', '5', '6' or '7' from the parameter names of a BlinkDL-style state dict."""
    keys = list(keys)

    def has(pattern: str) -> bool:
        return any(re.search(pattern, k) for k in keys)

    if has(r"att\.(x_r|w0|k_k|r_k)$"):
        return "7"
    if has(r"time_maa"):
        return "6"
    if has(r"att\.(ln_x|time_faaaa|gate)\b"):
        return "5"
    if has(r"att\.time_first$") or has(r"attention\.time_first$"):
        return "4"
    raise CheckpointError("not an RWKV checkpoint: no RWKV-4/5/6/7 attention parameters found")


def config_from_blinkdl(state_dict: Mapping[str, torch.Tensor], source: str) -> Rwkv4Config:
    """Model shape read off the tensors: vocab and width from `emb.weight`, depth from block indices."""
    for key in ("emb.weight", "blocks.0.ffn.key.weight"):
        if key not in state_dict:
            raise CheckpointError(f"{source}: missing key {key!r}, needed to read the model's shape")
    vocab, width = state_dict["emb.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    return Rwkv4Config(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        intermediate_size=state_dict["blocks.0.ffn.key.weight"].shape[0],
    )


def expected_shapes(config: Rwkv4Config) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = Rwkv4ForCausalLM(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: Rwkv4Config,
    source: str,
    source_name: Callable[[str], str] = lambda key: key,
) -> dict:
    """Return `state_dict` with BlinkDL's squeezable shapes fixed, or raise listing every bad key.

    Missing, unexpected and misshaped keys are all reported at once, named as the source file
    names them (`source_name` maps our key back).
    A tensor whose shape differs only by size-1 axes (e.g. time_mix stored as (C,) instead of
    (1, 1, C)) is reshaped.
    """
    shapes = expected_shapes(config)
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
        lines = [f"{source}: the checkpoint does not match an RWKV-4 model of its shape ({_describe(config)})"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if misshaped:
            lines.append(f"  misshaped keys ({len(misshaped)}): {'; '.join(misshaped)}")
        raise CheckpointError("\n".join(lines))
    return fixed


def _describe(config: Rwkv4Config) -> str:
    return f"L={config.num_hidden_layers}, C={config.hidden_size}, F={config.intermediate_size}, V={config.vocab_size}"


def _with_fp32_time_params(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.float() if k.endswith(FP32_PARAMS) else v) for k, v in state_dict.items()}


def cast_state_dict(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating tensors to `dtype` (None keeps them), then time_decay/time_first back to fp32."""
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    return _with_fp32_time_params(state_dict)


# --------------------------------------------------------------------------------------------------
# Reading


def _require_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    return path


def read_pth(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.pth` file, loaded safely (`weights_only=True`)."""
    path = _require_path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors (a BlinkDL RWKV .pth)")
    if "_strategy" in obj:
        raise CheckpointError(
            f"{path}: this file was pre-converted for a strategy by rwkv's convert_model; use the original .pth"
        )
    return dict(obj)


def load_blinkdl(path: str | os.PathLike) -> tuple[Rwkv4Config, dict[str, torch.Tensor]]:
    """Config and our-named state dict of a BlinkDL RWKV-4 `.pth` (Pile, Raven, World)."""
    raw = read_pth(path)
    version = detect_rwkv_version(raw)
    if version != "4":
        raise CheckpointError(f"{path}: this is an RWKV-{version} checkpoint; rwkv_ft loads RWKV-4 only for now")
    config = config_from_blinkdl(raw, str(path))
    state_dict = check_state_dict({blinkdl_to_ours(k): v for k, v in raw.items()}, config, str(path), ours_to_blinkdl)
    return config, _with_fp32_time_params(state_dict)


def read_hf_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model directory: safetensors (single or sharded) or pytorch_model.bin."""
    from safetensors.torch import load_file

    directory = _require_path(directory)
    for index_name, reader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", lambda p: torch.load(p, map_location="cpu", weights_only=True)),
    ):
        index = directory / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state_dict = {}
            for shard in shards:
                state_dict.update(reader(directory / shard))
            return state_dict
    if (directory / "model.safetensors").exists():
        return load_file(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").exists():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin (sharded or not) found")


def load_transformers_rwkv(directory: str | os.PathLike) -> tuple[Rwkv4Config, dict[str, torch.Tensor]]:
    """Config and our-named state dict of a transformers `RwkvForCausalLM` directory."""
    directory = _require_path(directory)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{directory}: no config.json; not a transformers model directory")
    hf = json.loads(config_file.read_text())
    if hf.get("model_type") != "rwkv":
        raise CheckpointError(f"{config_file}: model_type is {hf.get('model_type')!r}, expected 'rwkv'")
    width = hf["hidden_size"]
    if hf.get("attention_hidden_size", width) not in (None, width):
        raise CheckpointError(f"{config_file}: attention_hidden_size != hidden_size is not an RWKV-4 release shape")
    config = Rwkv4Config(
        vocab_size=hf["vocab_size"],
        hidden_size=width,
        num_hidden_layers=hf["num_hidden_layers"],
        intermediate_size=hf.get("intermediate_size") or 4 * width,
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        bos_token_id=hf.get("bos_token_id", 0),
        eos_token_id=hf.get("eos_token_id", 0),
        pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
    )
    raw = read_hf_weights(directory)
    if "head.weight" not in raw and hf.get("tie_word_embeddings"):
        raw["head.weight"] = raw["rwkv.embeddings.weight"]
    state_dict = check_state_dict(
        {transformers_to_ours(k): v for k, v in raw.items()}, config, str(directory), ours_to_transformers
    )
    return config, _with_fp32_time_params(state_dict)


def model_type_of(directory: str | os.PathLike) -> str | None:
    """The `model_type` in a model directory's config.json, or None when it has none."""
    config = Path(directory) / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.exists() else None


def load_any_checkpoint(src: str | os.PathLike) -> tuple[Rwkv4Config, dict[str, torch.Tensor], str]:
    """(config, state dict, kind) for a `.pth` file, a transformers RWKV directory, or one of ours."""
    src = _require_path(src)
    if src.is_file():
        return (*load_blinkdl(src), "pth")
    if model_type_of(src) == Rwkv4Config.model_type:
        config = Rwkv4Config.from_pretrained(src)
        raw = read_hf_weights(src)
        return config, check_state_dict(raw, config, str(src)), "rwkv_ft"
    return (*load_transformers_rwkv(src), "transformers")


# --------------------------------------------------------------------------------------------------
# Writing (atomically: into a temporary sibling, then renamed into place)


def _prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")


def _replace(tmp: Path, out: Path) -> None:
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    os.replace(tmp, out)


def write_atomically(out: str | os.PathLike, write, *, overwrite: bool = False, is_dir: bool = True) -> Path:
    """Call `write(tmp_path)` on a temporary sibling of `out`, then move it into place."""
    out = Path(out)
    _prepare_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        write(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    return out


def build_model(config: Rwkv4Config, state_dict: Mapping[str, torch.Tensor]) -> Rwkv4ForCausalLM:
    """Our model holding exactly these tensors (no re-initialisation, dtypes kept)."""
    with torch.device("meta"):
        model = Rwkv4ForCausalLM(config)
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    return model.eval()


def save_pth(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write our state dict as a BlinkDL `.pth` that BlinkDL's `rwkv` package loads."""
    blink = {ours_to_blinkdl(k): v.contiguous() for k, v in state_dict.items()}
    return write_atomically(path, lambda tmp: torch.save(blink, tmp), overwrite=overwrite, is_dir=False)


def save_transformers(
    config: Rwkv4Config,
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a directory that plain transformers loads with `RwkvForCausalLM.from_pretrained`."""
    from transformers import RwkvConfig, RwkvForCausalLM

    any_weight = state_dict["rwkv.emb.weight"]
    hf_config = RwkvConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        attention_hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        layer_norm_epsilon=config.layer_norm_epsilon,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        # transformers halves activations every `rescale_every` layers at inference; that only
        # guards fp16 against overflow, and changes nothing else, so we turn it on for fp16 only.
        rescale_every=6 if any_weight.dtype == torch.float16 else 0,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = RwkvForCausalLM(hf_config)
    model.load_state_dict({ours_to_transformers(k): v for k, v in state_dict.items()}, strict=True, assign=True)
    return write_atomically(out_dir, lambda tmp: model.save_pretrained(tmp), overwrite=overwrite)


# --------------------------------------------------------------------------------------------------
# The two CLI operations

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _resolve_tokenizer(spec: str, src: Path, config: Rwkv4Config):
    """The tokenizer to save beside a converted model, resolved before anything is written."""
    if spec == "none":
        return None
    from rwkv_ft.tokenizers import load_tokenizer

    if spec == "auto":
        if src.is_dir() and any((src / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            spec = str(src)
        else:
            spec = "world" if config.vocab_size == 65536 else "neox"
    try:
        return load_tokenizer(spec)
    except Exception as exc:
        raise ValueError(
            f"--tokenizer {spec}: {exc}\n(pass --tokenizer world, --tokenizer PATH to a tokenizer.json, "
            "or --tokenizer none to convert the weights alone)"
        ) from exc


def convert_checkpoint(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str = "auto",
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a BlinkDL `.pth` or a transformers RWKV directory into a directory of ours.

    The result loads with `AutoModelForCausalLM.from_pretrained(out_dir)` and, unless
    `tokenizer="none"`, `AutoTokenizer.from_pretrained(out_dir)` (after `import rwkv_ft`).
    """
    src = _require_path(src)
    _prepare_output(Path(out_dir), overwrite)  # refuse before the (slow) load, not after it
    config, state_dict, _ = load_any_checkpoint(src)
    tok = _resolve_tokenizer(tokenizer, src, config)
    model = build_model(config, cast_state_dict(state_dict, DTYPES[dtype] if dtype else None))

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)

    return write_atomically(out_dir, write, overwrite=overwrite)


def export_model(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model as a BlinkDL `.pth` (`format="pth"`) or a transformers RWKV directory."""
    config, state_dict, _ = load_any_checkpoint(model_dir)
    state_dict = cast_state_dict(state_dict, DTYPES[dtype] if dtype else None)
    if format == "pth":
        return save_pth(state_dict, out, overwrite=overwrite)
    if format == "transformers":
        return save_transformers(config, state_dict, out, overwrite=overwrite)
    raise ValueError(f"--format must be 'pth' or 'transformers', got {format!r}")
