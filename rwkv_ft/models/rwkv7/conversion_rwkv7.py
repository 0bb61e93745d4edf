"""RWKV-7 checkpoint formats: BlinkDL x070 `.pth` (World, G-series, Pile) and fla's
`RWKV7ForCausalLM` directories (`fla-hub/rwkv7-*`).

Our names and shapes are BlinkDL's with an `rwkv.` prefix (`head.weight` without), so the `.pth`
direction is a rename. Layer 0's `v0/v1/v2` are never used by the reference (layer 0's value is the
residual source); a checkpoint may carry them, and they are dropped. fla names the same tensors
differently (`model.layers.N.attn.r_proj`, the six lerps stacked as `attn.x_x`, the low-rank maps
as `{w,a,v,g}_lora.lora.{0,2}` with the offsets as biases and the matrices transposed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from rwkv_ft.io import CheckpointError
from rwkv_ft.models.architecture import Architecture, ForeignFormat, register_architecture

from .configuration_rwkv7 import Rwkv7Config
from .modeling_rwkv7 import TIME_MIX_LERPS, Rwkv7ForCausalLM, Rwkv7Model

FP32_PARAMS = ("att.w0",)
_LAYER0_UNUSED = re.compile(r"(^|\.)blocks\.0\.att\.v[012]$")


def blinkdl_key_to_ours(key: str) -> str:
    return key if key == "head.weight" else "rwkv." + key


def ours_key_to_blinkdl(key: str) -> str:
    return key if key == "head.weight" else key.removeprefix("rwkv.")


def matches_blinkdl(keys: Iterable[str]) -> bool:
    return any(re.search(r"att\.(x_r|w0|k_k|r_k)$", k) for k in keys)


def _layers(keys: Iterable[str], pattern: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return 1 + max(found) if found else 0


def config_from_blinkdl(state_dict: Mapping[str, torch.Tensor], source: str) -> Rwkv7Config:
    """The model's shape read off the tensors: widths from emb/r_k/ffn.key, low-rank sizes from w1/a1/v1/g1."""
    needed = ["emb.weight", "blocks.0.att.r_k", "blocks.0.ffn.key.weight", "blocks.0.att.w1", "blocks.0.att.a1"]
    needed += ["blocks.0.att.g1"]
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise CheckpointError(f"{source}: missing keys {', '.join(missing)}, needed to read the model's shape")
    vocab, width = state_dict["emb.weight"].shape
    heads, head_size = state_dict["blocks.0.att.r_k"].reshape(-1, state_dict["blocks.0.att.r_k"].shape[-1]).shape
    layers = _layers(state_dict, r"blocks\.(\d+)\.")
    v1 = next((state_dict[f"blocks.{i}.att.v1"] for i in range(1, layers) if f"blocks.{i}.att.v1" in state_dict), None)
    return Rwkv7Config(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        head_size=head_size,
        intermediate_size=state_dict["blocks.0.ffn.key.weight"].shape[0],
        decay_low_rank=state_dict["blocks.0.att.w1"].shape[1],
        a_low_rank=state_dict["blocks.0.att.a1"].shape[1],
        v_low_rank=v1.shape[1] if v1 is not None else None,
        gate_low_rank=state_dict["blocks.0.att.g1"].shape[1],
    )


def blinkdl_to_ours(state_dict: Mapping[str, torch.Tensor], config: Rwkv7Config) -> dict[str, torch.Tensor]:
    return {blinkdl_key_to_ours(k): v for k, v in state_dict.items() if not _LAYER0_UNUSED.search(k)}


def ours_to_blinkdl(state_dict: Mapping[str, torch.Tensor], config: Rwkv7Config | None) -> dict[str, torch.Tensor]:
    return {ours_key_to_blinkdl(k): v for k, v in state_dict.items()}


def tokenizer_for_vocab(vocab_size: int) -> str | None:
    """World and G-series models have a 65,536-row embedding; Pile models GPT-NeoX's, padded to 50,304."""
    return {65536: "world", 50304: "neox", 50277: "neox"}.get(vocab_size)


def ignorable_key(key: str) -> bool:
    return bool(_LAYER0_UNUSED.search(key))


# --------------------------------------------------------------------------------------------------
# fla's RWKV7ForCausalLM directories

_FLA_TOP = {"model.embeddings.weight": "emb.weight", "model.norm.weight": "ln_out.weight"}
_FLA_TOP |= {"model.norm.bias": "ln_out.bias", "lm_head.weight": "head.weight"}
_FLA_MODULES = {"attn": "att", "ffn": "ffn", "pre_norm": "ln0", "attn_norm": "ln1", "ffn_norm": "ln2"}
_FLA_PROJ = {"r_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output", "g_norm": "ln_x"}
_FLA_LORA = {"lora.0.weight": "1", "lora.2.weight": "2", "lora.2.bias": "0"}


def fla_to_blinkdl(state_dict: Mapping[str, torch.Tensor], config: Rwkv7Config) -> dict[str, torch.Tensor]:
    """fla's RWKV7ForCausalLM tensors under BlinkDL's names and shapes."""
    C = config.hidden_size
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in _FLA_TOP:
            out[_FLA_TOP[key]] = tensor
            continue
        m = re.match(r"model\.layers\.(\d+)\.(\w+)\.(.+)$", key)
        if not m or m.group(2) not in _FLA_MODULES:
            out[key] = tensor  # reported as unexpected by the key check
            continue
        layer, module, rest = m.group(1), _FLA_MODULES[m.group(2)], m.group(3)
        prefix = f"blocks.{layer}.{module}."
        lora = re.match(r"([wavg])_lora\.(lora\.\d\.(?:weight|bias))$", rest)
        if lora:
            name = lora.group(1) + _FLA_LORA[lora.group(2)]
            out[prefix + name] = tensor.reshape(1, 1, C) if name.endswith("0") else tensor.t()
        elif rest == "x_x":  # (6, C), in the order r, w, k, v, a, g
            for i, name in enumerate(TIME_MIX_LERPS):
                out[prefix + name] = tensor[i].reshape(1, 1, C)
        elif rest in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "k_k", "k_a") or (module == "ffn" and rest == "x_k"):
            out[prefix + rest] = tensor.reshape(1, 1, C)
        elif rest == "r_k":
            out[prefix + rest] = tensor.reshape(config.num_heads, config.head_size)
        else:
            proj = rest.split(".", 1)
            out[prefix + ".".join([_FLA_PROJ.get(proj[0], proj[0]), *proj[1:]])] = tensor
    return out


def load_fla_dir(directory: Path, hf: dict[str, Any]) -> tuple[Rwkv7Config, dict[str, torch.Tensor]]:
    """Config and our-named state dict of an fla `RWKV7ForCausalLM` directory (shapes from the tensors)."""
    from rwkv_ft.convert import read_hf_weights

    raw = read_hf_weights(directory)
    if "lm_head.weight" not in raw and hf.get("tie_word_embeddings") and "model.embeddings.weight" in raw:
        raw["lm_head.weight"] = raw["model.embeddings.weight"]
    width = raw["model.embeddings.weight"].shape[1] if "model.embeddings.weight" in raw else None
    head_size = hf.get("head_dim") or hf.get("head_size") or 64
    r_k = raw.get("model.layers.0.attn.r_k")
    if r_k is not None and r_k.dim() == 2:
        head_size = r_k.shape[1]
    shape_source = {
        "emb.weight": raw.get("model.embeddings.weight"),
        "blocks.0.att.r_k": torch.empty(width // head_size, head_size) if width else None,
        "blocks.0.ffn.key.weight": raw.get("model.layers.0.ffn.key.weight"),
    }
    for letter in "wag":
        low = raw.get(f"model.layers.0.attn.{letter}_lora.lora.0.weight")  # (D, C)
        shape_source[f"blocks.0.att.{letter}1"] = None if low is None else low.t()
    v_low = next(
        (raw[k] for k in sorted(raw) if re.match(r"model\.layers\.[1-9]\d*\.attn\.v_lora\.lora\.0\.weight$", k)), None
    )
    if v_low is not None:
        shape_source["blocks.1.att.v1"] = v_low.t()
    shape_source = {k: v for k, v in shape_source.items() if v is not None}
    config = config_from_blinkdl(shape_source, str(directory))
    config.layer_norm_epsilon = hf.get("norm_eps", config.layer_norm_epsilon)
    blink = fla_to_blinkdl(raw, config)
    return config, blinkdl_to_ours(blink, config)


FLA_FORMAT = ForeignFormat(name="fla", model_type="rwkv7", load=load_fla_dir)

RWKV7 = register_architecture(
    Architecture(
        name="RWKV-7",
        model_type=Rwkv7Config.model_type,
        config_class=Rwkv7Config,
        model_class=Rwkv7ForCausalLM,
        base_model_class=Rwkv7Model,
        block_class_name="Rwkv7Block",
        fp32_suffixes=FP32_PARAMS,
        lora_target_modules=("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"),
        matches_blinkdl=matches_blinkdl,
        config_from_blinkdl=config_from_blinkdl,
        blinkdl_to_ours=blinkdl_to_ours,
        ours_to_blinkdl=ours_to_blinkdl,
        blinkdl_key=ours_key_to_blinkdl,
        tokenizer_for_vocab=tokenizer_for_vocab,
        foreign_formats=(FLA_FORMAT,),
        ignorable_keys=ignorable_key,
    )
)
