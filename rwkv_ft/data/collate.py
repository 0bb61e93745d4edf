"""Batching: padding collator, packing, length grouping and the eval split.

Packing concatenates several tokenized conversations into one row of at most ``max_length``
tokens and marks where each starts with ``position_ids`` that restart at 0, the convention of
transformers' ``DataCollatorWithFlattening``. The RWKV model resets its recurrent state wherever
``position_ids == 0``, and the first label of every packed conversation is -100, so neither the
state nor the loss crosses a boundary.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from datasets import Dataset
from torch.utils.data import Sampler
from transformers import PreTrainedTokenizerBase

from rwkv_ft.data.tokenize import IGNORE_INDEX

T = TypeVar("T", Dataset, list)


@dataclass
class SFTDataCollator:
    """Right-pad ``input_ids`` (with `pad_token_id`), ``labels`` (with -100) and ``position_ids``
    (continuing the count, so padding never looks like a new sequence start), and add an
    ``attention_mask`` (1 on real tokens). Other feature keys (``origin``, ``length``) are dropped.

    ``position_ids`` are returned when the features carry them (packed rows) or when
    `return_position_ids` is set. `pad_to_multiple_of` rounds the padded length up (e.g. 16 for
    kernels that want T % 16 == 0).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    return_position_ids: bool = False

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, **kwargs: Any) -> SFTDataCollator:
        """A collator padding with the tokenizer's pad id (falling back to eos, then 0)."""
        return cls(pad_token_id=pad_token_id(tokenizer), **kwargs)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        width = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        with_positions = self.return_position_ids or "position_ids" in features[0]
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
        if with_positions:
            batch["position_ids"] = []
        for feature in features:
            ids = list(feature["input_ids"])
            pad = width - len(ids)
            batch["input_ids"].append(ids + [self.pad_token_id] * pad)
            batch["labels"].append(list(feature.get("labels", ids)) + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append([1] * len(ids) + [0] * pad)
            if with_positions:
                positions = list(feature.get("position_ids") or range(len(ids)))
                start = positions[-1] + 1 if positions else 0
                batch["position_ids"].append(positions + list(range(start, start + pad)))
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Pad id of `tokenizer`: its pad token, else its eos token, else 0 (padding is masked anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def pack_examples(dataset: Dataset | Sequence[Mapping[str, Any]], max_length: int) -> Dataset:
    """Pack tokenized examples (``input_ids``, ``labels``) into rows of at most `max_length` tokens.

    Examples are placed whole by best-fit decreasing (deterministic: ties keep input order), so an
    example is never split across rows. One longer than `max_length` gets a row of its own and
    is cut to `max_length` (its end would otherwise need a state it cannot see); if that leaves
    it without a trained token it is left out. Returns columns ``input_ids``, ``labels``,
    ``position_ids`` (0 at every example start), ``num_examples`` and ``length``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    examples = [_fit(example, max_length) for example in dataset]
    examples = [example for example in examples if example is not None]
    rows = [_concatenate([examples[i] for i in bin_]) for bin_ in _best_fit_bins(examples, max_length)]
    columns = ("input_ids", "labels", "position_ids", "num_examples", "length")
    return Dataset.from_dict({name: [row[name] for row in rows] for name in columns})


def _fit(example: Mapping[str, Any], max_length: int) -> dict[str, list[int]] | None:
    ids, labels = list(example["input_ids"]), list(example["labels"])[:max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):  # labels[0] is masked when packed
        return None
    return {"input_ids": ids[:max_length], "labels": labels}


def _best_fit_bins(examples: list[dict[str, list[int]]], max_length: int) -> list[list[int]]:
    """Indices of `examples` grouped into bins of total length <= max_length (best-fit decreasing)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin id), kept sorted
    for index in order:
        size = len(examples[index]["input_ids"])
        slot = bisect.bisect_left(free, (size, -1))
        if slot == len(free):
            bins.append([index])
            bin_id, space = len(bins) - 1, max_length - size
        else:
            space, bin_id = free.pop(slot)
            bins[bin_id].append(index)
            space -= size
        bisect.insort(free, (space, bin_id))
    return bins


def _concatenate(examples: list[dict[str, list[int]]]) -> dict[str, Any]:
    row: dict[str, Any] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        row["input_ids"] += example["input_ids"]
        row["labels"] += [IGNORE_INDEX] + example["labels"][1:]  # never predict across a boundary
        row["position_ids"] += list(range(len(example["input_ids"])))
    row["num_examples"] = len(examples)
    row["length"] = len(row["input_ids"])
    return row


def group_by_length(lengths: Sequence[int], batch_size: int, *, seed: int = 0, mega_batch_mult: int = 50) -> list[int]:
    """An index order whose consecutive `batch_size` chunks hold examples of similar length.

    Shuffles with `seed`, cuts the order into mega-batches of ``batch_size * mega_batch_mult``,
    sorts each by decreasing length, and swaps the longest example into the first batch so that a
    run that would run out of memory does so at step one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    mega = batch_size * mega_batch_mult
    grouped: list[int] = []
    for start in range(0, len(order), mega):
        grouped += sorted(order[start : start + mega], key=lambda i: -lengths[i])
    if grouped:
        longest = max(range(len(grouped)), key=lambda i: lengths[grouped[i]])
        grouped[0], grouped[longest] = grouped[longest], grouped[0]
    return grouped


class LengthGroupedSampler(Sampler[int]):
    """Sampler yielding :func:`group_by_length` order, reshuffled per epoch via :meth:`set_epoch`."""

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, mega_batch_mult: int = 50):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        seed = self.seed + self.epoch
        return iter(group_by_length(self.lengths, self.batch_size, seed=seed, mega_batch_mult=self.mega_batch_mult))


def train_eval_split(
    dataset: T, *, eval_fraction: float | None = None, eval_size: int | None = None, seed: int = 0
) -> tuple[T, T]:
    """Split off a held-out eval set, deterministically under `seed`.

    Give exactly one of `eval_fraction` (0 < f < 1; rounded, at least one row) or `eval_size`.
    Both parts keep the original row order. Works on a ``datasets.Dataset`` or a list.
    """
    n = len(dataset)
    if (eval_fraction is None) == (eval_size is None):
        raise ValueError("give exactly one of eval_fraction or eval_size")
    if eval_fraction is not None:
        if not 0 < eval_fraction < 1:
            raise ValueError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
        eval_size = max(1, round(n * eval_fraction))
    assert eval_size is not None
    if not 0 < eval_size < n:
        raise ValueError(f"eval_size must be between 1 and {n - 1} for {n} rows, got {eval_size}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_indices = sorted(order[:eval_size])
    train_indices = sorted(order[eval_size:])
    if isinstance(dataset, Dataset):
        return dataset.select(train_indices), dataset.select(eval_indices)
    return [dataset[i] for i in train_indices], [dataset[i] for i in eval_indices]
