"""LoRA-family adapters through peft: default targets and checks peft does not make.

peft chooses the modules to adapt from `config.model_type` when a `LoraConfig` names none; each of
our model types is registered here with its architecture's `lora_target_modules` (the large Linear
layers of every block), so `get_peft_model(model, LoraConfig())` does the right thing. Small
vectors, layer norms, embeddings and the head stay frozen; ask for the head with
`modules_to_save=["head"]`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rwkv_ft.models.architecture import architectures

# Initialisations that rewrite the base weights (the adapter then only fits the rewritten base).
BASE_REWRITING_INITS = ("pissa", "olora", "corda")


def register_peft_defaults() -> list[str]:
    """Add our model types to every peft default-target mapping that knows RWKV; return the mapping names.

    peft keeps one dict per tuner (LoRA, LoHa, LoKr, OFT, BOFT, VeRA, ...), most of them copies of
    the LoRA one made at import time, so each is updated. Idempotent.
    """
    import sys

    peft_constants = sys.modules.get("peft.utils.constants")
    if peft_constants is None:
        from peft.utils import constants as peft_constants
    updated = []
    for name in dir(peft_constants):
        if not (name.startswith("TRANSFORMERS_MODELS_TO_") and name.endswith("_TARGET_MODULES_MAPPING")):
            continue
        mapping = getattr(peft_constants, name)
        # Only tuners that adapt Linear layers by name and already list RWKV get our targets.
        if isinstance(mapping, dict) and "rwkv" in mapping:
            for arch in architectures():
                mapping.setdefault(arch.model_type, list(arch.lora_target_modules))
            updated.append(name)
    return updated


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """The peft `adapter_config.json` of `adapter_dir` as a dict, with errors naming the file."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a peft adapter directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def check_mergeable(adapter_config: dict, source: str) -> None:
    """Raise a clear error for a peft adapter that cannot be folded into the original base weights."""
    peft_type = str(adapter_config.get("peft_type", "")).upper()
    if adapter_config.get("task_type") and peft_type in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"):
        raise ValueError(f"{source}: a {peft_type} adapter has no weights to merge; use it with PeftModel instead")
    init = adapter_config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise ValueError(
            f"{source}: adapter_config.json says init_lora_weights={init!r}. That initialisation rewrites "
            "the "
            "base weights, so the adapter only fits the rewritten base, not BASE. Save the trained adapter "
            "with `model.save_pretrained(dir, path_initial_model_for_weight_conversion=INIT_DIR)` (INIT_DIR "
            "holding the adapter saved right after get_peft_model) to turn it into a plain LoRA, then merge "
            "that."
        )
