"""Fold an adapter into its base model and write the result as a full model.

`merge_adapter(base, adapter, out)` (and `rwkv-ft merge`) reads BASE at full precision with
`load_any_checkpoint` (our directory, a BlinkDL .pth or a transformers RWKV directory), folds a
peft LoRA/DoRA/rsLoRA adapter in with `merge_and_unload` in fp32, casts to the requested dtype and
writes our directory ("hf"), a BlinkDL `.pth` or a transformers RWKV directory, atomically.

An adapter trained on an 8-/4-bit base (recorded in its `rwkv_ft_adapter.json`) is folded into
BASE's original weights, never into dequantized ones: the merged model is then slightly different
from what training saw (the quantization error is gone), as with any QLoRA merge.

A learned initial state (state tuning) is not a weight: none of the three formats has a place for
it. The merge copies `state_tuning.safetensors` beside the output (inside an output directory, or
as `<out>.state_tuning.safetensors` next to a .pth) and says so; `load_state_tuning(model, path)`
attaches it to our model, and `blinkdl_state(load_initial_state(path))` is the `state` argument for
BlinkDL's `rwkv` package. Without it the merged model starts from an empty history.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rwkv_ft.adapters.info import read_adapter_info, trained_on_quantized_base
from rwkv_ft.adapters.lora import check_mergeable, read_adapter_config
from rwkv_ft.adapters.state_tuning import STATE_TUNING_FILE, read_state_tuning
from rwkv_ft.convert import (
    DTYPES,
    build_model,
    cast_state_dict,
    load_any_checkpoint,
    save_pth,
    save_transformers,
    write_atomically,
)

MERGE_FORMATS = ("hf", "pth", "transformers")


class MergeError(ValueError):
    """An adapter that cannot be merged into this base, with the reason and what to do."""


@dataclass
class MergeReport:
    """What `merge_adapter` wrote, and the notes the CLI prints."""

    out: Path
    format: str
    dtype: torch.dtype
    merged: list[str] = field(default_factory=list)
    quantized_base: str | None = None
    state_file: Path | None = None
    notes: list[str] = field(default_factory=list)


def _adapter_parts(adapter: Path) -> tuple[bool, bool]:
    if not adapter.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {adapter}")
    has_peft = (adapter / "adapter_config.json").exists()
    has_state = (adapter / STATE_TUNING_FILE).exists()
    if not (has_peft or has_state):
        raise MergeError(
            f"{adapter}: neither a peft adapter (adapter_config.json) nor a state-tuning file ({STATE_TUNING_FILE})"
        )
    return has_peft, has_state


def merged_state_dict(
    base: str | os.PathLike, adapter: str | os.PathLike
) -> tuple[object, dict[str, torch.Tensor], torch.dtype, list[str]]:
    """(config, merged fp32 state dict, BASE's weight dtype, merged adapter kinds).

    The peft adapter (if any) is folded into BASE's full-precision weights in fp32.
    """
    adapter = Path(adapter)
    has_peft, _ = _adapter_parts(adapter)
    config, state_dict, _ = load_any_checkpoint(base)
    base_dtype = state_dict["rwkv.emb.weight"].dtype
    if not has_peft:
        return config, cast_state_dict(state_dict, torch.float32), base_dtype, []

    adapter_config = read_adapter_config(adapter)
    check_mergeable(adapter_config, str(adapter / "adapter_config.json"))
    from peft import PeftModel

    model = build_model(config, cast_state_dict(state_dict, torch.float32))
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise MergeError(
            f"{adapter}: the adapter does not fit the base {base} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "merge it into the model it was trained on"
        ) from exc
    kind = str(adapter_config.get("peft_type", "LORA")).lower()
    if adapter_config.get("use_dora"):
        kind += " (DoRA)"
    try:
        merged = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge found NaN/inf in the merged weights
        raise MergeError(f"{adapter}: merging produced non-finite weights ({exc})") from exc
    return config, dict(merged.state_dict()), base_dtype, [kind]


def merge_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    format: str = "hf",
    overwrite: bool = False,
) -> MergeReport:
    """Write BASE with ADAPTER folded in to `out` (a directory, or a .pth file for format="pth").

    Args:
        dtype: "fp32", "bf16" or "fp16" for the written weights (default: BASE's dtype).
        format: "hf" (our directory), "pth" (BlinkDL) or "transformers" (RwkvForCausalLM directory).
    """
    if format not in MERGE_FORMATS:
        raise ValueError(f"--format must be one of {', '.join(MERGE_FORMATS)}, got {format!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    base, adapter, out = Path(base), Path(adapter), Path(out)
    _, has_state = _adapter_parts(adapter)
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    info = read_adapter_info(adapter)
    if has_state:
        read_state_tuning(adapter)  # validate before the (slow) merge

    config, state_dict, base_dtype, merged = merged_state_dict(base, adapter)
    target = DTYPES[dtype] if dtype else base_dtype
    state_dict = cast_state_dict(state_dict, target)
    report = MergeReport(out=out, format=format, dtype=target, merged=merged)
    report.quantized_base = trained_on_quantized_base(info)
    if report.quantized_base:
        report.notes.append(
            f"the adapter was trained on a {report.quantized_base} base; it was folded into the original "
            f"full-precision weights of {base}, not into dequantized ones"
        )

    state_src = adapter / STATE_TUNING_FILE if has_state else None
    if format == "pth":
        if state_src is not None:
            report.state_file = out.with_name(out.stem + ".state_tuning.safetensors")
            write_atomically(
                report.state_file, lambda tmp: shutil.copyfile(state_src, tmp), overwrite=True, is_dir=False
            )
        save_pth(state_dict, out, overwrite=overwrite)
    else:

        def write(tmp: Path) -> None:
            if format == "hf":
                build_model(config, state_dict).save_pretrained(tmp)
                _copy_tokenizer(base, tmp)
            else:
                save_transformers(config, state_dict, tmp, overwrite=True)
            if state_src is not None:
                shutil.copyfile(state_src, tmp / STATE_TUNING_FILE)

        write_atomically(out, write, overwrite=overwrite)
        if state_src is not None:
            report.state_file = out / STATE_TUNING_FILE
    if state_src is not None:
        merged.append("state tuning")
        report.notes.append(
            f"a {format} model cannot hold the learned initial state; it was written to {report.state_file}. "
            "Attach it with rwkv_ft.adapters.load_state_tuning(model, PATH) (or pass "
            "rwkv_ft.adapters.blinkdl_state(load_initial_state(PATH)) as the rwkv package's state); "
            "without it the model starts from an empty state"
        )
    return report


def _copy_tokenizer(base: Path, out: Path) -> None:
    """Save BASE's tokenizer (whatever files it is made of) into an "hf" output, so AutoTokenizer loads it."""
    from rwkv_ft.tokenizers import load_tokenizer

    if base.is_dir() and any((base / name).exists() for name in ("tokenizer_config.json", "tokenizer.json")):
        load_tokenizer(str(base)).save_pretrained(out)
