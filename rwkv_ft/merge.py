"""Fold an adapter into its base model and write the result as a full model.

`merge_adapter(base, adapter, out)` (and `rwkv-ft merge`) reads BASE at full precision with
`load_any_checkpoint` (our directory, a BlinkDL .pth or a foreign RWKV directory), folds a peft
LoRA/DoRA/rsLoRA adapter in with `merge_and_unload` in fp32, casts to the requested dtype and
writes our directory ("hf"), a BlinkDL `.pth`, or another format of the base's version
("transformers" for RWKV-4), atomically, with the tokenizer (and its chat template) and a model card.

An adapter trained on an 8-/4-bit base (recorded in its `rwkv_ft_adapter.json`) is folded into
BASE's original weights, never into dequantized ones: the merged model is then slightly different
from what training saw (the quantization error is gone), as with any QLoRA merge.

A learned initial state (state tuning) is not a weight: none of the formats has a place for it. The
merge copies `state_tuning.safetensors` beside the output (inside an output directory, or as
`<out>.state_tuning.safetensors` next to a .pth) and, for versions with a BlinkDL state-file
convention (RWKV-7: `blocks.N.att.time_state`), also writes `<out>.state.pth`, the file RWKV-Runner
and RWKV-PEFT load. `load_state_tuning(model, path)` attaches it to our model. Without it the
merged model starts from an empty history.
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
from rwkv_ft.convert import Checkpoint, build_model, cast_state_dict, copy_tokenizer, load_any_checkpoint, save_pth
from rwkv_ft.io import DTYPES, prepare_output, write_atomically


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


def merged_checkpoint(base: str | os.PathLike, adapter: str | os.PathLike) -> tuple[Checkpoint, torch.dtype, list[str]]:
    """(the merged fp32 checkpoint, BASE's weight dtype, merged adapter kinds).

    The peft adapter (if any) is folded into BASE's full-precision weights in fp32.
    """
    adapter = Path(adapter)
    has_peft, _ = _adapter_parts(adapter)
    ckpt = load_any_checkpoint(base)
    base_dtype = ckpt.state_dict["rwkv.emb.weight"].dtype
    fp32 = cast_state_dict(ckpt.state_dict, torch.float32, ckpt.arch)
    if not has_peft:
        return Checkpoint(ckpt.arch, ckpt.config, fp32, ckpt.kind), base_dtype, []

    adapter_config = read_adapter_config(adapter)
    check_mergeable(adapter_config, str(adapter / "adapter_config.json"))
    from peft import PeftModel

    model = build_model(ckpt.config, fp32, ckpt.arch)
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
    return Checkpoint(ckpt.arch, ckpt.config, dict(merged.state_dict()), ckpt.kind), base_dtype, [kind]


def merge_formats(ckpt: Checkpoint) -> list[str]:
    return ["hf", "pth"] + [f.name for f in ckpt.arch.foreign_formats if f.save is not None]


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
        format: "hf" (our directory), "pth" (BlinkDL), or a foreign format of BASE's version.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    base, adapter, out = Path(base), Path(adapter), Path(out)
    _, has_state = _adapter_parts(adapter)
    prepare_output(out, overwrite)
    info = read_adapter_info(adapter)
    if has_state:
        read_state_tuning(adapter)  # validate before the (slow) merge

    ckpt, base_dtype, merged = merged_checkpoint(base, adapter)
    if format not in merge_formats(ckpt):
        raise ValueError(
            f"--format must be one of {', '.join(merge_formats(ckpt))} for {ckpt.arch.name}, got {format!r}"
        )
    target = DTYPES[dtype] if dtype else base_dtype
    state_dict = cast_state_dict(ckpt.state_dict, target, ckpt.arch)
    report = MergeReport(out=out, format=format, dtype=target, merged=merged)
    report.quantized_base = trained_on_quantized_base(info)
    if report.quantized_base:
        report.notes.append(
            f"the adapter was trained on a {report.quantized_base} base; it was folded into the original "
            f"full-precision weights of {base}, not into dequantized ones"
        )

    state_src = adapter / STATE_TUNING_FILE if has_state else None
    if format == "pth":
        report.out = save_pth(state_dict, out, arch=ckpt.arch, config=ckpt.config, overwrite=overwrite)
        if state_src is not None:
            report.state_file = report.out.with_name(report.out.stem + ".state_tuning.safetensors")
            write_atomically(
                report.state_file, lambda tmp: shutil.copyfile(state_src, tmp), overwrite=True, is_dir=False
            )
    else:

        def write(tmp: Path) -> None:
            if format == "hf":
                build_model(ckpt.config, state_dict, ckpt.arch).save_pretrained(tmp)
            else:
                next(f for f in ckpt.arch.foreign_formats if f.name == format).save(ckpt.config, state_dict, tmp)
            copy_tokenizer(adapter, tmp) or copy_tokenizer(base, tmp)
            if state_src is not None:
                shutil.copyfile(state_src, tmp / STATE_TUNING_FILE)
            _write_card(tmp, adapter, base, merged, format)

        write_atomically(out, write, overwrite=overwrite)
        if state_src is not None:
            report.state_file = out / STATE_TUNING_FILE
    if state_src is not None:
        merged.append("state tuning")
        report.notes.append(_state_note(report, ckpt, state_src))
    return report


def _state_note(report: MergeReport, ckpt: Checkpoint, state_src: Path) -> str:
    """Where the learned state went; writes the BlinkDL state file when the version has one."""
    from rwkv_ft.adapters.state_tuning import load_initial_state

    state_cls = ckpt.arch.base_model_class.initial_state_class
    blink = state_cls.blinkdl_state_dict(load_initial_state(state_src))
    note = (
        f"a {report.format} model cannot hold the learned initial state; it was written to {report.state_file}. "
        "Attach it with rwkv_ft.adapters.load_state_tuning(model, PATH)"
    )
    if blink is not None:
        stem = report.out.with_suffix("") if report.out.suffix == ".pth" else report.out
        state_pth = stem.with_name(stem.name + ".state.pth")
        write_atomically(state_pth, lambda tmp: torch.save(blink, tmp), overwrite=True, is_dir=False)
        note += f"; {state_pth} holds it as a BlinkDL state file (blocks.N.att.time_state) for RWKV-Runner"
    return note + "; without it the model starts from an empty state"


def _write_card(out: Path, adapter: Path, base: Path, merged: list[str], format: str) -> None:
    """The merged folder's README.md: the same model card `rwkv-ft push` writes, saying what was merged."""
    from rwkv_ft.hub import TRAINING_SUMMARY_FILE, write_model_card

    if (adapter / TRAINING_SUMMARY_FILE).exists():
        shutil.copyfile(adapter / TRAINING_SUMMARY_FILE, out / TRAINING_SUMMARY_FILE)
    write_model_card(out, merged_from=(base, adapter, merged))
