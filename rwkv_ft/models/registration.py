"""Registering our classes with transformers' Auto classes (each version's modules call these as
their last step, so a class is registered the moment it exists, however it got imported)."""

from __future__ import annotations

import importlib
import sys

_CONFIG_CLASSES: list[type] = []


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def import_all_versions(part: str, needs: str | None = None) -> None:
    """Import every version's `configuration_*` or `modeling_*` module (each registers its classes
    as its last step). Deferred while transformers' `needs` module is itself half-imported (its
    Auto modules can be imported in the middle of that): our module being imported then calls this
    again when it finishes, with transformers complete. A module already being imported is skipped:
    it registers when it finishes."""
    if needs is not None and (needs not in sys.modules or _initializing(needs)):
        return
    from rwkv_ft.models import VERSION_PACKAGES

    for package in VERSION_PACKAGES:
        name = f"{package}.{part}_{package.rsplit('.', 1)[-1]}"
        if not _initializing(name):
            importlib.import_module(name)


def register_config(config_class: type) -> None:
    from transformers import AutoConfig

    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    if config_class not in _CONFIG_CLASSES:
        _CONFIG_CLASSES.append(config_class)
    if "transformers.models.auto.tokenization_auto" in sys.modules:
        register_tokenizer()
    import_all_versions("configuration")


def register_models(config_class: type, base_model_class: type, causal_lm_class: type) -> None:
    from transformers import AutoModel, AutoModelForCausalLM

    AutoModel.register(config_class, base_model_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, causal_lm_class, exist_ok=True)
    import_all_versions("modeling")


def register_tokenizer() -> None:
    """AutoTokenizer maps each of our configs to the World tokenizer (directories name their class)."""
    from transformers import AutoTokenizer

    from rwkv_ft.tokenizers import RwkvWorldTokenizer

    for config_class in _CONFIG_CLASSES:
        AutoTokenizer.register(config_class, tokenizer_class=RwkvWorldTokenizer, exist_ok=True)
