"""rwkv_ft: fine-tune RWKV language models the Hugging Face way.

Importing the package registers our models with transformers' Auto classes (and our default LoRA
targets with peft), so that `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)` work on directories we write, without `trust_remote_code`.
The registrations run as soon as the transformers / peft modules they extend are imported (see
`rwkv_ft._post_import`), so `import rwkv_ft` itself imports neither: the command line starts fast.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from rwkv_ft._post_import import when_imported

__version__ = "0.2.0"

# Public names, imported on first use.
_LAZY = {
    "Rwkv4Config": "rwkv_ft.models.rwkv4",
    "Rwkv4ForCausalLM": "rwkv_ft.models.rwkv4",
    "Rwkv4Model": "rwkv_ft.models.rwkv4",
    "Rwkv7Config": "rwkv_ft.models.rwkv7",
    "Rwkv7ForCausalLM": "rwkv_ft.models.rwkv7",
    "Rwkv7Model": "rwkv_ft.models.rwkv7",
    "RwkvWorldTokenizer": "rwkv_ft.tokenizers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rwkv_ft' has no attribute {name!r}")


def _register_configs(_auto) -> None:
    from rwkv_ft.models.registration import import_all_versions

    import_all_versions("configuration", needs="transformers.configuration_utils")


def _register_models(_auto) -> None:
    from rwkv_ft.models.registration import import_all_versions

    import_all_versions("modeling", needs="transformers.modeling_layers")


def _register_tokenizers(auto) -> None:
    # A directory's tokenizer_config.json names its class; World-vocabulary models name ours.
    from rwkv_ft.models.registration import register_tokenizer

    register_tokenizer()


def _register_peft_defaults(_constants) -> None:
    from rwkv_ft.adapters.lora import register_peft_defaults

    register_peft_defaults()


# On a machine without CUDA, bitsandbytes (imported by peft) warns that an optional Hub kernel for
# its CPU 4-bit matmul is missing and falls back to its own, which works: keep that out of logs
# unless the user configured that logger themselves.
_bnb_cpu_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
if _bnb_cpu_logger.level == logging.NOTSET:
    _bnb_cpu_logger.setLevel(logging.ERROR)


class _DropBnbKernelProbe(logging.Filter):
    """That probe also makes the Hub `kernels` package warn (with HF_HUB_OFFLINE=1) that it skipped a
    trust check for bitsandbytes' kernel repository: drop those records only, keep its others."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community/quantization-bitsandbytes" not in record.getMessage()


logging.getLogger("kernels._internals.hf_hub").addFilter(_DropBnbKernelProbe())

when_imported("transformers.models.auto.configuration_auto", _register_configs)
when_imported("transformers.models.auto.modeling_auto", _register_models)
when_imported("transformers.models.auto.tokenization_auto", _register_tokenizers)
when_imported("peft.utils.constants", _register_peft_defaults)

__all__ = [*_LAZY, "__version__"]
