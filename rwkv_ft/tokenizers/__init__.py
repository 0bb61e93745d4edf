"""Tokenizers for RWKV models: the World vocabulary (RWKV-4 World, v5+) and GPT-NeoX-20B (RWKV-4 Pile)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from .neox import NEOX_HUB_REPO, TokenizerUnavailable, load_neox_tokenizer
from .world import DEFAULT_VOCAB_FILE, VOCAB_FILE_NAME, RwkvWorldTokenizer

__all__ = [
    "DEFAULT_VOCAB_FILE",
    "NEOX_HUB_REPO",
    "VOCAB_FILE_NAME",
    "RwkvWorldTokenizer",
    "TokenizerUnavailable",
    "load_neox_tokenizer",
    "load_tokenizer",
]

_NAMED_SPECS = ("world", "neox")


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.startswith((".", "~")) or Path(spec).suffix != ""


def _saved_tokenizer_class(directory: Path) -> str | None:
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config} is not valid JSON: {exc}") from exc


def _load_from_directory(directory: Path) -> PreTrainedTokenizerBase:
    if _saved_tokenizer_class(directory) == RwkvWorldTokenizer.__name__ or (
        (directory / VOCAB_FILE_NAME).is_file() and not (directory / "tokenizer.json").is_file()
    ):
        return RwkvWorldTokenizer.from_pretrained(str(directory))
    if (directory / "tokenizer.json").is_file():
        return load_neox_tokenizer(directory)
    if (directory / "tokenizer_config.json").is_file():
        # Some other saved tokenizer; let transformers pick the class.
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory))
    raise FileNotFoundError(
        f"no tokenizer files in directory {directory} (expected tokenizer.json, {VOCAB_FILE_NAME} "
        "or tokenizer_config.json)"
    )


def load_tokenizer(spec: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Build a tokenizer from a short name or a path.

    Args:
        spec: ``"world"`` (bundled ``rwkv_vocab_v20230424`` World tokenizer), ``"neox"`` (GPT-NeoX-20B
            from the Hub; needs network), or a path to a ``tokenizer.json`` file, a World vocabulary
            file in the ``rwkv_vocab_v20230424.txt`` format, or a directory written by
            ``save_pretrained`` (or holding ``tokenizer.json``).

    Raises:
        ValueError: ``spec`` is neither a known name nor something that looks like a path.
        FileNotFoundError: ``spec`` looks like a path that does not exist.
    """
    text = os.fspath(spec)
    if text in _NAMED_SPECS:
        return RwkvWorldTokenizer() if text == "world" else load_neox_tokenizer(None)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_from_directory(path)
    if path.is_file():
        if path.suffix == ".json":
            return load_neox_tokenizer(path)
        return RwkvWorldTokenizer(vocab_file=path)
    if _looks_like_path(text):
        raise FileNotFoundError(f"tokenizer path not found: {path}")
    raise ValueError(
        f"load_tokenizer(spec={text!r}): spec must be one of {', '.join(map(repr, _NAMED_SPECS))} or a "
        "path to a tokenizer.json file, a World vocabulary .txt file, or a saved tokenizer directory"
    )
