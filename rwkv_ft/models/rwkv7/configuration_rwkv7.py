"""Configuration of the RWKV-7 ("Goose", x070) model."""

from __future__ import annotations

import math

from transformers import PretrainedConfig

from rwkv_ft.models.config_checks import check_positive_fields, check_wkv_backend
from rwkv_ft.models.registration import register_config


def default_low_rank(hidden_size: int, factor: float) -> int:
    """BlinkDL's rule for a from-scratch model's low-rank widths: factor * sqrt(C), in steps of 32.
    Released checkpoints differ per size; conversion reads theirs from the tensor shapes."""
    return max(32, int(round(factor * math.sqrt(hidden_size) / 32)) * 32)


class Rwkv7Config(PretrainedConfig):
    """Configuration of an RWKV-7 language model (World, G-series and Pile checkpoints).

    Args:
        vocab_size: Embedding rows (65536 for World and G-series models, 50304 for Pile).
        hidden_size: Model width C (BlinkDL's `n_embd`); heads H = C / head_size.
        num_hidden_layers: Number of blocks L.
        head_size: N, the size of each head's (N, N) state (64 in every released model).
        intermediate_size: Channel-mix width; defaults to 4 * hidden_size.
        decay_low_rank, a_low_rank, v_low_rank, gate_low_rank: widths of the low-rank maps
            `w1/w2`, `a1/a2`, `v1/v2`, `g1/g2` (default: BlinkDL's rule from hidden_size).
        layer_norm_epsilon: Epsilon of every LayerNorm; the per-head `ln_x` GroupNorm uses
            `group_norm_epsilon` (64e-5, as the reference).
        wkv_backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".
    """

    model_type = "rwkv7_ft"  # not "rwkv7": flash-linear-attention registers that, and transformers will
    attribute_map = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers"}

    def __init__(
        self,
        vocab_size: int = 65536,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        head_size: int = 64,
        intermediate_size: int | None = None,
        decay_low_rank: int | None = None,
        a_low_rank: int | None = None,
        v_low_rank: int | None = None,
        gate_low_rank: int | None = None,
        layer_norm_epsilon: float = 1e-5,
        group_norm_epsilon: float = 64e-5,
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
            "Rwkv7Config",
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            head_size=head_size,
            intermediate_size=intermediate_size,
        )
        if hidden_size % head_size:
            raise ValueError(f"Rwkv7Config: hidden_size {hidden_size} is not a multiple of head_size {head_size}")
        check_wkv_backend(wkv_backend)
        low_rank = {
            "decay_low_rank": decay_low_rank or default_low_rank(hidden_size, 2.5),
            "a_low_rank": a_low_rank or default_low_rank(hidden_size, 2.5),
            "v_low_rank": v_low_rank or default_low_rank(hidden_size, 1.7),
            "gate_low_rank": gate_low_rank or default_low_rank(hidden_size, 5.0),
        }
        check_positive_fields("Rwkv7Config", **low_rank)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.head_size = head_size
        self.intermediate_size = intermediate_size
        for name, value in low_rank.items():
            setattr(self, name, value)
        self.layer_norm_epsilon = layer_norm_epsilon
        self.group_norm_epsilon = group_norm_epsilon
        self.wkv_backend = wkv_backend
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size


register_config(Rwkv7Config)
