"""rwkv_ft: fine-tune RWKV language models the Hugging Face way.

Importing the package registers our models with transformers' Auto classes (and our default LoRA
targets with peft), so that `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)` work on directories we write, without `trust_remote_code`.
The registrations run as soon as the transformers / peft modules they extend are imported (see
`rwkv_ft._post_import`), so `import rwkv_ft` itself imports neither: the command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from rwkv_ft._post_import import when_imported

__version__ = "0.2.0"

# Public names, imported on first use.
_LAZY = {
    "Rwkv4Config": "rwkv_ft.models.rwkv4",
    "Rwkv4ForCausalLM": "rwkv_ft.models.rwkv4",
    "Rwkv4Model": "rwkv_ft.models.rwkv4",
    "RwkvWorldTokenizer": "rwkv_ft.tokenizers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rwkv_ft' has no attribute {name!r}")


def _version_packages():
    from rwkv_ft.models import VERSION_PACKAGES

    return [importlib.import_module(name) for name in VERSION_PACKAGES]


def _register_configs(auto) -> None:
    for package in _version_packages():
        auto.AutoConfig.register(package.CONFIG_CLASS.model_type, package.CONFIG_CLASS, exist_ok=True)


def _register_models(auto) -> None:
    for package in _version_packages():
        auto.AutoModel.register(package.CONFIG_CLASS, package.base_model_class(), exist_ok=True)
        auto.AutoModelForCausalLM.register(package.CONFIG_CLASS, package.causal_lm_class(), exist_ok=True)


def _register_tokenizers(auto) -> None:
    # A directory's tokenizer_config.json names its class; World-vocabulary models name ours.
    from rwkv_ft.tokenizers import RwkvWorldTokenizer

    for package in _version_packages():
        auto.AutoTokenizer.register(package.CONFIG_CLASS, tokenizer_class=RwkvWorldTokenizer, exist_ok=True)


def _register_peft_defaults(_constants) -> None:
    from rwkv_ft.adapters.lora import register_peft_defaults

    register_peft_defaults()


when_imported("transformers.models.auto.configuration_auto", _register_configs)
when_imported("transformers.models.auto.modeling_auto", _register_models)
when_imported("transformers.models.auto.tokenization_auto", _register_tokenizers)
when_imported("peft.utils.constants", _register_peft_defaults)

__all__ = [*_LAZY, "__version__"]
