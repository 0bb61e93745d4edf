"""RWKV-4 checkpoint formats: BlinkDL `.pth` and transformers' `RwkvForCausalLM` directories.

Our state dict is BlinkDL's with an `rwkv.` prefix on everything but `head.weight`, so the BlinkDL
direction is a rename; the transformers direction renames modules (`emb` <-> `embeddings`,
`ln0` <-> `pre_ln`, `att` <-> `attention`, `ffn` <-> `feed_forward`, `time_mix_k` <-> `time_mix_key`, ...).
Values are copied bit for bit; only `time_decay` and `time_first` are kept in fp32.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from rwkv_ft.io import CheckpointError
from rwkv_ft.models.architecture import Architecture, ForeignFormat, register_architecture
from rwkv_ft.models.config_checks import positive_int

from .configuration_rwkv4 import Rwkv4Config
from .modeling_rwkv4 import Rwkv4ForCausalLM, Rwkv4Model

FP32_PARAMS = ("time_decay", "time_first")


def blinkdl_key_to_ours(key: str) -> str:
    return key if key == "head.weight" else "rwkv." + key


def ours_key_to_blinkdl(key: str) -> str:
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


def matches_blinkdl(keys: Iterable[str]) -> bool:
    return any(re.search(r"att\.time_first$", k) for k in keys)


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


def blinkdl_to_ours(state_dict: Mapping[str, torch.Tensor], config: Rwkv4Config) -> dict[str, torch.Tensor]:
    return {blinkdl_key_to_ours(k): v for k, v in state_dict.items()}


def ours_to_blinkdl(state_dict: Mapping[str, torch.Tensor], config: Rwkv4Config) -> dict[str, torch.Tensor]:
    return {ours_key_to_blinkdl(k): v for k, v in state_dict.items()}


def tokenizer_for_vocab(vocab_size: int) -> str | None:
    """World models have a 65,536-row embedding; Pile and Raven models GPT-NeoX's 50,277."""
    return {65536: "world", 50277: "neox"}.get(vocab_size)


# --------------------------------------------------------------------------------------------------
# transformers' RwkvForCausalLM directories


def load_transformers_dir(directory: Path, hf: dict[str, Any]) -> tuple[Rwkv4Config, dict[str, torch.Tensor]]:
    """Config and our-named state dict of a transformers `RwkvForCausalLM` directory."""
    from rwkv_ft.convert import read_hf_weights

    config_file = str(directory / "config.json")
    width = positive_int(hf, "hidden_size", config_file)
    if hf.get("attention_hidden_size", width) not in (None, width):
        raise CheckpointError(f"{config_file}: attention_hidden_size != hidden_size is not an RWKV-4 release shape")
    intermediate = hf.get("intermediate_size")
    config = Rwkv4Config(
        vocab_size=positive_int(hf, "vocab_size", config_file),
        hidden_size=width,
        num_hidden_layers=positive_int(hf, "num_hidden_layers", config_file),
        intermediate_size=4 * width if intermediate is None else positive_int(hf, "intermediate_size", config_file),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        bos_token_id=hf.get("bos_token_id", 0),
        eos_token_id=hf.get("eos_token_id", 0),
        pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
    )
    raw = read_hf_weights(directory)
    if "head.weight" not in raw and hf.get("tie_word_embeddings"):
        raw["head.weight"] = raw["rwkv.embeddings.weight"]
    return config, {transformers_to_ours(k): v for k, v in raw.items()}


def save_transformers_dir(config: Rwkv4Config, state_dict: Mapping[str, torch.Tensor], out: Path) -> Path:
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
    model.save_pretrained(out)
    return out


TRANSFORMERS_FORMAT = ForeignFormat(
    name="transformers", model_type="rwkv", load=load_transformers_dir, save=save_transformers_dir
)

RWKV4 = register_architecture(
    Architecture(
        name="RWKV-4",
        model_type=Rwkv4Config.model_type,
        config_class=Rwkv4Config,
        model_class=Rwkv4ForCausalLM,
        base_model_class=Rwkv4Model,
        block_class_name="Rwkv4Block",
        fp32_suffixes=FP32_PARAMS,
        lora_target_modules=("key", "value", "receptance", "output"),
        matches_blinkdl=matches_blinkdl,
        config_from_blinkdl=config_from_blinkdl,
        blinkdl_to_ours=blinkdl_to_ours,
        ours_to_blinkdl=ours_to_blinkdl,
        blinkdl_key=ours_key_to_blinkdl,
        tokenizer_for_vocab=tokenizer_for_vocab,
        foreign_formats=(TRANSFORMERS_FORMAT,),
    )
)
