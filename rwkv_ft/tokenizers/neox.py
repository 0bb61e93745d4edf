"""Loader for the GPT-NeoX-20B BPE tokenizer used by RWKV-4 Pile and Raven models (50,277 tokens)."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import PreTrainedTokenizerFast

NEOX_HUB_REPO = "EleutherAI/gpt-neox-20b"
NEOX_END_OF_TEXT = "<|endoftext|>"


class TokenizerUnavailable(OSError):
    """A named tokenizer that cannot be had right now (offline, no network), with what to do instead."""


def _fetch_neox_tokenizer_json() -> Path:
    """tokenizer.json of the Hub's GPT-NeoX-20B repo, without waiting on a missing network (one
    request, no retries; see `fetch_from_hub`), or the local cache only with HF_HUB_OFFLINE=1."""
    from huggingface_hub import hf_hub_download

    from rwkv_ft.io import fetch_from_hub, hub_is_offline, network_failure

    try:
        return fetch_from_hub(
            NEOX_HUB_REPO, lambda **kwargs: hf_hub_download(NEOX_HUB_REPO, "tokenizer.json", etag_timeout=10, **kwargs)
        )
    except Exception as exc:  # no network, offline without a cached copy, repo moved
        where = "in the local Hub cache (HF_HUB_OFFLINE=1)" if hub_is_offline() else "from the Hugging Face Hub"
        raise TokenizerUnavailable(
            f"the GPT-NeoX-20B tokenizer is not available {where} ({network_failure(exc)}); pass a local "
            "tokenizer.json instead (e.g. 20B_tokenizer.json from BlinkDL/ChatRWKV)"
        ) from exc


def _from_tokenizer_json(path: Path) -> PreTrainedTokenizerFast:
    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as exc:  # the Rust parser raises a bare Exception for malformed JSON
        raise ValueError(f"could not parse tokenizer file {path}: {exc}") from exc


def _set_end_of_text(tokenizer: PreTrainedTokenizerFast) -> None:
    """Use ``<|endoftext|>`` for eos/bos/pad where the vocabulary has it and they are unset.

    Values already set (e.g. by a saved ``tokenizer_config.json``) are respected.
    """
    if NEOX_END_OF_TEXT not in tokenizer.get_vocab():
        return
    for attr in ("eos_token", "bos_token", "pad_token"):
        if getattr(tokenizer, attr) is None:
            setattr(tokenizer, attr, NEOX_END_OF_TEXT)


def load_neox_tokenizer(source: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerFast:
    """Load the GPT-NeoX-20B tokenizer as a ``PreTrainedTokenizerFast``.

    Args:
        source: a ``tokenizer.json`` file (e.g. ``20B_tokenizer.json`` from BlinkDL/ChatRWKV), a
            directory holding ``tokenizer.json`` (with or without a saved ``tokenizer_config.json``),
            or ``None`` to fetch ``EleutherAI/gpt-neox-20b`` from the Hugging Face Hub.

    ``eos_token``, ``bos_token`` and ``pad_token`` are set to ``<|endoftext|>`` when the vocabulary
    has it and they are not already set. No BOS is prepended when encoding.

    Raises:
        FileNotFoundError: ``source`` does not exist, or is a directory without ``tokenizer.json``.
        TokenizerUnavailable: ``source`` is None and the Hub cannot be reached (one try, no retries).
        ValueError: the file is not a valid ``tokenizers`` JSON file.
    """
    if source is None:
        tokenizer = _from_tokenizer_json(_fetch_neox_tokenizer_json())
    else:
        path = Path(source)
        if path.is_dir():
            if not (path / "tokenizer.json").is_file():
                raise FileNotFoundError(f"no tokenizer.json in directory {path}")
            if (path / "tokenizer_config.json").is_file():
                # A save_pretrained directory: keep its special tokens and settings.
                tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
            else:
                tokenizer = _from_tokenizer_json(path / "tokenizer.json")
        elif path.is_file():
            tokenizer = _from_tokenizer_json(path)
        else:
            raise FileNotFoundError(f"NeoX tokenizer source not found: {path}")
    _set_end_of_text(tokenizer)
    return tokenizer
