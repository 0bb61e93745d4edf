"""rwkv_ft: fine-tune RWKV language models the Hugging Face way."""

__version__ = "0.1.0"
