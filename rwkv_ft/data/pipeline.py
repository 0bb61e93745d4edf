"""One call from a data source to train/eval datasets ready for the collator."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from rwkv_ft.data.collate import pack_examples, train_eval_split
from rwkv_ft.data.messages import DataError
from rwkv_ft.data.sources import load_conversations
from rwkv_ft.data.templates import PromptTemplate
from rwkv_ft.data.tokenize import tokenize_dataset


@dataclass
class SFTData:
    """Tokenized train (and optional eval) datasets plus every skipped-row count, per reason."""

    train: Dataset
    eval: Dataset | None
    skipped: dict[str, int] = field(default_factory=dict)


def prepare_sft_data(
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str | PromptTemplate = "world",
    max_length: int = 1024,
    format: str = "auto",
    split: str = "train",
    strict: bool = True,
    append_eos: bool = False,
    truncation: str = "right",
    pack: bool = False,
    eval_fraction: float | None = None,
    eval_size: int | None = None,
    seed: int = 0,
) -> SFTData:
    """Load, validate, tokenize and mask `source`; split off an eval set; optionally pack.

    The eval split is taken on conversations before packing, so no conversation lands in both
    sets, and the eval set is never packed (per-example losses stay comparable across runs).
    """
    loaded = load_conversations(source, format=format, split=split, strict=strict)
    if len(loaded.dataset) == 0:
        if not loaded.skipped:
            raise DataError(
                "empty_file", "no data rows: the file is empty or holds only blank lines", source=str(source)
            )
        counts = ", ".join(f"{reason}={count}" for reason, count in sorted(loaded.skipped.items()))
        raise DataError(
            "all_rows_rejected",
            f"all {loaded.num_skipped} rows were rejected ({counts}); first: {loaded.problems[0]}",
            source=str(source),
        )
    tokenized = tokenize_dataset(
        loaded.dataset,
        tokenizer,
        template,
        max_length,
        append_eos=append_eos,
        truncation=truncation,
        strict=strict,
    )
    skipped = Counter(loaded.skipped) + Counter(tokenized.skipped)
    if len(tokenized.dataset) == 0:
        counts = ", ".join(f"{reason}={count}" for reason, count in sorted(tokenized.skipped.items()))
        raise DataError(
            "no_examples_left",
            f"{source}: none of the {len(loaded.dataset)} conversations is left after tokenization ({counts}); "
            f"raise data.max_length (now {max_length}) or check the template ({getattr(template, 'name', template)})",
        )
    train, eval_ = tokenized.dataset, None
    if eval_fraction is not None or eval_size is not None:
        train, eval_ = train_eval_split(train, eval_fraction=eval_fraction, eval_size=eval_size, seed=seed)
    if pack:
        train = pack_examples(train, max_length)
    return SFTData(train=train, eval=eval_, skipped=dict(skipped))
