"""Registering our classes with transformers' Auto classes (each version's modules call these as
their last step, so a class is registered the moment it exists, however it got imported)."""

from __future__ import annotations

_CONFIG_CLASSES: list[type] = []


def register_config(config_class: type) -> None:
    from transformers import AutoConfig

    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    if config_class not in _CONFIG_CLASSES:
        _CONFIG_CLASSES.append(config_class)
    import sys

    if "transformers.models.auto.tokenization_auto" in sys.modules:
        register_tokenizer()


def register_models(config_class: type, base_model_class: type, causal_lm_class: type) -> None:
    from transformers import AutoModel, AutoModelForCausalLM

    AutoModel.register(config_class, base_model_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, causal_lm_class, exist_ok=True)


def register_tokenizer() -> None:
    """AutoTokenizer maps each of our configs to the World tokenizer (directories name their class)."""
    from transformers import AutoTokenizer

    from rwkv_ft.tokenizers import RwkvWorldTokenizer

    for config_class in _CONFIG_CLASSES:
        AutoTokenizer.register(config_class, tokenizer_class=RwkvWorldTokenizer, exist_ok=True)
