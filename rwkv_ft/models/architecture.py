"""What each RWKV version tells the rest of rwkv_ft about itself, and the registry of versions.

Everything outside `models/rwkvN/` (conversion, training, merging, the Hub card, adapters) asks an
`Architecture` instead of naming a version: which config and model classes it has, how its
BlinkDL `.pth` keys map onto ours, which other formats it reads or writes, which tensors stay
fp32, what LoRA targets by default, which tokenizer its vocabulary means. Adding a version is one
`models/rwkvN/` folder whose `conversion_rwkvN.py` defines an `Architecture` and registers it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class ForeignFormat:
    """Another library's model directory for this version (transformers' `RwkvForCausalLM`, fla's ...).

    `model_type` is the one its config.json names; `load(directory, config_json)` returns
    (our config, our-named state dict); `save(config, state_dict, tokenizer_dir, out)` writes one
    (None: read-only).
    """

    name: str
    model_type: str
    load: Callable[[Path, dict[str, Any]], tuple[Any, dict[str, torch.Tensor]]]
    save: Callable[..., Path] | None = None


@dataclass(frozen=True)
class Architecture:
    """One RWKV version as the version-free code sees it."""

    name: str  # "RWKV-4"
    model_type: str  # our config's model_type
    config_class: type
    model_class: type  # the causal LM
    base_model_class: type  # the blocks without the head
    block_class_name: str  # what FSDP wraps and device maps keep whole
    fp32_suffixes: tuple[str, ...]  # parameters kept fp32 in any dtype
    lora_target_modules: tuple[str, ...]  # peft default targets (module-name suffixes)
    # BlinkDL .pth <-> ours
    matches_blinkdl: Callable[[Iterable[str]], bool]
    config_from_blinkdl: Callable[[Mapping[str, torch.Tensor], str], Any]
    blinkdl_to_ours: Callable[[Mapping[str, torch.Tensor], Any], dict[str, torch.Tensor]]
    ours_to_blinkdl: Callable[[Mapping[str, torch.Tensor], Any], dict[str, torch.Tensor]]
    blinkdl_key: Callable[[str], str]  # our key -> its BlinkDL name, for error messages
    # The tokenizer a vocabulary size means for this version ("world", "neox") or None.
    tokenizer_for_vocab: Callable[[int], str | None]
    foreign_formats: tuple[ForeignFormat, ...] = ()
    # Keys a checkpoint may carry that this version ignores (e.g. RWKV-7 layer-0 v0/v1/v2).
    ignorable_keys: Callable[[str], bool] = field(default=lambda key: False)

    def keeps_fp32(self, key: str) -> bool:
        return key.endswith(self.fp32_suffixes)

    def describe(self, config) -> str:
        return f"{self.name}, L={config.num_hidden_layers}, C={config.hidden_size}, V={config.vocab_size}"


_ARCHITECTURES: list[Architecture] = []

# Checkpoint key signatures of RWKV relatives rwkv_ft does not load (yet), so that such a checkpoint
# is named instead of half-loaded. Variants of a supported version are checked before the supported
# versions, other versions after them. Remove a line when its version gets an Architecture.
UNSUPPORTED_VARIANTS: list[tuple[str, str]] = [
    (r"\.s_emb\.|\.s_emb$|\.(s0|s1|s2)$", "RWKV-7 DeepEmbed (ffn.s_emb, s0/s1/s2)"),
    (r"\.dea\.|\.(qq|kk_dea|vv_dea)\.", "RWKV-7 with DEA attention"),
]
OTHER_VERSIONS: list[tuple[str, str]] = [
    (r"time_maa", "RWKV-6"),
    (r"att\.(time_faaaa|gate\.weight|ln_x\.weight)$", "RWKV-5"),
]


def register_architecture(arch: Architecture) -> Architecture:
    if any(a.model_type == arch.model_type for a in _ARCHITECTURES):
        return arch
    _ARCHITECTURES.append(arch)
    return arch


def architectures() -> list[Architecture]:
    """Every registered version (importing each version's conversion module registers it)."""
    import importlib

    from rwkv_ft.models import VERSION_PACKAGES

    for package in VERSION_PACKAGES:
        version = package.rsplit(".", 1)[-1]
        importlib.import_module(f"{package}.conversion_{version}")
    return list(_ARCHITECTURES)


def architecture_for_model_type(model_type: str | None) -> Architecture | None:
    return next((a for a in architectures() if a.model_type == model_type), None)


def architecture_of(model: torch.nn.Module) -> Architecture:
    """The architecture of one of our models (or of a peft wrapper around one)."""
    archs = architectures()
    for module in model.modules():
        for arch in archs:
            if isinstance(module, arch.base_model_class):
                return arch
    raise TypeError(f"not an rwkv_ft RWKV model: {type(model).__name__}")


def _first_match(table: list[tuple[str, str]], keys: list[str]) -> str | None:
    return next((name for pattern, name in table if any(re.search(pattern, k) for k in keys)), None)


def detect_blinkdl(keys: Iterable[str]) -> Architecture | str:
    """The architecture of a BlinkDL state dict, or the name of the unsupported relative it is."""
    keys = list(keys)
    variant = _first_match(UNSUPPORTED_VARIANTS, keys)
    if variant:
        return variant
    for arch in architectures():
        if arch.matches_blinkdl(keys):
            return arch
    return _first_match(OTHER_VERSIONS, keys) or "not an RWKV checkpoint (no RWKV attention parameters found)"
