"""The one conversation format of rwkv_ft, and converters into it.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``.
A system message may only come first; the conversation must contain an assistant turn and end
with one, and no assistant turn may be empty, since those are the tokens we train on.

User turns converted from Alpaca rows with a non-empty ``input`` keep it apart from the instruction
in an extra ``"input"`` key, so that instruction templates can render their ``Input:`` section; chat
templates join it to the content with a blank line. No other message carries that key (in a
``datasets.Dataset`` it reads back as ``None``, since Arrow stores one schema for every row).

Converters raise :class:`DataError` with a stable ``reason`` (one of :data:`REASONS`) naming the key
that is wrong; the loaders in :mod:`rwkv_ft.data.sources` add the file and line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NotRequired, TypedDict

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
FORMATS: tuple[str, ...] = ("alpaca", "sharegpt", "openai", "document")

# ShareGPT dumps name speakers in several ways; everything else is rejected as an unknown role.
SHAREGPT_ROLES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
}

# Stable keys for problem counts, so that a trainer can log and compare them across runs.
REASONS: tuple[str, ...] = (
    "malformed_json",
    "not_an_object",
    "unknown_format",
    "missing_field",
    "wrong_type",
    "unknown_role",
    "misplaced_system",
    "empty_conversation",
    "empty_assistant",
    "no_assistant_turn",
    "not_ending_with_assistant",
)


class Message(TypedDict):
    role: Role
    content: str
    input: NotRequired[str]


Conversation = list[Message]


class DataError(ValueError):
    """A row (or file) that cannot be turned into a training conversation.

    ``reason`` is one of :data:`REASONS` (or a tokenization drop reason); ``source`` and
    ``location`` (e.g. ``"line 12"`` or ``"element 3"``) are filled in by the loaders.
    """

    def __init__(self, reason: str, detail: str, *, source: str | None = None, location: str | None = None):
        self.reason = reason
        self.detail = detail
        self.source = source
        self.location = location
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = ", ".join(part for part in (self.source, self.location) if part)
        return f"{where}: {self.detail} [{self.reason}]" if where else f"{self.detail} [{self.reason}]"

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from all fields (the default would pass only the message), for multiprocessing.
        return (_rebuild_data_error, (self.reason, self.detail, self.source, self.location))

    def at(self, source: str, location: str) -> DataError:
        """The same problem, located in `source` at `location`."""
        return DataError(self.reason, self.detail, source=source, location=location)


def _rebuild_data_error(reason: str, detail: str, source: str | None, location: str | None) -> DataError:
    return DataError(reason, detail, source=source, location=location)


def _require(row: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: str = "") -> Any:
    """row[key], checked for presence and type; `path` prefixes the key in error messages."""
    name = f"{path}{key}"
    if key not in row:
        raise DataError("missing_field", f"missing key {name!r} (keys present: {sorted(row)})")
    value = row[key]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError("wrong_type", f"key {name!r} must be {expected}, got {type(value).__name__}")
    return value


def _optional_str(row: Mapping[str, Any], key: str) -> str:
    """row[key] when it is a string, '' when absent or None; other types are an error."""
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError("wrong_type", f"key {key!r} must be str or null, got {type(value).__name__}")
    return value


def alpaca_to_messages(row: Mapping[str, Any]) -> Conversation:
    """Alpaca ``{"instruction", "input"?, "output", "system"?}`` -> one user/assistant exchange."""
    instruction = _require(row, "instruction", str)
    output = _require(row, "output", str)
    if not output.strip():
        raise DataError("empty_assistant", "key 'output' is empty: there is no answer to train on")
    extra_input = _optional_str(row, "input")
    system = _optional_str(row, "system")
    messages: Conversation = []
    if system.strip():
        messages.append({"role": "system", "content": system})
    user: Message = {"role": "user", "content": instruction}
    if extra_input.strip():
        user["input"] = extra_input
    messages += [user, {"role": "assistant", "content": output}]
    return validate_conversation(messages, key="output")


def sharegpt_to_messages(row: Mapping[str, Any]) -> Conversation:
    """ShareGPT ``{"conversations": [{"from": "human"|"gpt"|"system"|..., "value": str}, ...]}``."""
    turns = _require(row, "conversations", list)
    messages: Conversation = []
    for i, turn in enumerate(turns):
        path = f"conversations[{i}]."
        if not isinstance(turn, Mapping):
            raise DataError("wrong_type", f"conversations[{i}] must be an object, got {type(turn).__name__}")
        speaker = _require(turn, "from", str, path)
        if speaker.lower() not in SHAREGPT_ROLES:
            known = ", ".join(SHAREGPT_ROLES)
            raise DataError("unknown_role", f"key '{path}from' has unknown speaker {speaker!r} (known: {known})")
        value = _require(turn, "value", str, path)
        messages.append({"role": SHAREGPT_ROLES[speaker.lower()], "content": value})  # type: ignore[typeddict-item]
    return validate_conversation(messages, key="conversations")


def openai_to_messages(row: Mapping[str, Any]) -> Conversation:
    """OpenAI chat ``{"messages": [{"role": ..., "content": str}, ...]}`` (extra keys are ignored,
    except a string ``input`` on user turns, which round-trips Alpaca inputs)."""
    items = _require(row, "messages", list)
    messages: Conversation = []
    for i, item in enumerate(items):
        path = f"messages[{i}]."
        if not isinstance(item, Mapping):
            raise DataError("wrong_type", f"messages[{i}] must be an object, got {type(item).__name__}")
        role = _require(item, "role", str, path)
        if role not in ROLES:
            raise DataError("unknown_role", f"key '{path}role' has unknown role {role!r} (known: {', '.join(ROLES)})")
        message: Message = {"role": role, "content": _require(item, "content", str, path)}  # type: ignore[typeddict-item]
        if role == "user" and isinstance(item.get("input"), str) and item["input"].strip():
            message["input"] = item["input"]
        messages.append(message)
    return validate_conversation(messages, key="messages")


def document_to_messages(row: Mapping[str, Any]) -> Conversation:
    """A plain document ``{"text": str}`` (long-context and continued pre-training data): one
    assistant message holding the whole text, every token of it trained (with the ``plain`` template)."""
    text = _require(row, "text", str)
    return validate_conversation([{"role": "assistant", "content": text}], key="text")


CONVERTERS: dict[str, Callable[[Mapping[str, Any]], Conversation]] = {
    "alpaca": alpaca_to_messages,
    "sharegpt": sharegpt_to_messages,
    "openai": openai_to_messages,
    "document": document_to_messages,
}


def detect_format(row: Mapping[str, Any]) -> str:
    """Name the format of a row from its keys: ``openai``, ``sharegpt`` or ``alpaca``."""
    if "messages" in row:
        return "openai"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "document"
    raise DataError(
        "unknown_format",
        f"cannot tell the format from keys {sorted(row)}: expected 'messages' (openai), "
        "'conversations' (sharegpt), 'instruction' + 'output' (alpaca) or 'text' (document); "
        "pass format= explicitly",
    )


def to_messages(row: Mapping[str, Any], format: str = "auto") -> Conversation:
    """Convert one row of `format` (or of the format its keys suggest) into a conversation."""
    if not isinstance(row, Mapping):
        raise DataError("not_an_object", f"row must be a JSON object, got {type(row).__name__}")
    if format == "auto":
        format = detect_format(row)
    if format not in CONVERTERS:
        raise ValueError(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)} or 'auto'")
    return CONVERTERS[format](row)


def validate_conversation(messages: Sequence[Mapping[str, Any]], key: str = "messages") -> Conversation:
    """Check the rules every training conversation obeys; return it as a list, or raise DataError.

    `key` names the field that holds the conversation, for the error message.
    """
    if not messages:
        raise DataError("empty_conversation", f"{key!r} holds no messages")
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError("unknown_role", f"message {i} of {key!r} has unknown role {role!r}")
        if not isinstance(content, str):
            raise DataError("wrong_type", f"message {i} of {key!r}: content must be str")
        if role == "system" and i != 0:
            raise DataError("misplaced_system", f"message {i} of {key!r} is a system message; only the first may be")
        if role == "assistant" and not content.strip():
            raise DataError("empty_assistant", f"message {i} of {key!r} is an empty assistant turn")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError("no_assistant_turn", f"{key!r} has no assistant turn to train on")
    if messages[-1]["role"] != "assistant":
        raise DataError(
            "not_ending_with_assistant",
            f"{key!r} ends with a {messages[-1]['role']} turn; it must end with an assistant turn",
        )
    return [dict(message) for message in messages]  # type: ignore[misc]


def user_text(message: Mapping[str, Any]) -> str:
    """A user turn's content with its Alpaca ``input`` (if any) joined after a blank line."""
    extra = message.get("input")
    return f"{message['content']}\n\n{extra}" if extra else message["content"]
