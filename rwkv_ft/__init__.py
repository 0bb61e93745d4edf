"""rwkv_ft: fine-tune RWKV language models the Hugging Face way.

Importing the package registers our models with transformers' Auto classes, so that
`AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` work on
directories we write, without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from rwkv_ft.models.rwkv4 import Rwkv4Config, Rwkv4ForCausalLM, Rwkv4Model

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    AutoConfig.register(Rwkv4Config.model_type, Rwkv4Config, exist_ok=True)
    AutoModel.register(Rwkv4Config, Rwkv4Model, exist_ok=True)
    AutoModelForCausalLM.register(Rwkv4Config, Rwkv4ForCausalLM, exist_ok=True)


_register_auto_classes()

__all__ = ["Rwkv4Config", "Rwkv4ForCausalLM", "Rwkv4Model", "__version__"]
