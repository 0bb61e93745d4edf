"""Prompt templates: render a conversation into text segments marked trained or not.

A template turns messages into a list of :class:`Segment` ``(text, trained)``. The tokenizer step
tokenizes each segment on its own and masks the untrained ones, so a template decides exactly
which characters the model learns: the assistant content and the end-of-turn marker after it.

Registered templates (pick one by name in a recipe):

``world``
    RWKV World chat: ``System: ...\\n\\n`` (optional), then ``User: ...\\n\\nAssistant: ...\\n\\n`` per
    exchange. The model learns the trailing ``\\n\\n`` of each assistant turn as end-of-turn.
``g1``
    RWKV-7 G-series chat: the ``world`` form under the name the G-series model cards use.
``plain``
    Contents verbatim (documents for long-context training); assistant text is trained.
``world_instruction``
    World instruction form ``Instruction: ...\\n\\nInput: ...\\n\\nResponse: ...\\n\\n`` (single turn).
``raven_instruction``
    Raven (RWKV-4, Pile tokenizer) instruction form
    ``# Instruction:\\n...\\n\\n# Input:\\n...\\n\\n# Response:\\n...\\n\\n``.
``raven_chat``
    Raven chat ``Bob: ...\\n\\nAlice: ...\\n\\n``; the model cards warn against this for World models.

In every template ``\\n\\n`` ends a turn, so runs of newlines inside a message are collapsed to a
single ``\\n`` and contents are stripped of surrounding whitespace.

Every template also renders itself as a Jinja chat template (:meth:`PromptTemplate.chat_template`),
saved as the tokenizer's ``chat_template`` beside every model and adapter we write, so that
``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` returns exactly the prompt
the model was trained with, and so does anything else that reads Hugging Face tokenizers.

The assistant prefix is untrained and ends without a space (``Assistant:``); the trained text
starts with the space (``" Hi\\n\\n"``), which matches how RWKV prompts are written for
generation (a prompt must not end with a space).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

from rwkv_ft.data.messages import user_text

TURN_END = "\n\n"


class Segment(NamedTuple):
    """A piece of rendered text; ``trained`` pieces get labels, the rest are masked with -100."""

    text: str
    trained: bool


class TemplateError(ValueError):
    """A conversation this template cannot render (e.g. multi-turn for an instruction template)."""

    reason = "template_unsupported"


def flatten_turn(text: str) -> str:
    """Normalize a message for a template where ``\\n\\n`` ends a turn: use ``\\n`` line ends, strip
    it and collapse every run of newlines into one ``\\n`` (the `_FLAT` Jinja macro does the same)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    while TURN_END in text:
        text = text.replace(TURN_END, "\n")
    return text


# Jinja twins of the Python helpers, for chat templates (transformers' sandbox has no regex).
# 16 halvings collapse any newline run up to 65,536 long, as `flatten_turn` does.
_FLAT = (
    "{%- macro flat(text) -%}"
    "{%- set ns = namespace(t=text.replace('\\r\\n', '\\n').replace('\\r', '\\n').strip()) -%}"
    "{%- for i in range(16) -%}{%- set ns.t = ns.t.replace('\\n\\n', '\\n') -%}{%- endfor -%}"
    "{{- ns.t -}}"
    "{%- endmacro -%}"
    "{%- macro user_text(m) -%}"
    "{{- m['content'] ~ ('\\n\\n' ~ m['input'] if m.get('input') else '') -}}"
    "{%- endmacro -%}"
)


def _jinja_str(text: str) -> str:
    """A Python string as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


class PromptTemplate:
    """Base class: subclasses set ``name`` and implement :meth:`render`."""

    name: ClassVar[str] = ""

    def render(self, messages: Sequence[Mapping[str, Any]]) -> list[Segment]:
        """Render a whole training conversation (ending with an assistant turn)."""
        raise NotImplementedError

    def generation_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The text to feed the model to generate the next assistant turn after `messages`
        (which end with a user turn): the same prefix as training uses, without the answer."""
        placeholder = {"role": "assistant", "content": "x"}
        segments = self.render([*messages, placeholder])
        # The last trained segment is the placeholder answer; everything before it is the prompt.
        last = max(i for i, segment in enumerate(segments) if segment.trained)
        return "".join(segment.text for segment in segments[:last])

    def render_text(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The rendered conversation as one string (for inspection and tests)."""
        return "".join(segment.text for segment in self.render(messages))

    def chat_template(self) -> str:
        """This template as a Jinja chat template for ``tokenizer.chat_template``: rendering a
        conversation gives :meth:`render_text`, ``add_generation_prompt=True`` after a user turn
        gives :meth:`generation_prompt`."""
        raise NotImplementedError


class ChatTemplate(PromptTemplate):
    """``{Name}: content\\n\\n`` per turn, with a per-role speaker name."""

    speakers: ClassVar[dict[str, str]] = {}

    def render(self, messages: Sequence[Mapping[str, Any]]) -> list[Segment]:
        segments: list[Segment] = []
        for message in messages:
            role = message["role"]
            if role == "assistant":
                segments.append(Segment(f"{self.speakers['assistant']}:", False))
                segments.append(Segment(f" {flatten_turn(message['content'])}{TURN_END}", True))
            else:
                content = user_text(message) if role == "user" else message["content"]
                segments.append(Segment(self.format_prompt_turn(role, flatten_turn(content)), False))
        return _merge_adjacent(segments)

    def format_prompt_turn(self, role: str, content: str) -> str:
        return f"{self.speakers[role]}: {content}{TURN_END}"

    def chat_template(self) -> str:
        turn = _jinja_str(TURN_END)
        branches = []
        for role in ("system", "user"):
            text = "user_text(message)" if role == "user" else "message['content']"
            if role in self.speakers:
                body = f"{{{{- {_jinja_str(self.speakers[role] + ': ')} ~ flat({text}) ~ {turn} -}}}}"
            else:  # no speaker for this role: a plain first paragraph (Raven's system prompt)
                body = f"{{{{- flat({text}) ~ {turn} -}}}}"
            branches.append(f"{{%- {'if' if not branches else 'elif'} message['role'] == '{role}' -%}}{body}")
        assistant = _jinja_str(self.speakers["assistant"] + ":")
        answer = f"{{{{- {assistant} ~ ' ' ~ flat(message['content']) ~ {turn} -}}}}"
        branches.append(f"{{%- elif message['role'] == 'assistant' -%}}{answer}")
        return (
            _FLAT
            + "{%- for message in messages -%}"
            + "".join(branches)
            + "{%- endif -%}{%- endfor -%}"
            + f"{{%- if add_generation_prompt -%}}{{{{- {assistant} -}}}}{{%- endif -%}}"
        )


class WorldChatTemplate(ChatTemplate):
    name = "world"
    speakers = {"system": "System", "user": "User", "assistant": "Assistant"}


class G1ChatTemplate(WorldChatTemplate):
    """RWKV-7 G-series chat: ``System: ...\\n\\nUser: ...\\n\\nAssistant: ...`` (the World chat form;
    reasoning replies start with ``<think``, trained like any other reply text)."""

    name = "g1"


class PlainTemplate(PromptTemplate):
    """Contents verbatim, nothing added or normalised: documents for long-context training (the
    `document` format gives one assistant message, all of it trained); in conversations only the
    assistant messages are trained."""

    name = "plain"

    def render(self, messages: Sequence[Mapping[str, Any]]) -> list[Segment]:
        segments = [Segment(m["content"], m["role"] == "assistant") for m in messages]
        return _merge_adjacent([s for s in segments if s.text])

    def generation_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return "".join(m["content"] for m in messages)

    def chat_template(self) -> str:
        return "{%- for message in messages -%}{{- message['content'] -}}{%- endfor -%}"


class RavenChatTemplate(ChatTemplate):
    """Raven chat; Raven has no system speaker, so a system message is a plain first paragraph."""

    name = "raven_chat"
    speakers = {"user": "Bob", "assistant": "Alice"}

    def format_prompt_turn(self, role: str, content: str) -> str:
        return f"{content}{TURN_END}" if role == "system" else super().format_prompt_turn(role, content)


class InstructionTemplate(PromptTemplate):
    """Single-turn instruction/input/response; a system message becomes a plain first paragraph."""

    instruction_header: ClassVar[str] = ""
    input_header: ClassVar[str] = ""
    response_header: ClassVar[str] = ""
    # Separator after the response header; the World form puts the space in the trained text.
    answer_prefix: ClassVar[str] = ""

    def render(self, messages: Sequence[Mapping[str, Any]]) -> list[Segment]:
        system, exchange = _split_system(messages)
        roles = [message["role"] for message in exchange]
        if roles != ["user", "assistant"]:
            raise TemplateError(
                f"template {self.name!r} renders one user turn followed by one assistant turn, got roles "
                f"{roles}; use the 'world' chat template for multi-turn conversations"
            )
        user, assistant = exchange
        prompt = f"{flatten_turn(system)}{TURN_END}" if system else ""
        prompt += f"{self.instruction_header}{flatten_turn(user['content'])}{TURN_END}"
        if user.get("input"):
            prompt += f"{self.input_header}{flatten_turn(user['input'])}{TURN_END}"
        prompt += self.response_header
        answer = f"{self.answer_prefix}{flatten_turn(assistant['content'])}{TURN_END}"
        return [Segment(prompt, False), Segment(answer, True)]

    def chat_template(self) -> str:
        turn = _jinja_str(TURN_END)
        one_exchange = (
            "{%- set ns = namespace(system='', users=[], answers=[]) -%}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'system' and loop.first -%}{%- set ns.system = message['content'] -%}"
            "{%- elif message['role'] == 'user' -%}{%- set ns.users = ns.users + [message] -%}"
            "{%- elif message['role'] == 'assistant' -%}{%- set ns.answers = ns.answers + [message] -%}"
            "{%- else -%}{{- raise_exception('a system message may only come first') -}}"
            "{%- endif -%}{%- endfor -%}"
            f"{{%- if ns.users | length != 1 or ns.answers | length > 1 -%}}"
            f"{{{{- raise_exception('template {self.name} renders one user turn and at most one assistant turn; "
            "use the world chat template for multi-turn conversations') -}}"
            "{%- endif -%}"
        )
        header = (
            f"{{%- if ns.system -%}}{{{{- flat(ns.system) ~ {turn} -}}}}{{%- endif -%}}"
            f"{{{{- {_jinja_str(self.instruction_header)} ~ flat(ns.users[0]['content']) ~ {turn} -}}}}"
            f"{{%- if ns.users[0].get('input') -%}}"
            f"{{{{- {_jinja_str(self.input_header)} ~ flat(ns.users[0]['input']) ~ {turn} -}}}}{{%- endif -%}}"
        )
        response = _jinja_str(self.response_header + self.answer_prefix)
        answer = (
            "{%- if ns.answers -%}"
            f"{{{{- {response} ~ flat(ns.answers[0]['content']) ~ {turn} -}}}}"
            f"{{%- elif add_generation_prompt -%}}{{{{- {_jinja_str(self.response_header)} -}}}}"
            "{%- endif -%}"
        )
        return _FLAT + one_exchange + header + answer


class WorldInstructionTemplate(InstructionTemplate):
    name = "world_instruction"
    instruction_header = "Instruction: "
    input_header = "Input: "
    response_header = "Response:"
    answer_prefix = " "


class RavenInstructionTemplate(InstructionTemplate):
    name = "raven_instruction"
    instruction_header = "# Instruction:\n"
    input_header = "# Input:\n"
    response_header = "# Response:\n"


_REGISTRY: dict[str, type[PromptTemplate]] = {}


def register_template(template: type[PromptTemplate]) -> type[PromptTemplate]:
    """Register a template class under its ``name`` (usable as a class decorator)."""
    if not template.name:
        raise ValueError(f"{template.__name__} must set a non-empty class attribute 'name'")
    if template.name in _REGISTRY and _REGISTRY[template.name] is not template:
        raise ValueError(f"a template named {template.name!r} is already registered")
    _REGISTRY[template.name] = template
    return template


def get_template(name: str | PromptTemplate) -> PromptTemplate:
    """An instance of the template registered as `name` (a template instance is returned as is)."""
    if isinstance(name, PromptTemplate):
        return name
    if name not in _REGISTRY:
        raise KeyError(f"unknown prompt template {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def list_templates() -> list[str]:
    """Names of the registered templates."""
    return sorted(_REGISTRY)


for _template in (
    WorldChatTemplate,
    G1ChatTemplate,
    WorldInstructionTemplate,
    RavenInstructionTemplate,
    RavenChatTemplate,
    PlainTemplate,
):
    register_template(_template)


def _split_system(messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[Mapping[str, Any]]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], list(messages[1:])
    return "", list(messages)


def _merge_adjacent(segments: list[Segment]) -> list[Segment]:
    """Join neighbouring segments with the same mask, so each prompt is tokenized in one piece."""
    merged: list[Segment] = []
    for segment in segments:
        if merged and merged[-1].trained == segment.trained:
            merged[-1] = Segment(merged[-1].text + segment.text, segment.trained)
        else:
            merged.append(segment)
    return merged
