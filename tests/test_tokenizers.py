"""rwkv_ft.tokenizers: World tokenizer vs. the TRIE_TOKENIZER oracle, NeoX loader, load_tokenizer."""

from __future__ import annotations

import json
import pickle
import random

import pytest
from transformers import PreTrainedTokenizerFast

from rwkv_ft.tokenizers import (
    DEFAULT_VOCAB_FILE,
    VOCAB_FILE_NAME,
    RwkvWorldTokenizer,
    load_neox_tokenizer,
    load_tokenizer,
)
from rwkv_ft.tokenizers import neox as neox_module

rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer", reason="BlinkDL's rwkv package is the oracle")

EOT = "<|endoftext|>"

SAMPLES = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.\n",
    "\n\n",
    "\n\n\n\n\n\n\n",
    "a\n\nb\n\n\nc\r\n\r\nd\t\te",
    " " * 300 + "x" + " " * 129,
    "人工智能是计算机科学的一个分支。它企图了解智能的实质，并生产出一种新的能以人类智能相似的方式做出反应的智能机器。",
    "日本語のテキストです。カタカナとひらがな、そして漢字。",
    "مرحبا بالعالم، هذه جملة عربية للاختبار.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "한국어 문장도 시험해 봅시다.",
    "Ελληνικά και עברית και हिन्दी और ไทย",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    '{"key": [1, 2.5, null], "ünïcödé": "\\u00e9"}',
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇯🇵 keycap 1️⃣ 🫠",
    "combining: e\u0301 a\u0308 n\u0303; zero-width:\u200b\u200d; bom \ufeff",
    "astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀀𠀁 𓀀 \U0010fffd",
    "\x00\x01\x02 control \x7f\x1b[0m",
    "#" * 90 + "-" * 81,
    "User: hi\n\nAssistant: hello\n\nUser: 你好吗？\n\nAssistant:",
]


def _random_text(rng: random.Random) -> str:
    """Random code points from mixed ranges (ASCII, Latin, CJK, BMP, astral), no surrogates."""
    ranges = [
        (0x00, 0x7F),
        (0x80, 0x7FF),
        (0x800, 0xD7FF),
        (0xE000, 0xFFFF),
        (0x4E00, 0x9FFF),
        (0x10000, 0x10FFFF),
    ]
    out = []
    for _ in range(rng.randint(0, 60)):
        if rng.random() < 0.3:
            out.append(rng.choice([" ", "\n", "\n\n", "the ", "的", "。", "  "]))
        else:
            lo, hi = rng.choice(ranges)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


@pytest.fixture(scope="module")
def oracle():
    return rwkv_tokenizer.TRIE_TOKENIZER(str(DEFAULT_VOCAB_FILE))


@pytest.fixture(scope="module")
def tok() -> RwkvWorldTokenizer:
    return RwkvWorldTokenizer()


def _ids(tokenizer, text: str, **kwargs) -> list[int]:
    return tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"]


# -- World tokenizer: encoding ----------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_world_ids_match_oracle(tok, oracle, text):
    expected = oracle.encode(text)
    assert _ids(tok, text) == expected
    assert tok(text)["input_ids"] == expected  # no BOS/EOS added by default
    assert tok.encode(text) == expected
    assert tok.encode_bytes(text.encode("utf-8")) == expected
    assert tok.convert_tokens_to_ids(tok.tokenize(text)) == expected


def test_world_ids_match_oracle_random_text(tok, oracle):
    rng = random.Random(1234)
    for _ in range(400):
        text = _random_text(rng)
        ids = _ids(tok, text)
        assert ids == oracle.encode(text), repr(text)
        assert 0 not in ids  # plain text never produces the end-of-text id
        assert tok.decode(ids) == text


def test_world_random_bytes_match_oracle_and_round_trip(tok, oracle):
    rng = random.Random(99)
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 80)))
        ids = tok.encode_bytes(data)
        assert ids == oracle.encodeBytes(data)
        assert tok.decode_bytes(ids) == data
        assert tok.decode(ids) == data.decode("utf-8", errors="replace")


def test_world_long_text_matches_oracle(tok, oracle):
    text = "".join(SAMPLES) * 20
    assert _ids(tok, text) == oracle.encode(text)


# -- World tokenizer: decoding ----------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_world_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_world_decode_random_ids_never_crashes(tok, oracle):
    rng = random.Random(7)
    for _ in range(300):
        # 65530..65535 are unused ids inside the embedding: they decode to nothing.
        ids = [rng.randint(1, 65535) for _ in range(rng.randint(0, 30))]
        expected = b"".join(oracle.idx2token.get(i, b"") for i in ids)
        assert tok.decode_bytes(ids) == expected
        assert tok.decode(ids) == expected.decode("utf-8", errors="replace")


def test_world_decode_split_utf8_character(tok):
    data = "你好😀".encode()
    byte_ids = [b + 1 for b in data]  # ids 1..256 are the single bytes 0x00..0xff
    assert tok.encode_bytes(b"\xe4") == [0xE4 + 1]
    # Joined before decoding, single-byte tokens of a character give the character back...
    assert tok.decode(byte_ids) == "你好😀"
    assert tok.convert_tokens_to_string(tok.convert_ids_to_tokens(byte_ids)) == "你好😀"
    # ...and a split character decodes with replacement characters instead of raising.
    for cut in range(1, len(byte_ids)):
        head, tail = byte_ids[:cut], byte_ids[cut:]
        assert tok.decode(head) == data[:cut].decode("utf-8", errors="replace")
        assert tok.decode(tail) == data[cut:].decode("utf-8", errors="replace")


def test_world_decode_out_of_range_and_tensor_ids(tok):
    import torch

    assert tok.decode([65535, 70000]) == ""
    ids = tok.encode("tensor ids")
    assert tok.decode(torch.tensor(ids)) == "tensor ids"


# -- World tokenizer: special tokens and sizes ------------------------------------------------------


def test_world_special_tokens(tok, oracle):
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOT
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == 0
    assert tok.unk_token is None
    assert tok.padding_side == "right"
    assert tok("abc")["input_ids"] == oracle.encode("abc")
    # A registered special token in text becomes id 0, with no whitespace stripped around it.
    text = f"a {EOT} b{EOT}"
    assert _ids(tok, text) == oracle.encode("a ") + [0] + oracle.encode(" b") + [0]
    # Asked to treat special tokens as text, the string tokenizes like the oracle does.
    assert _ids(tok, text, split_special_tokens=True) == oracle.encode(text)
    assert tok.decode([0]) == EOT
    assert tok.decode(oracle.encode("hi") + [0], skip_special_tokens=True) == "hi"


def test_world_other_eos_string_is_not_special_in_text(oracle):
    other = RwkvWorldTokenizer(eos_token="</doc>", bos_token="</doc>", pad_token="</doc>")
    assert other.eos_token_id == 0
    assert _ids(other, "x</doc>") == oracle.encode("x") + [0]
    # <|endoftext|> is not registered here, so it is ordinary text.
    assert _ids(other, f"x{EOT}") == oracle.encode(f"x{EOT}")


def test_world_sizes_and_added_tokens():
    tok = RwkvWorldTokenizer()
    assert tok.vocab_size == 65536
    assert len(tok) == 65536
    vocab = tok.get_vocab()
    assert vocab[EOT] == 0 and len(vocab) == 65530
    # New tokens take the unused ids first, so the embedding does not grow for the first six.
    assert tok.add_tokens(["<tool>"]) == 1
    assert tok.convert_tokens_to_ids("<tool>") == 65530
    assert len(tok) == 65536
    assert tok.encode("a<tool>") == [98, 65530]
    assert tok.decode([98, 65530]) == "a<tool>"


def test_world_batch_padding_right(tok):
    batch = tok(["hi", "hello there world"], padding=True)
    short, long = batch["input_ids"]
    assert len(short) == len(long)
    assert short[-1] == 0 and batch["attention_mask"][0][-1] == 0
    assert batch["attention_mask"][0][0] == 1


# -- World tokenizer: persistence -------------------------------------------------------------------


def test_world_save_pretrained_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / VOCAB_FILE_NAME).read_bytes() == DEFAULT_VOCAB_FILE.read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "RwkvWorldTokenizer"
    loaded = RwkvWorldTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES + [f"x{EOT}y"]:
        assert _ids(loaded, text) == _ids(tok, text)
    assert loaded.eos_token_id == loaded.pad_token_id == loaded.bos_token_id == 0
    assert loaded.padding_side == "right"
    assert len(loaded) == 65536
    assert isinstance(load_tokenizer(str(tmp_path)), RwkvWorldTokenizer)


def test_world_save_round_trip_keeps_added_tokens(tmp_path):
    tok = RwkvWorldTokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<sys>"]})
    tok.save_pretrained(tmp_path)
    loaded = RwkvWorldTokenizer.from_pretrained(tmp_path)
    assert loaded.encode("<sys>hi") == tok.encode("<sys>hi") == [65530] + tok.encode("hi")


def test_world_auto_tokenizer_by_class_name(tok, tmp_path):
    from transformers import AutoTokenizer, PretrainedConfig

    class _DummyRwkvConfig(PretrainedConfig):
        model_type = "rwkv_ft_tokenizer_test_dummy"

    AutoTokenizer.register(_DummyRwkvConfig, slow_tokenizer_class=RwkvWorldTokenizer, exist_ok=True)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, RwkvWorldTokenizer)
    assert loaded.encode("你好 world") == tok.encode("你好 world")


def test_world_pickle_round_trip(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("pickled 文本\n\n") == tok.encode("pickled 文本\n\n")


def test_world_bad_vocab_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        RwkvWorldTokenizer(vocab_file=tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("1 'a' 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.txt:1"):
        RwkvWorldTokenizer(vocab_file=bad)


# -- NeoX loader ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bpe_json(tmp_path_factory):
    """A small byte-level BPE tokenizer.json built locally, shaped like GPT-NeoX-20B's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOT, "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello RWKV", "你好世界"] * 20
    backend.train_from_iterator(corpus, trainer=trainer)
    path = tmp_path_factory.mktemp("neox") / "tokenizer.json"
    backend.save(str(path))
    return path


def test_neox_load_by_file_and_directory(tiny_bpe_json):
    by_file = load_neox_tokenizer(str(tiny_bpe_json))
    by_dir = load_neox_tokenizer(tiny_bpe_json.parent)
    for tok in (by_file, by_dir):
        assert isinstance(tok, PreTrainedTokenizerFast)
        assert tok.eos_token == tok.bos_token == tok.pad_token == EOT
        assert tok.eos_token_id == tok.pad_token_id == 0
    text = "hello world, 你好 fox"
    ids = by_file(text)["input_ids"]
    assert ids == by_dir(text)["input_ids"]
    assert 0 not in ids  # no BOS prepended
    assert by_file.decode(ids) == text
    assert by_file.encode(f"the fox{EOT}")[-1] == 0


def test_neox_save_load_round_trip(tiny_bpe_json, tmp_path):
    tok = load_neox_tokenizer(tiny_bpe_json)
    tok.save_pretrained(tmp_path)
    loaded = load_neox_tokenizer(tmp_path)
    via_spec = load_tokenizer(str(tmp_path))
    text = "the lazy dog says hello"
    assert loaded(text)["input_ids"] == via_spec(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.pad_token == loaded.eos_token == EOT


def test_neox_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_neox_tokenizer(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_neox_tokenizer(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json"):
        load_neox_tokenizer(broken)

    # The Hub path really calls from_pretrained; simulate being offline without waiting on retries.
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(neox_module.PreTrainedTokenizerFast, "from_pretrained", offline)
    with pytest.raises(OSError, match="local tokenizer.json path") as info:
        load_neox_tokenizer()
    assert "EleutherAI/gpt-neox-20b" in str(info.value)


# -- load_tokenizer ---------------------------------------------------------------------------------


def test_load_tokenizer_specs(tiny_bpe_json, oracle):
    world = load_tokenizer("world")
    assert isinstance(world, RwkvWorldTokenizer)
    from_vocab = load_tokenizer(str(DEFAULT_VOCAB_FILE))
    assert isinstance(from_vocab, RwkvWorldTokenizer)
    assert from_vocab.encode(SAMPLES[7]) == oracle.encode(SAMPLES[7])
    assert isinstance(load_tokenizer(str(tiny_bpe_json)), PreTrainedTokenizerFast)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match=r"spec='wrold'.*'world', 'neox'"):
        load_tokenizer("wrold")
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))


def test_world_batch_decode(tok):
    texts = ["first 第一", "second\n\nline"]
    batch = tok(texts)["input_ids"]
    assert tok.decode(batch) == texts
    assert tok.batch_decode(batch) == texts
    assert tok.decode(batch[0][0]) == tok.convert_tokens_to_string([tok.convert_ids_to_tokens(batch[0][0])])
