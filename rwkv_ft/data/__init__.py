"""Instruction-tuning data: one message format, located validation, templates, masking, batching.

Typical use::

    from rwkv_ft.data import load_conversations, tokenize_dataset, SFTDataCollator

    loaded = load_conversations("data/sharegpt_sample.json")           # DataResult
    tokenized = tokenize_dataset(loaded.dataset, tokenizer, "world", max_length=1024)
    collator = SFTDataCollator.from_tokenizer(tokenizer)

or :func:`prepare_sft_data` for all of it, with an eval split and optional packing.
"""

from rwkv_ft.data.collate import (
    LengthGroupedSampler,
    SFTDataCollator,
    group_by_length,
    pack_examples,
    pad_token_id,
    train_eval_split,
)
from rwkv_ft.data.messages import (
    FORMATS,
    REASONS,
    ROLES,
    Conversation,
    DataError,
    Message,
    alpaca_to_messages,
    detect_format,
    openai_to_messages,
    sharegpt_to_messages,
    to_messages,
    validate_conversation,
)
from rwkv_ft.data.pipeline import SFTData, prepare_sft_data
from rwkv_ft.data.sources import DataResult, check_data_source, convert_rows, load_conversations, open_source
from rwkv_ft.data.templates import (
    PromptTemplate,
    Segment,
    TemplateError,
    get_template,
    list_templates,
    register_template,
)
from rwkv_ft.data.tokenize import IGNORE_INDEX, tokenize_conversation, tokenize_dataset

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "REASONS",
    "ROLES",
    "Conversation",
    "DataError",
    "DataResult",
    "LengthGroupedSampler",
    "Message",
    "PromptTemplate",
    "SFTData",
    "SFTDataCollator",
    "Segment",
    "TemplateError",
    "alpaca_to_messages",
    "check_data_source",
    "convert_rows",
    "detect_format",
    "get_template",
    "group_by_length",
    "list_templates",
    "load_conversations",
    "open_source",
    "openai_to_messages",
    "pack_examples",
    "pad_token_id",
    "prepare_sft_data",
    "register_template",
    "sharegpt_to_messages",
    "to_messages",
    "tokenize_conversation",
    "tokenize_dataset",
    "train_eval_split",
    "validate_conversation",
]
