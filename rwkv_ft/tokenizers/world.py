"""Tokenizer for the RWKV "World" vocabulary ``rwkv_vocab_v20230424``.

The World vocabulary is a plain list of byte strings; tokenization is greedy longest match over
the UTF-8 bytes of the text (no pre-tokenization, no merges). The reference implementation is
``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``, whose ids this module reproduces exactly.

Two encoders produce those ids:

* **compiled** (the fast path): the Rust ``WorldTokenizer`` of the optional PyPI package
  ``pyrwkv-tokenizer``. It is used only for the bundled vocabulary (checked by content hash), is
  imported on the first encode rather than at import time, and only after a self-check in this
  process passed: every vocabulary token encodes to its own id and a few mixed-script texts give
  the same ids as :func:`greedy_longest_match`. Otherwise the pure-Python encoder is used and one
  debug line on the ``rwkv_ft.tokenizers.world`` logger says why.
* **python** (the reference and fallback): the vocabulary trie compiled into a single ``re`` bytes
  pattern. At every trie node the pattern is an alternation over the node's children, with an empty
  last alternative when the node is itself a token. Greedy regex matching then yields the longest
  token at each position, and ``Pattern.findall`` walks the whole input in C.

Pick one with ``RwkvWorldTokenizer(encoder=...)`` or the environment variable
``RWKV_FT_WORLD_ENCODER``: ``"auto"`` (default: compiled when it is available and passes its
self-check), ``"compiled"`` (raise if it is not available) or ``"python"``.

Token strings (what ``tokenize`` returns and ``get_vocab`` keys) are the token bytes spelled with a
printable byte-to-character alphabet (the byte-level scheme GPT-2 made common: printable Latin-1
bytes stand for themselves, the rest are shifted to U+0100 and up), so every byte sequence has a
unique, whitespace-free spelling. ``convert_tokens_to_string`` joins the bytes of all tokens before
decoding, so characters split over several tokens decode correctly.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from transformers import AddedToken, PreTrainedTokenizer
from transformers.tokenization_python import Trie

logger = logging.getLogger(__name__)

# rwkv_vocab_v20230424.txt is copied unchanged from BlinkDL's `rwkv` pip package (Apache-2.0).
VOCAB_FILE_NAME = "rwkv_vocab_v20230424.txt"
DEFAULT_VOCAB_FILE = Path(__file__).with_name(VOCAB_FILE_NAME)
# sha256 of that file with "\r\n" line ends read as "\n" (see `vocab_sha256`): the only vocabulary
# the compiled encoder is trusted with, since it loads the bundled file, not the caller's.
DEFAULT_VOCAB_SHA256 = "e6dee3d4e31b4d5c40ac99508ac6c701ceef4bed681bf2167ce9a908552bca89"

# RWKV World models have a 65,536-row embedding; the vocabulary uses ids 1..65529, id 0 is the
# end-of-document token, and 65530..65535 are unused (they decode to nothing).
WORLD_EMBEDDING_SIZE = 65536
END_OF_TEXT = "<|endoftext|>"

ENCODER_ENV_VAR = "RWKV_FT_WORLD_ENCODER"
ENCODER_CHOICES = ("auto", "compiled", "python")
COMPILED_PACKAGE = "pyrwkv_tokenizer"  # PyPI: pyrwkv-tokenizer (Apache-2.0)


def _byte_alphabet() -> list[str]:
    """Return a printable, whitespace-free character for each of the 256 byte values."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table: list[str] = []
    shifted = 0
    for b in range(256):
        if b in keep:
            table.append(chr(b))
        else:
            table.append(chr(0x100 + shifted))
            shifted += 1
    return table


_BYTE_TO_CHAR = _byte_alphabet()


def bytes_to_token_string(data: bytes) -> str:
    """Spell a byte string with the printable byte alphabet used for token strings."""
    return "".join(_BYTE_TO_CHAR[b] for b in data)


def vocab_sha256(raw: bytes) -> str:
    """Content hash of a vocabulary file, blind to CRLF vs LF line ends (the parser is too)."""
    return hashlib.sha256(raw.replace(b"\r\n", b"\n")).hexdigest()


def parse_world_vocab(text: str, source: str = "<vocab>") -> dict[int, bytes]:
    """Parse a World vocabulary file (lines ``id repr(str|bytes) byte_length``) into ``{id: bytes}``.

    ``ast.literal_eval`` is used rather than ``eval`` so a vocabulary file cannot run code.
    """
    vocab: dict[int, bytes] = {}
    seen: dict[bytes, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            first, last = line.index(" "), line.rindex(" ")
            idx = int(line[:first])
            value = ast.literal_eval(line[first:last].strip())
            length = int(line[last:])
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"{source}:{lineno}: malformed vocabulary line {line!r} ({exc})") from exc
        token = value.encode("utf-8") if isinstance(value, str) else value
        if not isinstance(token, bytes) or not token:
            raise ValueError(f"{source}:{lineno}: token must be a non-empty str or bytes literal")
        if len(token) != length:
            raise ValueError(f"{source}:{lineno}: token is {len(token)} bytes but the line says {length}")
        if idx in vocab or token in seen:
            raise ValueError(f"{source}:{lineno}: duplicate id {idx} or token {token!r}")
        vocab[idx] = token
        seen[token] = idx
    if not vocab:
        raise ValueError(f"{source}: vocabulary file is empty")
    missing = [b for b in range(256) if bytes([b]) not in seen]
    if missing:
        # Without every single byte as a token some inputs have no tokenization at all.
        raise ValueError(f"{source}: vocabulary lacks single-byte tokens for bytes {missing[:8]}...")
    return vocab


def greedy_longest_match(data: bytes, bytes_to_id: dict[bytes, int], max_len: int | None = None) -> list[int]:
    """``TRIE_TOKENIZER``'s algorithm in its plainest form: at each offset take the longest token.

    Up to ``max_len`` dict look-ups per token, so only for short texts (the compiled encoder's
    self-check and tests); ``WorldVocab.encode_bytes`` is the fast pure-Python version.
    """
    if max_len is None:
        max_len = max(map(len, bytes_to_id))
    ids: list[int] = []
    pos, size = 0, len(data)
    while pos < size:
        for end in range(min(size, pos + max_len), pos, -1):
            idx = bytes_to_id.get(data[pos:end])
            if idx is not None:
                ids.append(idx)
                pos = end
                break
        else:
            raise ValueError(f"no token matches byte {data[pos]:#04x} at offset {pos}")
    return ids


class _TrieNode:
    __slots__ = ("children", "is_token", "weight")

    def __init__(self) -> None:
        self.children: dict[int, _TrieNode] = {}
        self.is_token = False
        self.weight = 0  # tokens in this subtree; used to try likely branches first


def _escape_byte(b: int) -> bytes:
    return re.escape(bytes([b]))


def build_trie_pattern(tokens: Iterable[bytes]) -> bytes:
    """Return a regex (bytes) whose greedy match at any position is the longest token there.

    Children of a node have distinct first bytes, so at most one alternative can match; the
    regex engine tries the deeper continuation first and backs off to the shortest token prefix
    only if that fails, which is exactly longest-match. ``sre`` scans alternatives one by one (it
    rejects one whose first byte differs cheaply, but has no jump table), so the order only
    matters for speed:

    * leaf children (no longer token continues through them) are folded into one character class,
      tried first: a class test costs one alternative, and in text with few repeats (random CJK)
      most characters end at a leaf;
    * branches follow, ordered by subtree size;
    * a node that is itself a token ends with an empty alternative ``(?:...|)`` rather than
      ``(?:...)?``: the latter compiles to sre's REPEAT/MAX_UNTIL machinery, noticeably slower
      than a plain BRANCH at every level of the trie.
    """
    root = _TrieNode()
    for token in tokens:
        node = root
        node.weight += 1
        for b in token:
            child = node.children.get(b)
            if child is None:
                child = node.children[b] = _TrieNode()
            node = child
            node.weight += 1
        node.is_token = True

    def emit(node: _TrieNode) -> bytes:
        if not node.children:
            return b""
        alternatives: list[bytes] = []
        leaves = sorted(b for b, c in node.children.items() if not c.children)
        if len(leaves) == 1:
            alternatives.append(_escape_byte(leaves[0]))
        elif leaves:
            alternatives.append(b"[" + b"".join(_escape_byte(b) for b in leaves) + b"]")
        inner = sorted(((b, c) for b, c in node.children.items() if c.children), key=lambda bc: (-bc[1].weight, bc[0]))
        alternatives += [_escape_byte(b) + emit(c) for b, c in inner]
        if node.is_token:
            return b"(?:" + b"|".join(alternatives) + b"|)"
        if len(alternatives) == 1:
            return alternatives[0]
        return b"(?:" + b"|".join(alternatives) + b")"

    return emit(root)


# Texts the compiled encoder must get right (against `greedy_longest_match`) before it is used:
# scripts, emoji and astral characters, whitespace and punctuation runs longer than any token,
# chat turns, control characters, and CJK characters with few repeats.
_SELF_CHECK_TEXTS = (
    "The quick brown fox jumps over the lazy dog.\n\nUser: hi\n\nAssistant: hello\n\n",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\nclass A:\n\tpass\r\n\r\n",
    "人工智能是计算机科学的一个分支。日本語のテキスト、カタカナ。한국어 문장도 시험해 봅시다.",
    "Съешь же ещё этих булок. مرحبا بالعالم Ελληνικά עברית हिन्दी ไทย ünïcödé e\u0301",
    "emoji 😀🎉👍🏽 👨‍👩‍👧‍👦 🇯🇵 1️⃣ 🫠 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀀𠀁 𓀀 \U0010fffd \ufeff\u200b",
    " " * 300 + "x" + "\n" * 70 + "=" * 129 + "<|endoftext|>" + "-" * 81 + "\t" * 40,
    "".join(map(chr, range(128))),
    "".join(chr(0x4E00 + (i * 7919) % 0x5200) + ("ab "[i % 3] if i % 5 == 0 else "") for i in range(600)),
)


def _self_check(vocab: WorldVocab, encode: Callable[[str], list[int]]) -> str | None:
    """Why ``encode`` disagrees with the pure-Python encoder on ``vocab`` (None when it agrees)."""
    # A token's own text always encodes to that token alone: this checks the whole vocabulary the
    # compiled encoder loaded (486 tokens are partial UTF-8 characters, reachable only inside text).
    for idx, token in vocab.id_to_bytes.items():
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            continue
        got = encode(text)
        if got != [idx]:
            return f"token {idx} ({text!r}) encodes to {got[:8]}"
    for text in _SELF_CHECK_TEXTS:
        want = greedy_longest_match(text.encode("utf-8"), vocab.bytes_to_id, vocab.max_token_len)
        got = encode(text)
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            return f"ids differ from token {first} on {text[:40]!r}..."
    return None


def _load_compiled_encoder(vocab: WorldVocab) -> tuple[Callable[[str], list[int]] | None, str]:
    """The compiled ``encode`` for ``vocab`` and what was loaded, or None and why not."""
    if vocab.sha256 != DEFAULT_VOCAB_SHA256:
        return None, f"the vocabulary is not the bundled {VOCAB_FILE_NAME}"
    try:
        module = importlib.import_module(COMPILED_PACKAGE)
    except ImportError as exc:
        return None, f"{COMPILED_PACKAGE} is not importable ({exc}); pip install pyrwkv-tokenizer"
    name = f"{COMPILED_PACKAGE} {getattr(module, '__version__', '(unknown version)')}"
    try:
        encode = module.WorldTokenizer(str(DEFAULT_VOCAB_FILE)).encode
        problem = _self_check(vocab, encode)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: B036 - a Rust panic arrives as pyo3's PanicException(BaseException)
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        return None, f"{name} failed its self-check: {problem}"
    return encode, name


class WorldVocab:
    """Parsed vocabulary plus the compiled matchers; shared by all tokenizers with identical files."""

    def __init__(self, raw: bytes, source: str = "<vocab>") -> None:
        self.raw = raw
        self.sha256 = vocab_sha256(raw)
        self.id_to_bytes = parse_world_vocab(raw.decode("utf-8"), source)
        self.bytes_to_id = {t: i for i, t in self.id_to_bytes.items()}
        self.id_to_token = {i: bytes_to_token_string(t) for i, t in self.id_to_bytes.items()}
        self.token_to_id = {s: i for i, s in self.id_to_token.items()}
        self.token_to_bytes = {s: self.id_to_bytes[i] for s, i in self.token_to_id.items()}
        self.bytes_to_token = {t: self.id_to_token[i] for t, i in self.bytes_to_id.items()}
        self.max_id = max(self.id_to_bytes)
        self.max_token_len = max(map(len, self.bytes_to_id))
        # id -> token string as a list: the compiled encoder's ids are mapped back with list indexing.
        self.id_table = [""] * (self.max_id + 1)
        for i, s in self.id_to_token.items():
            self.id_table[i] = s
        self._lookup_cache: dict[tuple[tuple[str, int], ...], dict[str, int]] = {}
        self._pattern: re.Pattern[bytes] | None = None
        self._pattern_lock = threading.Lock()
        self._compiled: Callable[[str], list[int]] | None = None
        self._compiled_tried = False
        self.compiled_status = "not loaded yet (it loads on the first encode)"
        self._compiled_lock = threading.Lock()

    @property
    def pattern(self) -> re.Pattern[bytes]:
        """The compiled trie regex, built on first use (1-2 s), so decode-only use skips it."""
        if self._pattern is None:
            with self._pattern_lock:
                if self._pattern is None:
                    self._pattern = re.compile(build_trie_pattern(self.bytes_to_id))
        return self._pattern

    def compiled_encoder(self) -> Callable[[str], list[int]] | None:
        """The compiled encoder's ``encode(str) -> ids``, or None; decided once per process."""
        if not self._compiled_tried:
            with self._compiled_lock:
                if not self._compiled_tried:
                    self._compiled, self.compiled_status = _load_compiled_encoder(self)
                    self._compiled_tried = True
                    if self._compiled is None:
                        logger.debug("RWKV World tokenizer: pure-Python encoder, %s", self.compiled_status)
                    else:
                        logger.debug("RWKV World tokenizer: compiled encoder %s", self.compiled_status)
        return self._compiled

    def _compiled_failed(self, exc: BaseException) -> None:
        self._compiled = None
        self.compiled_status = f"disabled after {type(exc).__name__}: {exc}"
        logger.warning("RWKV World tokenizer: compiled encoder raised %r; using the pure-Python encoder", exc)

    def encode_text(self, text: str, compiled: bool = True) -> list[int]:
        """Greedy longest-match ids for ``text``; ``compiled=False`` forces the pure-Python encoder."""
        encode = self.compiled_encoder() if compiled else None
        if encode is not None:
            try:
                return encode(text)
            except UnicodeEncodeError:
                raise  # lone surrogates: the same error str.encode gives on the pure-Python path
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: B036 - pyo3's PanicException derives from BaseException
                self._compiled_failed(exc)
        return self.encode_bytes(text.encode("utf-8"))

    def tokenize_text(self, text: str, compiled: bool = True) -> list[str]:
        """Token strings for ``text`` (same choice of encoder as :meth:`encode_text`)."""
        if compiled and self.compiled_encoder() is not None:
            table = self.id_table
            return [table[i] for i in self.encode_text(text)]
        return self.tokenize_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes, compiled: bool = False) -> list[int]:
        """Greedy longest-match ids for ``data`` (every byte is a token, so matches tile the input).

        With ``compiled=True``, valid UTF-8 goes through the compiled encoder when it is available.
        """
        if compiled and self.compiled_encoder() is not None:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                pass  # not text: only the byte-level encoder can take it
            else:
                return self.encode_text(text)
        table = self.bytes_to_id
        return [table[m] for m in self.pattern.findall(data)]

    def tokenize_bytes(self, data: bytes) -> list[str]:
        table = self.bytes_to_token
        return [table[m] for m in self.pattern.findall(data)]

    def token_lookup(self, added: dict[str, int]) -> dict[str, int]:
        """Token string -> id over the vocabulary with ``added`` taking precedence (cached per set)."""
        if not added:
            return self.token_to_id
        key = tuple(added.items())
        table = self._lookup_cache.get(key)
        if table is None:
            if len(self._lookup_cache) >= 8:
                self._lookup_cache.clear()
            table = self._lookup_cache[key] = {**self.token_to_id, **added}
        return table

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        # Pickle as the raw file so unpickling reuses this process's cache (datasets.map, DataLoader
        # workers) instead of shipping ~200k dict entries and a 270 kB pattern; the compiled encoder
        # is loaded again (and self-checked) in the process that unpickles.
        return (_vocab_from_raw, (self.raw,))


_CACHE: dict[str, WorldVocab] = {}
_CACHE_LOCK = threading.Lock()


def _vocab_from_raw(raw: bytes, source: str = "<vocab>") -> WorldVocab:
    """Return the cached :class:`WorldVocab` for these file contents, building it once per process."""
    key = hashlib.sha256(raw).hexdigest()
    with _CACHE_LOCK:
        vocab = _CACHE.get(key)
        if vocab is None:
            vocab = _CACHE[key] = WorldVocab(raw, source)
        return vocab


def load_world_vocab(path: str | os.PathLike[str]) -> WorldVocab:
    """Load (or fetch from the per-process cache) the vocabulary at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RWKV World vocabulary file not found: {path}")
    return _vocab_from_raw(path.read_bytes(), str(path))


def resolve_encoder_choice(encoder: str | None) -> str:
    """``encoder`` if given, else ``$RWKV_FT_WORLD_ENCODER``, else ``"auto"``; validated."""
    source = "encoder"
    if encoder is None:
        encoder, source = os.environ.get(ENCODER_ENV_VAR) or "auto", ENCODER_ENV_VAR
    choice = str(encoder).strip().lower()
    if choice not in ENCODER_CHOICES:
        raise ValueError(f"{source}={encoder!r}: expected one of {', '.join(map(repr, ENCODER_CHOICES))}")
    return choice


class _AddedTokenSplitter(Trie):
    """Drop-in for transformers' added-token ``Trie`` whose ``split`` runs as one regex in C.

    The stock ``Trie.split`` walks the text one character at a time in Python, which costs more
    than the tokenization itself on long documents. Same contract: leftmost match, longest added
    token at that position, pieces returned in order with no empty strings.
    """

    def __init__(self) -> None:
        super().__init__()
        self._regex: re.Pattern[str] | None = None

    def add(self, word: str) -> None:
        super().add(word)
        self._regex = None

    def split(self, text: str) -> list[str]:
        if not text:
            return []
        if not self._tokens:
            return [text]
        if self._regex is None:
            longest_first = sorted(self._tokens, key=lambda t: (-len(t), t))
            self._regex = re.compile("|".join(map(re.escape, longest_first)))
        pieces: list[str] = []
        start = 0
        for match in self._regex.finditer(text):
            if match.start() > start:
                pieces.append(text[start : match.start()])
            pieces.append(match.group())
            start = match.end()
        if start < len(text):
            pieces.append(text[start:])
        return pieces


# Keyword arguments of `PreTrainedTokenizer._encode_plus` itself; any others are passed on to `tokenize`.
_ENCODE_PLUS_PARAMS = frozenset(inspect.signature(PreTrainedTokenizer._encode_plus).parameters)
# The ones `_encode_plus` below knows: `__call__` always passes both (the second as False).
_TOKENIZE_KWARGS_HANDLED = frozenset({"split_special_tokens", "return_offsets_mapping"})


class RwkvWorldTokenizer(PreTrainedTokenizer):
    """Hugging Face slow tokenizer for the RWKV World vocabulary (greedy longest byte match).

    * ``tokenizer(text)`` adds no special tokens (RWKV uses no BOS); append ``eos_token_id``
      yourself to mark the end of a document.
    * ``eos_token``, ``bos_token`` and ``pad_token`` default to ``"<|endoftext|>"``, which is id 0,
      the token RWKV World models were trained with as the document separator. The string maps to
      id 0 only because it is a registered special token; pass ``split_special_tokens=True`` to
      tokenize it as plain text. Ordinary text never yields id 0.
    * ``vocab_size`` is 65536 (the embedding size); ids 65530..65535 are unused, decode to an empty
      string, and are the ids handed out first by ``add_tokens``. ``len(tokenizer)`` is one more than
      the largest id in use, so ``model.resize_token_embeddings(len(tokenizer))`` never shrinks.
    * ``padding_side`` keeps the transformers default (``"right"``); set ``"left"`` for generation.
    * ``encoder`` picks the encoder (see the module docstring): ``"auto"`` (default, or
      ``$RWKV_FT_WORLD_ENCODER``), ``"compiled"`` or ``"python"``. Both give the same ids; the choice
      is not saved by ``save_pretrained``. :attr:`active_encoder` says which one encodes.
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike[str] | None = None,
        eos_token: str | AddedToken | None = END_OF_TEXT,
        bos_token: str | AddedToken | None = END_OF_TEXT,
        pad_token: str | AddedToken | None = END_OF_TEXT,
        unk_token: str | AddedToken | None = None,
        clean_up_tokenization_spaces: bool = False,
        encoder: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_file = str(vocab_file if vocab_file is not None else DEFAULT_VOCAB_FILE)
        self._world = load_world_vocab(self.vocab_file)
        self._encoder_choice = resolve_encoder_choice(encoder)
        if self._encoder_choice == "compiled" and self._world.compiled_encoder() is None:
            raise RuntimeError(
                f"RwkvWorldTokenizer(encoder='compiled'): the compiled encoder is unavailable: "
                f"{self._world.compiled_status}. Use encoder='auto' to fall back to the pure-Python one."
            )
        if 0 in self._world.id_to_bytes:
            raise ValueError(f"{self.vocab_file}: id 0 is reserved for the end-of-text token")
        # Register id 0 before the base class runs, so the special tokens land on it instead of
        # being appended as new ids; a saved `added_tokens_decoder` (kwargs) still takes precedence.
        end_of_text = str(eos_token) if eos_token is not None else END_OF_TEXT
        self._added_tokens_decoder = {
            0: AddedToken(end_of_text, special=True, normalized=False, lstrip=False, rstrip=False)
        }
        kwargs.setdefault("special_tokens_pattern", "none")
        super().__init__(
            eos_token=eos_token,
            bos_token=bos_token,
            pad_token=pad_token,
            unk_token=unk_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )
        self.tokens_trie = _AddedTokenSplitter()
        self._update_trie()

    # -- vocabulary -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Embedding rows the base vocabulary needs (65536 for the World vocabulary)."""
        return max(WORLD_EMBEDDING_SIZE, self._world.max_id + 1)

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id for the base vocabulary plus added tokens."""
        vocab = dict(self._world.token_to_id)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _update_total_vocab_size(self) -> None:
        # Size by the largest id, not the number of entries: the vocabulary has holes (0 is an added
        # token, 65530..65535 are unused) and len(tokenizer) must cover every id that can appear.
        top = max(self._added_tokens_decoder, default=0)
        self.total_vocab_size = max(self.vocab_size, top + 1)

    # -- encoding ---------------------------------------------------------------------------------

    @property
    def active_encoder(self) -> str:
        """``"compiled"`` or ``"python"``: the encoder this tokenizer uses (loads it if not yet)."""
        if self._encoder_choice != "python" and self._world.compiled_encoder() is not None:
            return "compiled"
        return "python"

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self._world.tokenize_text(text, compiled=self._encoder_choice != "python")

    def _encode_plus(self, text: Any, text_pair: Any = None, **kwargs: Any) -> Any:
        # `tokenizer(text)`, `encode` and batches all come through here. A string with no added token
        # in it is encoded straight to ids, which the base class takes as they are, skipping the
        # token strings of `convert_tokens_to_ids(tokenize(text))` (same ids, about half the time on
        # the compiled path). Anything else - added tokens in the text, pre-tokenized input, extra
        # options for `tokenize` - goes the base class's way unchanged.
        plain = kwargs.keys() - _ENCODE_PLUS_PARAMS <= _TOKENIZE_KWARGS_HANDLED
        if plain and not kwargs.get("is_split_into_words") and not kwargs.get("return_offsets_mapping"):
            split = kwargs.get("split_special_tokens", self.split_special_tokens)
            text = self._ids_if_plain_text(text, split)
            text_pair = self._ids_if_plain_text(text_pair, split)
        return super()._encode_plus(text, text_pair, **kwargs)

    def _ids_if_plain_text(self, text: Any, split_special_tokens: bool) -> Any:
        """Ids of ``text`` if ``tokenize`` would hand all of it to ``_tokenize``, else ``text`` unchanged."""
        if not isinstance(text, str) or not text:
            return text  # the base class handles "" (an empty id list would read as "no input")
        if type(self).prepare_for_tokenization is not PreTrainedTokenizer.prepare_for_tokenization:
            return text  # a subclass rewrites the text first
        if not split_special_tokens:
            pieces = self.tokens_trie.split(text)
            if len(pieces) != 1 or text in self._added_tokens_encoder or text in self.all_special_tokens:
                return text
        return self._world.encode_text(text, compiled=self._encoder_choice != "python")

    def _convert_token_to_id(self, token: str) -> int | None:
        # Unknown strings give None, like the fast tokenizers' token_to_id (there is no unk token).
        return self._world.token_to_id.get(token)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """Token string(s) to id(s); added tokens take precedence. Unknown strings give ``None``."""
        if isinstance(tokens, str):
            return self._convert_token_to_id_with_added_voc(tokens)
        # One C-level map over a merged table instead of two method calls per token: with the ids
        # from the compiled encoder this was half the time of `convert_tokens_to_ids(tokenize(text))`.
        return list(map(self._world.token_lookup(self._added_tokens_encoder).get, tokens))

    def encode_plain(self, text: str) -> list[int]:
        """Ids of ``text`` as plain text, without transformers' per-call overhead (~15 us a call).

        No added or special token is recognised in ``text``: the ids equal
        ``tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]``.
        """
        return self._world.encode_text(text, compiled=self._encoder_choice != "python")

    def encode_bytes(self, data: bytes) -> list[int]:
        """Ids for raw bytes (no special-token handling), e.g. to re-encode decoded byte streams."""
        return self._world.encode_bytes(bytes(data), compiled=self._encoder_choice != "python")

    # -- decoding ---------------------------------------------------------------------------------

    def _convert_id_to_token(self, index: int) -> str:
        # Unused / out-of-range ids decode to nothing rather than raising mid-generation.
        return self._world.id_to_token.get(index, "")

    def _token_bytes(self, tokens: Iterable[str]) -> bytes:
        to_bytes = self._world.token_to_bytes
        # Strings outside the base vocabulary (added tokens, or any foreign string) are real text.
        return b"".join([to_bytes[t] if t in to_bytes else t.encode("utf-8") for t in tokens])

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join the tokens' bytes, then decode once (invalid UTF-8 becomes U+FFFD)."""
        return self._token_bytes(tokens).decode("utf-8", errors="replace")

    def decode_bytes(self, token_ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """Concatenated bytes of ``token_ids``; added tokens contribute their UTF-8 text.

        Ids that are neither in the vocabulary nor added tokens contribute nothing.
        """
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        added = {i: t.content.encode("utf-8") for i, t in self._added_tokens_decoder.items() if i not in skip}
        to_bytes = self._world.id_to_bytes
        # Straight id -> bytes lookups: the generic convert_ids_to_tokens path is ~3x slower.
        return b"".join(
            [added[i] if i in added else b"" if i in skip else to_bytes.get(i, b"") for i in map(int, token_ids)]
        )

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        text = self.decode_bytes(ids, skip_special_tokens=skip_special_tokens).decode("utf-8", errors="replace")
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    # -- saving -----------------------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write the vocabulary file, unchanged, as ``[prefix-]rwkv_vocab_v20230424.txt``."""
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"save_vocabulary expects a directory, got {save_directory}")
        name = (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILE_NAME
        target = os.path.join(save_directory, name)
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            if os.path.isfile(self.vocab_file):
                shutil.copyfile(self.vocab_file, target)
            else:  # source moved since loading: write the bytes we parsed
                with open(target, "wb") as f:
                    f.write(self._world.raw)
        return (target,)
