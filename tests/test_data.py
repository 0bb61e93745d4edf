"""Tests of the instruction-tuning data pipeline (rwkv_ft.data), self-contained and CPU-only."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import pytest
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rwkv_ft.data import (
    IGNORE_INDEX,
    DataError,
    LengthGroupedSampler,
    PromptTemplate,
    Segment,
    SFTDataCollator,
    TemplateError,
    alpaca_to_messages,
    detect_format,
    get_template,
    group_by_length,
    list_templates,
    load_conversations,
    openai_to_messages,
    pack_examples,
    prepare_sft_data,
    register_template,
    sharegpt_to_messages,
    tokenize_conversation,
    tokenize_dataset,
    train_eval_split,
)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SAMPLE_FILES = ["alpaca_sample.jsonl", "sharegpt_sample.json", "messages_sample.jsonl"]

GOOD_OPENAI_ROW = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green, like\n\ngrass."},
]


# ---------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained in memory on the sample data: lossless on any text."""
    texts = []
    for name in SAMPLE_FILES:
        texts += [json.dumps(row, ensure_ascii=False) for row in _raw_rows(DATA_DIR / name)]
    texts += ["User: Assistant: System: Instruction: Input: Response: # Instruction:\n Bob: Alice:"] * 20
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    model.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", eos_token="<eos>", clean_up_tokenization_spaces=False
    )


def _raw_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _write_jsonl(path: Path, lines: list[str | dict]) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
        encoding="utf-8",
    )
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trained_spans(tokenizer, example: dict) -> list[str]:
    """Decoded text of each contiguous run of trained labels."""
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(span) for span in spans]


def _strip_none(messages: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


# ---------------------------------------------------------------------------- converters


def test_alpaca_converter_with_and_without_input():
    assert alpaca_to_messages({"instruction": "Add 2 and 3.", "input": "", "output": "5"}) == [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "5"},
    ]
    assert alpaca_to_messages({"instruction": "Translate.", "input": "Hola", "output": "Hello", "system": "S"}) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Translate.", "input": "Hola"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert alpaca_to_messages({"instruction": "Q", "output": "A", "input": None})[0] == {
        "role": "user",
        "content": "Q",
    }


def test_sharegpt_converter_maps_speakers():
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "a"},
            {"from": "gpt", "value": "b"},
            {"from": "user", "value": "c"},
            {"from": "assistant", "value": "d"},
        ]
    }
    assert sharegpt_to_messages(row) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]


def test_openai_converter_ignores_extra_keys():
    row = {
        "id": 7,
        "messages": [{"role": "user", "content": "x", "name": "ann"}, {"role": "assistant", "content": "y"}],
    }
    assert openai_to_messages(row) == [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y"},
    ]


def test_detect_format():
    assert detect_format(GOOD_OPENAI_ROW) == "openai"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"instruction": "", "output": ""}) == "alpaca"
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format({"prompt": "x", "completion": "y"})


# ---------------------------------------------------------------------------- validation

BAD_ROWS = {
    "malformed_json": '{"messages": [',
    "not_an_object": "[1, 2]",
    "missing_field": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]},
    "wrong_type": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 3}]},
    "unknown_role": {"messages": [{"role": "bot", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
    "empty_assistant": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
    "no_assistant_turn": {"messages": [{"role": "user", "content": "Hi"}]},
    "not_ending_with_assistant": {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hey"},
            {"role": "user", "content": "Bye"},
        ]
    },
    "misplaced_system": {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "system", "content": "S"},
            {"role": "assistant", "content": "Hey"},
        ]
    },
    "empty_conversation": {"messages": []},
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_strict_load_names_file_line_and_reason(tmp_path, reason):
    # Line 2 is blank on purpose: line numbers are physical lines of the file.
    path = _write_jsonl(tmp_path / "bad.jsonl", [GOOD_OPENAI_ROW, "", BAD_ROWS[reason], GOOD_OPENAI_ROW])
    with pytest.raises(DataError) as caught:
        load_conversations(path)
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.reason, error.source, error.location) == (reason, str(path), "line 3")
    assert str(path) in str(error) and "line 3" in str(error)


def test_strict_errors_name_the_key(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [GOOD_OPENAI_ROW, BAD_ROWS["missing_field"]])
    with pytest.raises(DataError, match=r"missing key 'messages\[1\]\.content'"):
        load_conversations(path)
    alpaca = _write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x"}])
    with pytest.raises(DataError, match=r"line 2: missing key 'output'"):
        load_conversations(alpaca)
    sharegpt = tmp_path / "sg.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "bot", "value": "x"}]}]))
    with pytest.raises(DataError, match=r"element 0: key 'conversations\[0\]\.from' has unknown speaker 'bot'"):
        load_conversations(sharegpt)


def test_non_strict_load_skips_and_counts(tmp_path, caplog):
    lines = [GOOD_OPENAI_ROW]
    for bad in BAD_ROWS.values():
        lines += [bad, GOOD_OPENAI_ROW]
    lines += [BAD_ROWS["unknown_role"]]
    path = _write_jsonl(tmp_path / "mixed.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="rwkv_ft.data"):
        result = load_conversations(path, strict=False)
    expected = {reason: 1 for reason in BAD_ROWS} | {"unknown_role": 2}
    assert result.skipped == expected
    assert result.num_skipped == len(BAD_ROWS) + 1
    assert len(result.dataset) == len(BAD_ROWS) + 1
    assert result.dataset["origin"][:3] == [f"{path}, line 1", f"{path}, line 3", f"{path}, line 5"]
    assert [p.location for p in result.problems][:2] == ["line 2", "line 4"]
    assert "skipped 11 of 22 rows" in caplog.text and "unknown_role=2" in caplog.text


def test_json_array_errors_carry_element_index(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}]},
        {"conversations": "not a list"},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError) as caught:
        load_conversations(path)
    assert (caught.value.reason, caught.value.location) == ("no_assistant_turn", "element 1")
    result = load_conversations(path, strict=False)
    assert result.skipped == {"no_assistant_turn": 1, "wrong_type": 1}
    assert [p.location for p in result.problems] == ["element 1", "element 2"]


def test_malformed_json_file_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": \n]')
    with pytest.raises(DataError, match=r"broken\.json, line 4: malformed JSON"):
        load_conversations(path, strict=False)


def test_unknown_first_row_format_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=r"odd\.jsonl, line 1: cannot tell the format"):
        load_conversations(path)


def test_explicit_format_overrides_detection(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [GOOD_OPENAI_ROW])
    with pytest.raises(DataError, match="missing key 'instruction'"):
        load_conversations(path, format="alpaca")


def test_parquet_rows_are_located_by_index(tmp_path):
    path = tmp_path / "a.parquet"
    Dataset.from_list(
        [
            {"instruction": "Say hi", "input": None, "output": "Hi"},
            {"instruction": "Q", "input": "x", "output": ""},
        ]
    ).to_parquet(str(path))
    result = load_conversations(path, strict=False)
    assert result.skipped == {"empty_assistant": 1}
    assert result.problems[0].location == "row 1"
    assert _strip_none(result.dataset[0]["messages"]) == [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "Hi"},
    ]


def test_hub_failure_message_is_clear(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not load dataset 'org/set' .*from the Hub: .*pass a local"):
        load_conversations("org/set")


def test_missing_local_file(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_conversations(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_sample_files_load_strictly_and_stay_unchanged(name):
    path = DATA_DIR / name
    before = _sha256(path)
    result = load_conversations(path)
    assert result.skipped == {} and len(result.dataset) >= 20
    assert _sha256(path) == before


def test_sample_files_cover_system_prompts_and_multi_turn():
    for name in ("sharegpt_sample.json", "messages_sample.jsonl"):
        conversations = load_conversations(DATA_DIR / name).dataset["messages"]
        assert any(c[0]["role"] == "system" for c in conversations)
        assert any(sum(m["role"] == "assistant" for m in c) > 1 for c in conversations)


def test_all_rows_bad_gives_an_empty_dataset(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", ["[1]", BAD_ROWS["empty_assistant"]])
    result = load_conversations(path, strict=False)
    assert result.dataset.num_rows == 0 and result.dataset.column_names == ["messages", "origin"]
    assert result.skipped == {"not_an_object": 1, "empty_assistant": 1}


def test_non_strict_load_leaves_bad_file_unchanged(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [GOOD_OPENAI_ROW, BAD_ROWS["malformed_json"]])
    before = _sha256(path)
    load_conversations(path, strict=False)
    assert _sha256(path) == before


# ---------------------------------------------------------------------------- templates


def test_registered_templates():
    assert {"world", "world_instruction", "raven_instruction", "raven_chat"} <= set(list_templates())
    with pytest.raises(KeyError, match="unknown prompt template 'nope'"):
        get_template("nope")


def test_world_template_renders_multi_turn_exactly():
    expected = (
        "System: Be brief.\n\n"
        "User: Name a color.\n\n"
        "Assistant: Blue.\n\n"
        "User: Another one?\n\n"
        "Assistant: Green, like\ngrass.\n\n"
    )
    template = get_template("world")
    assert template.render_text(MULTI_TURN) == expected
    assert template.render(MULTI_TURN) == [
        Segment("System: Be brief.\n\nUser: Name a color.\n\nAssistant:", False),
        Segment(" Blue.\n\n", True),
        Segment("User: Another one?\n\nAssistant:", False),
        Segment(" Green, like\ngrass.\n\n", True),
    ]


def test_world_template_flattens_blank_lines_and_joins_alpaca_input():
    messages = [
        {"role": "user", "content": "  Fix this:\r\n\r\n\n", "input": "a\n\n\nb"},
        {"role": "assistant", "content": "Done.\n\n"},
    ]
    assert get_template("world").render_text(messages) == "User: Fix this:\na\nb\n\nAssistant: Done.\n\n"


def test_g1_template_is_the_g_series_chat_form_and_trains_thinking_replies():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "<think>\nshort\n</think> Because."},
    ]
    template = get_template("g1")
    assert template.generation_prompt(messages[:2]) == "System: Be brief.\n\nUser: Why?\n\nAssistant:"
    assert template.render(messages) == [
        Segment("System: Be brief.\n\nUser: Why?\n\nAssistant:", False),
        Segment(" <think>\nshort\n</think> Because.\n\n", True),
    ]


def test_world_generation_prompt_matches_training_prefix():
    prompt = get_template("world").generation_prompt(MULTI_TURN[:2])
    assert prompt == "System: Be brief.\n\nUser: Name a color.\n\nAssistant:"


def test_world_instruction_template():
    template = get_template("world_instruction")
    with_input = [
        {"role": "user", "content": "Translate.", "input": "Hola"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert template.render_text(with_input) == "Instruction: Translate.\n\nInput: Hola\n\nResponse: Hello\n\n"
    without = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi"}]
    assert template.render(without) == [
        Segment("Instruction: Say hi.\n\nResponse:", False),
        Segment(" Hi\n\n", True),
    ]


def test_raven_instruction_template():
    template = get_template("raven_instruction")
    messages = [
        {"role": "system", "content": "Answer well."},
        {"role": "user", "content": "Translate.", "input": "Hola"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert template.render(messages) == [
        Segment("Answer well.\n\n# Instruction:\nTranslate.\n\n# Input:\nHola\n\n# Response:\n", False),
        Segment("Hello\n\n", True),
    ]


def test_raven_chat_template():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert get_template("raven_chat").render_text(messages) == "Bob: Hi\n\nAlice: Hello\n\n"


def test_instruction_templates_refuse_multi_turn():
    with pytest.raises(TemplateError, match="use the 'world' chat template"):
        get_template("world_instruction").render(MULTI_TURN)


def test_register_custom_template():
    class Plain(PromptTemplate):
        name = "test_plain"

        def render(self, messages):
            return [Segment(messages[0]["content"], False), Segment(messages[1]["content"], True)]

    register_template(Plain)
    assert get_template("test_plain").render_text(GOOD_OPENAI_ROW["messages"]) == "HiHello!"
    with pytest.raises(ValueError, match="already registered"):
        register_template(type("Other", (Plain,), {}))


# ---------------------------------------------------------------------------- tokenize and mask


def test_masking_trains_exactly_the_assistant_turns(tokenizer):
    example, reason = tokenize_conversation(MULTI_TURN, tokenizer, "world", max_length=512)
    assert reason is None
    assert len(example["input_ids"]) == len(example["labels"])
    assert tokenizer.decode(example["input_ids"]) == get_template("world").render_text(MULTI_TURN)
    assert _trained_spans(tokenizer, example) == [" Blue.\n\n", " Green, like\ngrass.\n\n"]


def test_append_eos_trains_the_eos_token(tokenizer):
    example, _ = tokenize_conversation(MULTI_TURN, tokenizer, "world", max_length=512, append_eos=True)
    assert example["input_ids"][-1] == example["labels"][-1] == tokenizer.eos_token_id
    assert _trained_spans(tokenizer, example) == [" Blue.\n\n", " Green, like\ngrass.\n\n<eos>"]
    assert tokenizer.bos_token_id is None or tokenizer.bos_token_id not in example["input_ids"]


def test_instruction_masking(tokenizer):
    messages = [
        {"role": "user", "content": "Translate.", "input": "Hola"},
        {"role": "assistant", "content": "Hello"},
    ]
    example, _ = tokenize_conversation(messages, tokenizer, "raven_instruction", max_length=512)
    assert _trained_spans(tokenizer, example) == ["Hello\n\n"]


def test_truncation_keeps_partial_answers_and_drops_answerless_rows(tokenizer):
    full, _ = tokenize_conversation(MULTI_TURN, tokenizer, "world", max_length=512)
    first_trained = next(i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    cut, reason = tokenize_conversation(MULTI_TURN, tokenizer, "world", max_length=first_trained + 1)
    assert reason is None and len(cut["input_ids"]) == first_trained + 1
    assert cut["input_ids"] == full["input_ids"][: first_trained + 1]
    assert tokenize_conversation(MULTI_TURN, tokenizer, "world", max_length=first_trained) == (
        None,
        "assistant_truncated_away",
    )
    dropped = tokenize_conversation(MULTI_TURN, tokenizer, "world", max_length=first_trained + 1, truncation="drop")
    assert dropped == (None, "too_long")


def test_tokenize_dataset_counts_truncation_drops(tokenizer):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    dataset = Dataset.from_list(
        [{"messages": m, "origin": f"row {i}"} for i, m in enumerate([short, long, short, long, long])]
    )
    result = tokenize_dataset(dataset, tokenizer, "world", max_length=64)
    assert result.skipped == {"assistant_truncated_away": 3}
    assert result.dataset["origin"] == ["row 0", "row 2"]
    assert set(result.dataset.column_names) == {"input_ids", "labels", "length", "origin"}
    assert result.dataset["length"] == [len(ids) for ids in result.dataset["input_ids"]]


def test_tokenize_dataset_template_errors(tokenizer):
    dataset = Dataset.from_list([{"messages": MULTI_TURN, "origin": "f.jsonl, line 9"}])
    with pytest.raises(DataError, match=r"f\.jsonl, line 9: template 'world_instruction'"):
        tokenize_dataset(dataset, tokenizer, "world_instruction", max_length=128)
    lenient = tokenize_dataset(dataset, tokenizer, "world_instruction", max_length=128, strict=False)
    assert lenient.skipped == {"template_unsupported": 1} and len(lenient.dataset) == 0


def test_loaded_alpaca_input_reaches_instruction_template(tokenizer):
    result = load_conversations(DATA_DIR / "alpaca_sample.jsonl")
    tokenized = tokenize_dataset(result.dataset, tokenizer, "world_instruction", max_length=1024)
    assert len(tokenized.dataset) == len(result.dataset)
    texts = [tokenizer.decode(ids) for ids in tokenized.dataset["input_ids"]]
    assert sum("\n\nInput: " in text for text in texts) > 5
    assert all(text.startswith("Instruction: ") for text in texts)


# ---------------------------------------------------------------------------- packing


def _example(length: int, start_token: int) -> dict:
    ids = list(range(start_token, start_token + length))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]}


def _split_packed(row: dict) -> list[list[int]]:
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [row["input_ids"][a:b] for a, b in zip(starts, starts[1:], strict=False)]


def test_packing_boundaries_positions_and_labels():
    lengths = [5, 3, 8, 2, 7, 4, 6, 1 + 1]
    examples = [_example(n, 1000 * (i + 1)) for i, n in enumerate(lengths)]
    examples[0]["labels"][0] = 1000  # a trained first token must still be masked once packed
    packed = pack_examples(examples, max_length=10)
    seen = []
    for row in packed:
        assert row["length"] == len(row["input_ids"]) <= 10
        assert len(row["labels"]) == len(row["position_ids"]) == row["length"]
        pieces = _split_packed(row)
        assert len(pieces) == row["num_examples"]
        start = 0
        for piece in pieces:
            assert row["position_ids"][start : start + len(piece)] == list(range(len(piece)))
            assert row["labels"][start] == IGNORE_INDEX
            assert row["labels"][start + 1 : start + len(piece)] == piece[1:]
            start += len(piece)
        seen += pieces
    # Every example appears exactly once and whole.
    assert sorted(map(tuple, seen)) == sorted(tuple(e["input_ids"]) for e in examples)
    assert len(packed) == 4  # 37 tokens need at least 4 rows of 10; best-fit reaches that


def test_packing_is_deterministic_and_cuts_overlong_examples():
    examples = [_example(n, 100 * (i + 1)) for i, n in enumerate([4, 15, 3, 6])]
    first = pack_examples(examples, max_length=8)
    assert first.to_list() == pack_examples(examples, max_length=8).to_list()
    own_row = [row for row in first if row["input_ids"][0] == 200]
    assert own_row[0]["input_ids"] == list(range(200, 208)) and own_row[0]["num_examples"] == 1
    # An over-long example whose kept part has no trained token is left out.
    prompt_only = {"input_ids": list(range(12)), "labels": [IGNORE_INDEX] * 10 + [10, 11]}
    assert pack_examples([prompt_only], max_length=8).num_rows == 0


# ---------------------------------------------------------------------------- collator


def test_collator_pads_right():
    collator = SFTDataCollator(pad_token_id=0)
    batch = collator(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "origin": "x"}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "position_ids" not in batch and "origin" not in batch


def test_collator_pads_packed_rows_and_rounds_up():
    collator = SFTDataCollator(pad_token_id=9, pad_to_multiple_of=4)
    rows = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, -100, 4, 5], "position_ids": [0, 1, 0, 1, 2]},
        {"input_ids": [6, 7], "labels": [-100, 7], "position_ids": [0, 1]},
    ]
    batch = collator(rows)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert batch["input_ids"][1].tolist() == [6, 7, 9, 9, 9, 9, 9, 9]


def test_collator_from_tokenizer(tokenizer):
    collator = SFTDataCollator.from_tokenizer(tokenizer, return_position_ids=True)
    assert collator.pad_token_id == tokenizer.pad_token_id
    batch = collator([{"input_ids": [3, 4], "labels": [3, 4]}, {"input_ids": [5], "labels": [5]}])
    assert batch["position_ids"].tolist() == [[0, 1], [0, 1]]


# ---------------------------------------------------------------------------- length grouping and split


def test_group_by_length_order():
    lengths = [(i * 37) % 101 for i in range(200)]
    order = group_by_length(lengths, batch_size=4, seed=3, mega_batch_mult=5)
    assert sorted(order) == list(range(200))
    assert order == group_by_length(lengths, batch_size=4, seed=3, mega_batch_mult=5)
    assert order != group_by_length(lengths, batch_size=4, seed=4, mega_batch_mult=5)
    assert max(lengths) in [lengths[i] for i in order[:4]]
    for start in range(0, 200, 20):
        # Lengths decrease inside each mega-batch; only a mega-batch's first (longest) element may
        # have been swapped with the overall longest one, which opens the order.
        chunk = [lengths[i] for i in order[start : start + 20]]
        assert chunk[1:] == sorted(chunk[1:], reverse=True)
    shuffled = list(range(200))
    random.Random(0).shuffle(shuffled)
    assert _batch_spread(lengths, order, 4) < _batch_spread(lengths, shuffled, 4) / 2


def _batch_spread(lengths: list[int], order: list[int], batch_size: int) -> int:
    """Sum over batches of (longest - shortest): the padding that batching in this order costs."""
    batches = [[lengths[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]
    return sum(max(batch) - min(batch) for batch in batches)


def test_length_grouped_sampler_epochs():
    sampler = LengthGroupedSampler(list(range(50)), batch_size=5, seed=1, mega_batch_mult=2)
    first = list(sampler)
    assert list(sampler) == first and len(sampler) == 50
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_train_eval_split_sizes_and_determinism():
    dataset = Dataset.from_list([{"x": i} for i in range(50)])
    train, evaluation = train_eval_split(dataset, eval_fraction=0.1, seed=7)
    assert (len(train), len(evaluation)) == (45, 5)
    assert sorted(list(train["x"]) + list(evaluation["x"])) == list(range(50))
    again_train, again_eval = train_eval_split(dataset, eval_fraction=0.1, seed=7)
    assert list(again_eval["x"]) == list(evaluation["x"]) and list(again_train["x"]) == list(train["x"])
    assert list(train_eval_split(dataset, eval_fraction=0.1, seed=8)[1]["x"]) != list(evaluation["x"])
    small_train, small_eval = train_eval_split(list(range(10)), eval_size=3, seed=0)
    assert len(small_train) == 7 and len(small_eval) == 3
    assert len(train_eval_split(list(range(10)), eval_fraction=0.01)[1]) == 1
    with pytest.raises(ValueError, match="exactly one"):
        train_eval_split(dataset, eval_fraction=0.1, eval_size=3)
    with pytest.raises(ValueError, match="eval_size"):
        train_eval_split(dataset, eval_size=50)


# ---------------------------------------------------------------------------- end to end


def test_prepare_sft_data_end_to_end(tokenizer):
    data = prepare_sft_data(
        DATA_DIR / "sharegpt_sample.json", tokenizer, max_length=256, pack=True, eval_size=4, seed=0
    )
    assert len(data.eval) == 4
    assert set(data.skipped) <= {"assistant_truncated_away"}
    assert all(length <= 256 for length in data.train["length"])
    batch = SFTDataCollator.from_tokenizer(tokenizer)(data.train.select(range(2)).to_list())
    assert batch["position_ids"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["position_ids"] == 0] == IGNORE_INDEX).all()
    packed_examples = sum(data.train["num_examples"])
    assert packed_examples + len(data.eval) + sum(data.skipped.values()) == 20
    assert max(data.train["num_examples"]) > 1


def test_world_tokenizer_renders_and_masks_a_sample():
    from rwkv_ft.tokenizers import RwkvWorldTokenizer

    tokenizer = RwkvWorldTokenizer()
    conversation = _strip_none(load_conversations(DATA_DIR / "sharegpt_sample.json").dataset[0]["messages"])
    example, reason = tokenize_conversation(conversation, tokenizer, "world", max_length=4096, append_eos=True)
    assert reason is None
    answers = [m["content"].replace("\n\n", "\n") for m in conversation if m["role"] == "assistant"]
    spans = _trained_spans(tokenizer, example)
    assert spans[:-1] == [f" {a}\n\n" for a in answers[:-1]]
    assert spans[-1].startswith(f" {answers[-1]}\n\n")
    assert example["input_ids"][-1] == tokenizer.eos_token_id == 0
    assert tokenizer.decode(example["input_ids"][:-1]) == get_template("world").render_text(conversation)
