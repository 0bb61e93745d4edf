"""Text generation helpers on top of `model.generate()`."""

from __future__ import annotations

import os

import torch


def generate_text(
    model_dir: str | os.PathLike, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0
) -> str:
    """Load a model directory with its tokenizer and continue `prompt` (greedy when temperature is 0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rwkv_ft  # noqa: F401  (registers the Auto classes)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": 0.9} if temperature > 0 else {"do_sample": False}
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
