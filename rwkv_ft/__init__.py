"""rwkv_ft: fine-tune RWKV language models the Hugging Face way.

Importing the package registers our models with transformers' Auto classes, so that
`AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` work on
directories we write, without `trust_remote_code`.
"""

import logging


def _import_bitsandbytes_quietly() -> None:
    """On a machine without CUDA, bitsandbytes warns at import that an optional Hub kernel for its
    CPU 4-bit matmul is missing ("pip install kernels") and falls back to its own, which works.
    peft imports it on every `import rwkv_ft`; keep that one warning out of our users' logs."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    finally:
        logger.setLevel(level)


_import_bitsandbytes_quietly()

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rwkv_ft.models.rwkv4 import Rwkv4Config, Rwkv4ForCausalLM, Rwkv4Model  # noqa: E402
from rwkv_ft.tokenizers import RwkvWorldTokenizer  # noqa: E402

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    AutoConfig.register(Rwkv4Config.model_type, Rwkv4Config, exist_ok=True)
    AutoModel.register(Rwkv4Config, Rwkv4Model, exist_ok=True)
    AutoModelForCausalLM.register(Rwkv4Config, Rwkv4ForCausalLM, exist_ok=True)
    # A directory's tokenizer_config.json names its class; World-vocabulary models name ours.
    AutoTokenizer.register(Rwkv4Config, tokenizer_class=RwkvWorldTokenizer, exist_ok=True)


_register_auto_classes()

import rwkv_ft.adapters  # noqa: E402,F401  (registers the RWKV-4 default LoRA targets with peft)

__all__ = ["Rwkv4Config", "Rwkv4ForCausalLM", "Rwkv4Model", "RwkvWorldTokenizer", "__version__"]
