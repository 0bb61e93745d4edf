"""Text generation from a model directory or an adapter directory (what `rwkv-ft generate` runs).

`load_for_generation(path)` loads one of our model directories, or an adapter directory (a peft
LoRA adapter and/or a learned initial state) on top of the base it records, with the tokenizer
(and chat template) saved beside it. `generate_text` then continues a raw prompt, or formats a
user message with the chat template and stops at the end of the assistant's turn.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rwkv_ft.io import DTYPES, CheckpointError, read_json_object, resolve_model_source

TURN_END = "\n\n"


def _is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").exists() or (
        (path / "state_tuning.safetensors").exists() and not (path / "config.json").exists()
    )


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).exists() for name in ("tokenizer_config.json", "tokenizer.json"))


def _adapter_base(adapter: Path) -> str:
    from rwkv_ft.adapters.info import read_adapter_info

    info = read_adapter_info(adapter) or {}
    peft_config = read_json_object(adapter / "adapter_config.json") or {}
    base = info.get("base_model") or peft_config.get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{adapter}: the adapter does not record its base model; merge it with `rwkv-ft merge`")
    return base


def load_for_generation(path: str | os.PathLike, *, dtype: str = "auto", device: str = "auto"):
    """(model in eval mode, tokenizer) for a model directory or an adapter directory."""
    from rwkv_ft.convert import check_tokenizer_fits, load_pretrained, verify_model_dir
    from rwkv_ft.tokenizers import load_tokenizer

    path = resolve_model_source(path, what="model").path
    adapter = path if path.is_dir() and _is_adapter_dir(path) else None
    base = resolve_model_source(_adapter_base(adapter), what="the adapter's base model").path if adapter else path
    verify_model_dir(base)
    tokenizer_dir = next((d for d in (adapter, base) if d is not None and _has_tokenizer(d)), None)
    if tokenizer_dir is None:
        raise CheckpointError(
            f"{path}: no tokenizer (tokenizer.json or tokenizer_config.json) here"
            + (f" or in the base {base}" if adapter else "")
            + "; write one with `rwkv-ft convert SRC OUT --tokenizer world|neox|PATH` or tokenizer.save_pretrained(DIR)"
        )
    tokenizer = load_tokenizer(str(tokenizer_dir))
    kwargs = {} if dtype == "auto" else {"dtype": DTYPES[dtype]}
    model = load_pretrained(base, **kwargs)
    check_tokenizer_fits(tokenizer, model.config.vocab_size, str(tokenizer_dir))
    if adapter is not None:
        if (adapter / "adapter_config.json").exists():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        if (adapter / "state_tuning.safetensors").exists():
            from rwkv_ft.adapters import load_state_tuning

            load_state_tuning(model, adapter)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def chat_prompt(tokenizer, message: str) -> str:
    """A user message formatted as the model was trained: the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "--chat: this model's tokenizer has no chat template (models trained with rwkv_ft carry one); "
            "pass the formatted text with --prompt instead"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )


def generate_text(
    model_dir: str | os.PathLike,
    prompt: str,
    *,
    chat: bool | str = False,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 0.9,
    seed: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
) -> str:
    """Continue `prompt` (greedy when temperature is 0, else nucleus sampling with `top_p`).

    With `chat` (True, or the message itself), `prompt` is a user message: it is formatted with the
    chat template and generation stops at the blank line that ends the assistant's turn.
    """
    if isinstance(chat, str):
        prompt, chat = chat, True
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    model, tokenizer = load_for_generation(model_dir, dtype=dtype, device=device)
    text = chat_prompt(tokenizer, prompt) if chat else prompt
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    if inputs["input_ids"].shape[1] == 0:
        raise ValueError("the prompt is empty after tokenization")
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    stopping = [StopAtText(tokenizer, TURN_END, inputs["input_ids"].shape[1])] if chat else None
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=stopping,
            **sampling,
        )
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answer.split(TURN_END)[0].strip() if chat else answer


class StopAtText:
    """A stopping criterion: stop each row once its generated text contains `text` (the end of a
    turn). Decodes only the new tokens, so it works with any tokenizer, byte-level ones included."""

    def __init__(self, tokenizer, text: str, prompt_length: int):
        self.tokenizer, self.text, self.prompt_length = tokenizer, text, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        done = [self.text in self.tokenizer.decode(row[self.prompt_length :]) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
