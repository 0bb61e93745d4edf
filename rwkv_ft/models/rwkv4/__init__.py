from .configuration_rwkv4 import Rwkv4Config
from .modeling_rwkv4 import Rwkv4CausalLMOutput, Rwkv4ForCausalLM, Rwkv4Model, Rwkv4PreTrainedModel

__all__ = ["Rwkv4CausalLMOutput", "Rwkv4Config", "Rwkv4ForCausalLM", "Rwkv4Model", "Rwkv4PreTrainedModel"]
