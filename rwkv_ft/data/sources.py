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
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")
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


def _is_local(source: str | Path) -> bool:
    text = str(source)
    path = Path(text)
    return path.suffix in LOCAL_SUFFIXES or path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1


def check_data_source(source: str | Path) -> None:
    """Fail fast (before a model is loaded) on a data path that cannot be read."""
    if not _is_local(source):
        from rwkv_ft.io import hub_is_offline

        if hub_is_offline():
            # datasets reads its own cache offline; only a local file is certain to be there.
            logger.info("data.path %s is a Hub dataset name; HF_HUB_OFFLINE=1: using the local cache only", source)
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError("missing_file", f"data.path {str(source)!r}: no such data file")
    if not path.is_file():
        raise DataError(
            "missing_file", f"data.path {str(source)!r} is a directory; give a .json, .jsonl or .parquet file"
        )
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError("unknown_format", f"{path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")


def open_source(
    source: str | Path, *, split: str = "train", hub_kwargs: Mapping[str, Any] | None = None
) -> tuple[str, Iterator[RawRow]]:
    """A display name for `source` and an iterator over its rows."""
    if _is_local(source):
        check_data_source(source)
        path = Path(source).expanduser()
        readers = {".jsonl": read_jsonl, ".json": read_json_array, ".parquet": read_parquet, ".txt": read_text}
        return str(path), readers[path.suffix](path)
    return f"{source}[{split}]", read_hub(str(source), split, hub_kwargs or {})


_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}
_UTF8_BOM = b"\xef\xbb\xbf"


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of a UTF-8 file (a UTF-8 byte-order mark is allowed); a file in
    another encoding is refused naming the line and byte where decoding failed."""
    with path.open("rb") as handle:
        head = handle.read(4)
        for bom, name in _BOMS.items():
            if head.startswith(bom):
                raise DataError(
                    "not_utf8",
                    f"the file is {name} text (it starts with a {name} byte-order mark); save it as UTF-8, "
                    f"e.g. iconv -f {name} -t UTF-8 {path} > {path.stem}.utf8{path.suffix}",
                    source=str(path),
                )
        handle.seek(len(_UTF8_BOM) if head.startswith(_UTF8_BOM) else 0)
        offset = handle.tell()
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    "not_utf8",
                    f"not UTF-8 text: byte 0x{raw[error.start]:02x} at byte {offset + error.start} of the file "
                    f"(column {error.start + 1}) cannot be decoded; convert the file to UTF-8 "
                    "(e.g. iconv -f LATIN1 -t UTF-8)",
                    source=str(path),
                    location=f"line {number}",
                ) from None
            offset += len(raw)


def _parse_json(text: str) -> tuple[Any, DataError | None]:
    try:
        return json.loads(text), None
    except json.JSONDecodeError as error:
        return None, DataError("malformed_json", f"malformed JSON: {error.msg} (column {error.colno})")
    except RecursionError:
        return None, DataError("malformed_json", "JSON nested too deeply (more than about 1,000 levels) to read")


def read_jsonl(path: Path) -> Iterator[RawRow]:
    """Rows of a JSON-lines file, located by 1-based line number; blank lines are ignored."""
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        location = f"line {number}"
        row, error = _parse_json(line)
        yield RawRow(location, error=error) if error else _checked_object(location, row)


def read_json_array(path: Path) -> Iterator[RawRow]:
    """Rows of a JSON file holding one array, located by 0-based element index.

    A file that is not valid JSON cannot be split into rows, so it always raises.
    """
    text = "".join(line for _, line in _decoded_lines(path))
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            "malformed_json",
            f"malformed JSON: {error.msg} (column {error.colno})",
            source=str(path),
            location=f"line {error.lineno}",
        ) from None
    except RecursionError:
        raise DataError(
            "malformed_json", "JSON nested too deeply (more than about 1,000 levels)", source=str(path)
        ) from None
    if not isinstance(data, list):
        raise DataError(
            "wrong_type",
            f"a .json data file must hold an array of rows, got {type(data).__name__}",
            source=str(path),
        )
    for index, row in enumerate(data):
        yield _checked_object(f"element {index}", row)


def read_text(path: Path) -> Iterator[RawRow]:
    """A plain-text file as one document row ``{"text": ...}`` (the `document` format)."""
    text = "".join(line for _, line in _decoded_lines(path))
    if text.strip():
        yield RawRow("the whole file", row={"text": text})


def read_parquet(path: Path) -> Iterator[RawRow]:
    """Rows of a parquet file (through ``datasets``), located by 0-based row index."""
    table = Dataset.from_parquet(str(path), keep_in_memory=True)
    for index, row in enumerate(table):
        yield RawRow(f"row {index}", row=row)


def read_hub(name: str, split: str, hub_kwargs: Mapping[str, Any]) -> Iterator[RawRow]:
    """Rows of a Hub dataset, located by 0-based row index."""
    from rwkv_ft.io import ensure_network_timeouts

    ensure_network_timeouts()
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
