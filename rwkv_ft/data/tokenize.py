"""Tokenize rendered conversations and mask everything but the assistant turns.

Each template segment is tokenized on its own and the pieces are concatenated. The RWKV World
tokenizer matches greedily over bytes, so tokenizing the whole string at once could merge the
last prompt characters with the first answer characters into one token and blur the mask; the
per-segment split keeps every token on one side of the mask, and it is what the model sees at
generation time too, where the prompt ends exactly where the answer segment starts.

Labels are aligned with ``input_ids`` (transformers shifts them inside the loss): -100 on prompt
tokens, the token id on assistant tokens (content + end-of-turn marker, and the eos id when
``append_eos``). No BOS token is added.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset, Features, List, Value
from transformers import PreTrainedTokenizerBase

from rwkv_ft.data.messages import DataError
from rwkv_ft.data.sources import DataResult, log_skips
from rwkv_ft.data.templates import PromptTemplate, TemplateError, get_template

IGNORE_INDEX = -100
TRUNCATION_MODES = ("right", "drop")

# Drop reasons, returned by tokenize_conversation and counted by tokenize_dataset.
NO_TRAINED_TOKENS = "no_assistant_tokens"
TRUNCATED_AWAY = "assistant_truncated_away"
TOO_LONG = "too_long"


def encode_segment(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text` alone, without BOS/EOS or other special tokens.

    Tokenizers with a plain-text fast path (`encode_plain`: the World tokenizer's compiled
    encoder) use it when the text contains no added token, skipping transformers' per-call
    overhead, which costs more than the encoding itself on short segments; the ids are the same.
    """
    encode_plain = getattr(tokenizer, "encode_plain", None)
    if encode_plain is not None and not any(token in text for token in tokenizer.get_added_vocab()):
        return encode_plain(text)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_conversation(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    template: str | PromptTemplate,
    max_length: int,
    *,
    append_eos: bool = False,
    truncation: str = "right",
) -> tuple[dict[str, list[int]] | None, str | None]:
    """Render, tokenize and mask one conversation.

    Returns ``(example, None)`` with ``example = {"input_ids", "labels"}``, or ``(None, reason)`` when
    the row is dropped: ``"no_assistant_tokens"`` (nothing to train on), ``"assistant_truncated_away"``
    (truncating to `max_length` left no assistant token) or ``"too_long"`` (``truncation="drop"``).
    ``truncation="right"`` cuts the end of sequences longer than `max_length`.
    Raises :class:`TemplateError` when the template cannot render the conversation.
    """
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in get_template(template).render(messages):
        ids = encode_segment(tokenizer, segment.text)
        input_ids += ids
        labels += ids if segment.trained else [IGNORE_INDEX] * len(ids)
    if append_eos:
        input_ids.append(eos_token_id(tokenizer))
        labels.append(input_ids[-1])
    if labels.count(IGNORE_INDEX) == len(labels):  # count runs in C; data prep is per token
        return None, NO_TRAINED_TOKENS
    if len(input_ids) > max_length:
        if truncation == "drop":
            return None, TOO_LONG
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if labels.count(IGNORE_INDEX) == len(labels):
            return None, TRUNCATED_AWAY
    return {"input_ids": input_ids, "labels": labels}, None


def tokenize_dataset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    template: str | PromptTemplate,
    max_length: int,
    *,
    append_eos: bool = False,
    truncation: str = "right",
    strict: bool = True,
    num_proc: int | None = None,
) -> DataResult:
    """Tokenize a dataset with a ``messages`` column (as from ``load_conversations``).

    The result has columns ``input_ids``, ``labels``, ``length`` (for length grouping) and, when the
    input has it, ``origin``. Rows dropped by truncation are always skipped and counted (that is a
    property of `max_length`, not bad data); rows the template cannot render raise a
    :class:`DataError` naming their origin when `strict`, else are skipped and counted under
    ``"template_unsupported"``.
    """
    template = get_template(template)
    has_origin = "origin" in dataset.column_names

    def tokenize_row(row: dict[str, Any]) -> dict[str, Any]:
        try:
            example, reason = tokenize_conversation(
                _drop_null_inputs(row["messages"]),
                tokenizer,
                template,
                max_length,
                append_eos=append_eos,
                truncation=truncation,
            )
        except TemplateError as error:
            if strict:
                origin = row.get("origin") or "a row"
                raise DataError(TemplateError.reason, f"{origin}: {error}") from error
            example, reason = None, TemplateError.reason
        example = example or {"input_ids": [], "labels": []}
        return {**example, "length": len(example["input_ids"]), "drop_reason": reason or ""}

    if len(dataset) == 0:
        return DataResult(dataset=dataset, skipped={})
    keep = {"origin"} if has_origin else set()
    # Declared types: datasets then writes the token lists without inferring a type per element,
    # which cost more than the tokenization itself.
    features = Features(
        {
            "input_ids": List(Value("int32")),
            "labels": List(Value("int32")),
            "length": Value("int32"),
            "drop_reason": Value("string"),
            **({"origin": Value("string")} if has_origin else {}),
        }
    )
    mapped = dataset.map(
        tokenize_row,
        remove_columns=[name for name in dataset.column_names if name not in keep],
        num_proc=num_proc,
        features=features,
        desc="Tokenizing",
    )
    skipped = Counter(reason for reason in mapped["drop_reason"] if reason)
    kept = [i for i, reason in enumerate(mapped["drop_reason"]) if not reason]
    result = mapped.select(kept).remove_columns("drop_reason")
    if skipped:
        where = f"in tokenization (template {template.name!r}, max_length {max_length})"
        log_skips(skipped, len(dataset), where)
    return DataResult(dataset=result, skipped=dict(skipped))


def eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's end-of-sequence id (id 0 for RWKV World), or a clear error."""
    if tokenizer.eos_token_id is None:
        raise ValueError("append_eos=True but the tokenizer has no eos_token_id; set tokenizer.eos_token")
    return int(tokenizer.eos_token_id)


def _drop_null_inputs(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Arrow fills the optional ``input`` key with None on every message; remove those."""
    return [{k: v for k, v in message.items() if v is not None} for message in messages]
