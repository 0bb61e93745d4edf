"""rwkv_ft.tokenizers: World tokenizer vs. the TRIE_TOKENIZER oracle, NeoX loader, load_tokenizer."""

from __future__ import annotations

import importlib.util
import json
import logging
import pickle
import random
import sys
import time
import types

import pytest
from transformers import AddedToken, PreTrainedTokenizerFast

from rwkv_ft.tokenizers import (
    DEFAULT_VOCAB_FILE,
    VOCAB_FILE_NAME,
    RwkvWorldTokenizer,
    load_neox_tokenizer,
    load_tokenizer,
)
from rwkv_ft.tokenizers import neox as neox_module
from rwkv_ft.tokenizers import world as world_module
from rwkv_ft.tokenizers.world import (
    COMPILED_PACKAGE,
    DEFAULT_VOCAB_SHA256,
    ENCODER_ENV_VAR,
    WorldVocab,
    greedy_longest_match,
    vocab_sha256,
)

rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer", reason="BlinkDL's rwkv package is the oracle")

EOT = "<|endoftext|>"
HAS_COMPILED = importlib.util.find_spec(COMPILED_PACKAGE) is not None
needs_compiled = pytest.mark.skipif(not HAS_COMPILED, reason=f"{COMPILED_PACKAGE} (pyrwkv-tokenizer) is not installed")

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


@pytest.fixture(scope="module", params=["python", "compiled"])
def tok(request) -> RwkvWorldTokenizer:
    """Every World test runs on both encoders; "compiled" must really be the compiled one."""
    if request.param == "compiled" and not HAS_COMPILED:
        pytest.skip(f"{COMPILED_PACKAGE} (pyrwkv-tokenizer) is not installed")
    tokenizer = RwkvWorldTokenizer(encoder=request.param)
    assert tokenizer.active_encoder == request.param
    return tokenizer


@pytest.fixture(scope="module")
def python_tok() -> RwkvWorldTokenizer:
    """The pure-Python encoder: the reference the compiled one is compared with on large inputs."""
    return RwkvWorldTokenizer(encoder="python")


@pytest.fixture(scope="module")
def compiled_tok() -> RwkvWorldTokenizer:
    if not HAS_COMPILED:
        pytest.skip(f"{COMPILED_PACKAGE} (pyrwkv-tokenizer) is not installed")
    return RwkvWorldTokenizer(encoder="compiled")


@pytest.fixture(scope="module")
def vocab_tokens(oracle) -> list[tuple[str, int]]:
    """(text, id) of every vocabulary token that is valid UTF-8 on its own."""
    out = []
    for idx, token in oracle.idx2token.items():
        try:
            out.append((token.decode("utf-8"), idx))
        except UnicodeDecodeError:
            pass
    return out


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


def test_world_ids_match_oracle_on_each_vocab_token_and_runs(tok, oracle, vocab_tokens):
    # A token's own text is always that one token; checking all of them checks the loaded vocabulary.
    encode = tok.encode_plain
    assert [text for text, idx in vocab_tokens if encode(text) != [idx]] == []
    for text, _ in vocab_tokens[::50]:
        assert encode(text) == oracle.encode(text)
    # Runs of one character across every token length (the longest token is 128 bytes).
    for ch in [" ", "\n", "\t", "\r\n", "=", "-", "#", "a", "0", "你", "😀", "\x00", "é", " \n", "\n\n"]:
        for n in [*range(1, 40), 63, 64, 65, 127, 128, 129, 255, 256, 1000]:
            assert _ids(tok, ch * n) == oracle.encode(ch * n), (ch, n)


def test_world_single_character_and_byte_edges(tok, oracle):
    # Every 1- and 2-byte character, then the UTF-8 length boundaries and a sweep of the rest.
    chars = list(range(0x800)) + [0xFFFF, 0x10000, 0x10FFFF, 0xE000, 0xD7FF] + list(range(0x800, 0x110000, 251))
    for c in chars:
        if 0xD800 <= c < 0xE000:
            continue
        text = chr(c)
        assert tok.encode_plain(text) == oracle.encode(text), hex(c)
        assert tok.encode_plain(f"a{text}{text}b") == oracle.encode(f"a{text}{text}b"), hex(c)
    # Every single byte and a spread of byte pairs as raw bytes (mostly not UTF-8).
    for b in range(256):
        assert tok.encode_bytes(bytes([b])) == oracle.encodeBytes(bytes([b])) == [b + 1]
        pairs = bytes([b, (b * 7 + 3) % 256, b, 0x80 | (b % 64)])
        assert tok.encode_bytes(pairs) == oracle.encodeBytes(pairs)


def test_world_lone_surrogate_raises_like_str_encode(tok):
    with pytest.raises(UnicodeEncodeError):
        tok.encode_plain("a\ud800b")
    with pytest.raises(UnicodeEncodeError):
        tok("a\ud800b")


def _english(rng: random.Random, n_bytes: int) -> str:
    words = (
        "the of and to in a is that for it as was with be by on not he this are or his from at which but "
        "have an they you were their one all we can her has there been if more when will would who so no "
        "committee budget astronauts researchers river valley harbour library students evening storm"
    ).split()
    out, size = [], 0
    while size < n_bytes:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 18)))
        piece = sentence[0].upper() + sentence[1:] + rng.choice([". ", ", ", "; ", '." ', ".\n\n", "? "])
        out.append(piece)
        size += len(piece)
    return "".join(out)


def _cjk_ascii_mix(rng: random.Random, n_bytes: int) -> str:
    ascii_chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?\n"
    out, size = [], 0
    while size < n_bytes:
        if rng.random() < 0.5:
            run = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 12)))
        else:
            run = "".join(rng.choice(ascii_chars) for _ in range(rng.randint(1, 12)))
        out.append(run)
        size += len(run.encode("utf-8"))
    return "".join(out)


def test_world_large_texts_match_oracle(tok, oracle):
    rng = random.Random(2024)
    code = open(world_module.__file__, encoding="utf-8").read()
    for text in [_english(rng, 60_000), _cjk_ascii_mix(rng, 60_000), code, code.replace("    ", "\t")]:
        expected = oracle.encode(text)
        assert _ids(tok, text, split_special_tokens=True) == expected  # world.py has "<|endoftext|>" in it
        assert tok.encode_plain(text) == expected
        assert tok.encode_bytes(text.encode("utf-8")) == expected


def _fuzz_text(rng: random.Random, pieces: list[str]) -> str:
    ranges = [
        (0x00, 0x7F),
        (0x80, 0x7FF),
        (0x800, 0xFFFF),
        (0x4E00, 0x9FFF),
        (0x3040, 0x30FF),
        (0xAC00, 0xD7A3),
        (0x0400, 0x06FF),
        (0x1F300, 0x1FAFF),
        (0x10000, 0x10FFFF),
    ]
    out = []
    for _ in range(rng.randint(0, 200)):
        r = rng.random()
        if r < 0.35:
            out.append(rng.choice(pieces))
        else:
            c = rng.randint(*rng.choice(ranges))
            out.append(chr(c) if not 0xD800 <= c < 0xE000 else " ")
    return "".join(out)


def test_world_encoders_agree_on_mixed_script_fuzz(python_tok, compiled_tok, oracle, vocab_tokens):
    """The pure-Python encoder is the reference for the compiled one; the oracle checks a share of both."""
    rng = random.Random(31337)
    pieces = [" ", "\n", "\n\n", "\t", "\r\n", "  ", "the ", "的", "。", EOT] + [t for t, _ in vocab_tokens[::13]]
    for i in range(2000):
        text = _fuzz_text(rng, pieces)
        expected = python_tok.encode_plain(text)
        assert compiled_tok.encode_plain(text) == expected, repr(text)
        if i % 3 == 0:
            assert expected == oracle.encode(text), repr(text)
            assert _ids(compiled_tok, text, split_special_tokens=True) == expected
        if i % 30 == 0:  # the plain reference the compiled encoder's self-check uses
            assert greedy_longest_match(text.encode("utf-8"), python_tok._world.bytes_to_id) == expected


def test_world_hf_encode_options_match_oracle(tok, oracle):
    text, pair = "Hello world, 你好世界!\n\n", "second 段落 😀"
    ids, pair_ids = oracle.encode(text), oracle.encode(pair)
    assert tok(text, pair)["input_ids"] == ids + pair_ids
    assert tok(text, truncation=True, max_length=4)["input_ids"] == ids[:4]
    assert tok(text, return_tensors="pt")["input_ids"].tolist() == [ids]
    assert tok([text, "", pair])["input_ids"] == [ids, [], pair_ids]
    assert tok.encode(text) == tok.convert_tokens_to_ids(tok.tokenize(text)) == ids
    words = text.split(" ")
    assert tok(words, is_split_into_words=True)["input_ids"] == [i for w in words for i in oracle.encode(w)]
    # Added tokens in the text take the base class's path, with their lstrip/rstrip behaviour.
    other = RwkvWorldTokenizer(encoder=tok.active_encoder)
    other.add_tokens([AddedToken("<x>", lstrip=True, rstrip=True)])
    x_id = other.convert_tokens_to_ids("<x>")
    assert other("a  <x>  b")["input_ids"] == oracle.encode("a") + [x_id] + oracle.encode("b")
    assert other(f"<x>{EOT}")["input_ids"] == [x_id, 0]
    assert other("<x>", split_special_tokens=True)["input_ids"] == oracle.encode("<x>")


# -- World tokenizer: choosing the encoder ----------------------------------------------------------


def test_world_encoder_choice_from_argument_and_env(monkeypatch):
    default = "compiled" if HAS_COMPILED else "python"
    monkeypatch.delenv(ENCODER_ENV_VAR, raising=False)
    assert RwkvWorldTokenizer().active_encoder == default
    monkeypatch.setenv(ENCODER_ENV_VAR, "python")
    assert RwkvWorldTokenizer().active_encoder == "python"
    assert RwkvWorldTokenizer(encoder="auto").active_encoder == default  # the argument wins
    monkeypatch.setenv(ENCODER_ENV_VAR, "rust")
    with pytest.raises(ValueError, match=ENCODER_ENV_VAR):
        RwkvWorldTokenizer()
    with pytest.raises(ValueError, match="encoder='fast'"):
        RwkvWorldTokenizer(encoder="fast")


def test_world_encoder_choice_is_not_saved(tmp_path):
    RwkvWorldTokenizer(encoder="python").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "encoder" not in config
    assert RwkvWorldTokenizer.from_pretrained(tmp_path, encoder="python").active_encoder == "python"


@pytest.fixture
def fresh_vocab() -> WorldVocab:
    """The bundled vocabulary outside the per-process cache, so its encoder choice starts afresh."""
    return WorldVocab(DEFAULT_VOCAB_FILE.read_bytes(), str(DEFAULT_VOCAB_FILE))


class _FakePanic(BaseException):
    """Stands in for pyo3's PanicException, which derives from BaseException."""


def _fake_compiled(monkeypatch, encode) -> None:
    """Install a stand-in for the compiled package whose WorldTokenizer.encode is `encode`."""

    class WorldTokenizer:
        def __init__(self, path: str) -> None:
            assert path == str(DEFAULT_VOCAB_FILE)

        def encode(self, text: str) -> list[int]:
            return encode(text)

    module = types.SimpleNamespace(WorldTokenizer=WorldTokenizer, __version__="0-test")
    monkeypatch.setitem(sys.modules, COMPILED_PACKAGE, module)


def _world_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == world_module.__name__]


def test_world_falls_back_when_compiled_package_is_missing(fresh_vocab, monkeypatch, caplog, oracle):
    monkeypatch.setitem(sys.modules, COMPILED_PACKAGE, None)  # makes the import fail
    with caplog.at_level(logging.DEBUG, logger=world_module.__name__):
        assert fresh_vocab.compiled_encoder() is None
        assert fresh_vocab.compiled_encoder() is None  # decided once
        assert fresh_vocab.encode_text(SAMPLES[7]) == oracle.encode(SAMPLES[7])
    (line,) = _world_logs(caplog)
    assert "pure-Python" in line and "not importable" in line


def test_world_compiled_encoder_is_used_only_after_its_self_check(fresh_vocab, monkeypatch, caplog, oracle):
    # Right on every vocabulary token alone (the first check), wrong on longer texts only.
    _fake_compiled(monkeypatch, lambda text: oracle.encode(text) if len(text) < 200 else oracle.encode(text)[:-1])
    with caplog.at_level(logging.DEBUG, logger=world_module.__name__):
        assert fresh_vocab.compiled_encoder() is None
    assert "failed its self-check" in fresh_vocab.compiled_status
    (line,) = _world_logs(caplog)
    assert "pure-Python" in line and "self-check" in line


def test_world_compiled_encoder_panic_at_load_or_use_falls_back(monkeypatch, caplog, oracle):
    def panic(text):
        raise _FakePanic("index out of bounds")

    _fake_compiled(monkeypatch, panic)
    vocab = WorldVocab(DEFAULT_VOCAB_FILE.read_bytes(), str(DEFAULT_VOCAB_FILE))
    assert vocab.compiled_encoder() is None and "_FakePanic" in vocab.compiled_status

    state = {"panic": False}
    _fake_compiled(monkeypatch, lambda text: panic(text) if state["panic"] else oracle.encode(text))
    vocab = WorldVocab(DEFAULT_VOCAB_FILE.read_bytes(), str(DEFAULT_VOCAB_FILE))
    assert vocab.compiled_encoder() is not None and vocab.compiled_status == f"{COMPILED_PACKAGE} 0-test"
    state["panic"] = True
    with caplog.at_level(logging.WARNING, logger=world_module.__name__):
        assert vocab.encode_text(SAMPLES[8]) == oracle.encode(SAMPLES[8])
    assert vocab.compiled_encoder() is None and any("pure-Python" in m for m in _world_logs(caplog))


def test_world_custom_vocab_never_uses_the_compiled_encoder(tmp_path, oracle):
    raw = DEFAULT_VOCAB_FILE.read_bytes()
    # Line ends do not make a different vocabulary...
    assert vocab_sha256(raw) == vocab_sha256(raw.replace(b"\r\n", b"\n")) == DEFAULT_VOCAB_SHA256
    lf_copy = tmp_path / "lf" / VOCAB_FILE_NAME
    lf_copy.parent.mkdir()
    lf_copy.write_bytes(raw.replace(b"\r\n", b"\n"))
    assert RwkvWorldTokenizer(vocab_file=lf_copy).active_encoder == ("compiled" if HAS_COMPILED else "python")
    # ...other tokens do, and the compiled encoder (which only knows the bundled one) is not used.
    custom = tmp_path / "custom.txt"
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)] + ["257 'qzx' 3", "258 b'\\xe4\\xbd' 2", "259 'a q' 3"]
    custom.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = RwkvWorldTokenizer(vocab_file=custom)
    assert tok.active_encoder == "python" and "not the bundled" in tok._world.compiled_status
    custom_oracle = rwkv_tokenizer.TRIE_TOKENIZER(str(custom))
    text = "qzxqzx a qzx, 你好 b"
    expected = custom_oracle.encode(text)
    assert {257, 258, 259} <= set(expected)
    assert tok.encode(text) == tok.encode_plain(text) == expected
    assert tok.decode(expected) == text
    with pytest.raises(RuntimeError, match="not the bundled"):
        RwkvWorldTokenizer(vocab_file=custom, encoder="compiled")


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


def test_world_pickle_round_trip(tok, oracle):
    text = "pickled 文本\n\n"
    assert tok.encode(text) == oracle.encode(text)  # the encoder is loaded before pickling
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.active_encoder == tok.active_encoder
    assert clone.encode(text) == tok.encode(text)


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

    # Offline: one look at the local cache, no network and no retries; the error says what to do.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    started = time.monotonic()
    with pytest.raises(neox_module.TokenizerUnavailable, match="HF_HUB_OFFLINE=1.*local tokenizer.json") as info:
        load_neox_tokenizer()
    assert "GPT-NeoX" in str(info.value) and time.monotonic() - started < 10


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
