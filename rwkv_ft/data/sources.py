"""Load conversations from local files or the Hugging Face Hub, with located errors.

``.jsonl`` and ``.json`` files are parsed here, line by line or element by element, so that every
problem names its file and line (jsonl, 1-based) or element index (json array, 0-based);
``.parquet`` files and Hub datasets go through ``datasets`` and are located by row index.
Files are only ever opened for reading.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, Features, List, Value

from rwkv_ft.data.messages import FORMATS, Conversation, DataError, detect_format, to_messages

logger = logging.getLogger("rwkv_ft.data")
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
# How many problems a non-strict load keeps verbatim (the counts cover all of them).
MAX_KEPT_PROBLEMS = 100

MESSAGE_FEATURES = Features(
    {
        "messages": List(
            {"role": Value("string"), "content": Value("string"), "input": Value("string")},
        ),
        "origin": Value("string"),
    }
)


@dataclass
class DataResult:
    """A dataset plus what was left out of it on the way.

    ``skipped`` counts left-out rows per reason (see ``rwkv_ft.data.messages.REASONS`` and the
    drop reasons of ``rwkv_ft.data.tokenize``); ``problems`` keeps the first located errors.
    """

    dataset: Dataset
    skipped: dict[str, int] = field(default_factory=dict)
    problems: list[DataError] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def __len__(self) -> int:
        return len(self.dataset)


@dataclass(frozen=True)
class RawRow:
    """One row as read from a source, or the reason it could not be read."""

    location: str
    row: Any = None
    error: DataError | None = None


def load_conversations(
    source: str | Path,
    *,
    format: str = "auto",
    split: str = "train",
    strict: bool = True,
    hub_kwargs: Mapping[str, Any] | None = None,
) -> DataResult:
    """Load a dataset as conversations in the rwkv_ft message format.

    `source` is a local ``.json`` (array of rows), ``.jsonl`` or ``.parquet`` file, or a Hub dataset
    name (loaded with ``datasets.load_dataset(source, split=split, **hub_kwargs)``). `format` is
    ``"alpaca"``, ``"sharegpt"``, ``"openai"`` or ``"auto"`` (detected from the first row's keys).

    Returns a :class:`DataResult` whose dataset has the columns ``messages`` (list of
    ``{"role", "content", "input"}``; ``input`` is None except on user turns from Alpaca rows with
    an input) and ``origin`` (``"file, line N"``, used in later error messages). With `strict`
    the first bad row raises :class:`DataError` naming file and line; otherwise bad rows are
    skipped, counted per reason in ``skipped`` and summarized in the log.
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)} or 'auto'")
    name, rows = open_source(source, split=split, hub_kwargs=hub_kwargs)
    conversations: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    problems: list[DataError] = []
    total = 0
    for messages, origin, error in convert_rows(rows, name, format=format):
        total += 1
        if error is None:
            conversations.append({"messages": _with_input_column(messages), "origin": origin})
            continue
        if strict:
            raise error
        skipped[error.reason] += 1
        if len(problems) < MAX_KEPT_PROBLEMS:
            problems.append(error)
    if skipped:
        log_skips(skipped, total, f"of {name}", problems[0])
    columns = {name: [row[name] for row in conversations] for name in MESSAGE_FEATURES}
    dataset = Dataset.from_dict(columns, features=MESSAGE_FEATURES)  # from_dict also handles 0 rows
    return DataResult(dataset=dataset, skipped=dict(skipped), problems=problems)


def convert_rows(
    rows: Iterable[RawRow], source: str, *, format: str = "auto"
) -> Iterator[tuple[Conversation | None, str, DataError | None]]:
    """Yield ``(messages, origin, None)`` per good row and ``(None, origin, error)`` per bad one.

    With ``format="auto"`` the format is detected from the first row that is a JSON object; a
    first row of unknown shape raises, since then no row can be read.
    """
    for raw in rows:
        origin = f"{source}, {raw.location}"
        if raw.error is not None:
            yield None, origin, raw.error.at(source, raw.location)
            continue
        if format == "auto" and isinstance(raw.row, Mapping):
            try:
                format = detect_format(raw.row)
            except DataError as error:
                raise error.at(source, raw.location) from None
        try:
            yield to_messages(raw.row, format), origin, None
        except DataError as error:
            yield None, origin, error.at(source, raw.location)


def open_source(
    source: str | Path, *, split: str = "train", hub_kwargs: Mapping[str, Any] | None = None
) -> tuple[str, Iterator[RawRow]]:
    """A display name for `source` and an iterator over its rows."""
    path = Path(source)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise DataError("missing_file", f"no such data file: {str(path)!r}")
        readers = {".jsonl": read_jsonl, ".json": read_json_array, ".parquet": read_parquet}
        if path.suffix not in readers:
            raise DataError("unknown_format", f"{path}: unsupported file type; use one of {LOCAL_SUFFIXES}")
        return str(path), readers[path.suffix](path)
    return f"{source}[{split}]", read_hub(str(source), split, hub_kwargs or {})


def read_jsonl(path: Path) -> Iterator[RawRow]:
    """Rows of a JSON-lines file, located by 1-based line number; blank lines are ignored."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            location = f"line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                yield RawRow(location, error=DataError("malformed_json", f"malformed JSON: {error.msg}"))
                continue
            yield _checked_object(location, row)


def read_json_array(path: Path) -> Iterator[RawRow]:
    """Rows of a JSON file holding one array, located by 0-based element index.

    A file that is not valid JSON cannot be split into rows, so it always raises.
    """
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataError(
            "malformed_json",
            f"malformed JSON: {error.msg}",
            source=str(path),
            location=f"line {error.lineno}",
        ) from None
    if not isinstance(data, list):
        raise DataError(
            "wrong_type",
            f"a .json data file must hold an array of rows, got {type(data).__name__}",
            source=str(path),
        )
    for index, row in enumerate(data):
        yield _checked_object(f"element {index}", row)


def read_parquet(path: Path) -> Iterator[RawRow]:
    """Rows of a parquet file (through ``datasets``), located by 0-based row index."""
    table = Dataset.from_parquet(str(path), keep_in_memory=True)
    for index, row in enumerate(table):
        yield RawRow(f"row {index}", row=row)


def read_hub(name: str, split: str, hub_kwargs: Mapping[str, Any]) -> Iterator[RawRow]:
    """Rows of a Hub dataset, located by 0-based row index."""
    try:
        table = datasets.load_dataset(name, split=split, **hub_kwargs)
    except Exception as error:  # network, auth, missing repo or split: all mean "cannot use it"
        raise DataError(
            "hub_unavailable",
            f"could not load dataset {name!r} (split {split!r}) from the Hub: "
            f"{type(error).__name__}: {error}; "
            "check the name and your network, or pass a local .json/.jsonl/.parquet file",
        ) from error
    for index, row in enumerate(table):
        yield RawRow(f"row {index}", row=row)


def log_skips(skipped: Mapping[str, int], total: int, where: str, example: DataError | None = None) -> None:
    """Log one warning: how many of `total` rows were skipped `where`, per reason, and the first
    problem in full."""
    counts = ", ".join(f"{reason}={count}" for reason, count in sorted(skipped.items()))
    message = f"skipped {sum(skipped.values())} of {total} rows {where}: {counts}"
    if example is not None:
        message += f"; first: {example}"
    logger.warning(message)


def _checked_object(location: str, row: Any) -> RawRow:
    if isinstance(row, dict):
        return RawRow(location, row=row)
    return RawRow(location, error=DataError("not_an_object", f"row must be a JSON object, got {type(row).__name__}"))


def _with_input_column(messages: Conversation) -> list[dict[str, Any]]:
    return [{"role": m["role"], "content": m["content"], "input": m.get("input")} for m in messages]
