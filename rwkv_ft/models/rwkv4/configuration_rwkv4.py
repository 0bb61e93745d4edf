"""Configuration of the RWKV-4 model."""

from __future__ import annotations

from transformers import PretrainedConfig

from rwkv_ft.models.config_checks import check_positive_fields, check_wkv_backend
from rwkv_ft.models.registration import register_config


class Rwkv4Config(PretrainedConfig):
    """Configuration of an RWKV-4 language model (Pile, Raven and World checkpoints).

    Args:
        vocab_size: Embedding rows (65536 for World models, 50277 for Pile/Raven).
        hidden_size: Model width C (BlinkDL's `n_embd`).
        num_hidden_layers: Number of blocks L (BlinkDL's `n_layer`).
        intermediate_size: Channel-mix width F; defaults to 4 * hidden_size.
        layer_norm_epsilon: Epsilon of every LayerNorm.
        wkv_backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".
    """

    model_type = "rwkv4"
    attribute_map = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers"}

    def __init__(
        self,
        vocab_size: int = 65536,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        intermediate_size: int | None = None,
        layer_norm_epsilon: float = 1e-5,
        wkv_backend: str = "auto",
        bos_token_id: int = 0,
        eos_token_id: int = 0,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
        check_positive_fields(
            "Rwkv4Config",
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            intermediate_size=intermediate_size,
        )
        check_wkv_backend(wkv_backend)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.wkv_backend = wkv_backend
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


register_config(Rwkv4Config)
