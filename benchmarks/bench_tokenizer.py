"""RWKV World tokenizer throughput: pure-Python (regex) vs compiled (pyrwkv-tokenizer) encoder.

    .venv/bin/python benchmarks/bench_tokenizer.py [--mb-english 2] [--mb-mixed 0.6] [--repeats 3]

Texts are generated deterministically here: "english" is natural English prose (sentences of the
paragraphs below, shuffled into paragraphs with a fixed seed); "mixed" is runs of random CJK
ideographs (U+4E00..U+9FFF) alternating with runs of random ASCII letters, digits, punctuation,
spaces and newlines, so almost nothing repeats. For each encoder it prints MB/s (UTF-8 bytes per
second, best of --repeats) for the bare encoder (``WorldVocab.encode_text``) and for the Hugging Face
call data preparation makes (``tokenizer(text, add_special_tokens=False)["input_ids"]``), the
first-encode load time, and whether the ids of the two encoders are identical.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import time

PROSE = """\
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of
foolishness. The committee met on Tuesday to discuss the budget for the coming year; several members
argued that the proposed increase was far too modest. "We cannot keep doing more with less," said the
chair, before the meeting was adjourned until the following week. In 1969, astronauts first walked on
the Moon, an event watched by hundreds of millions of people around the world. Researchers have found
that regular exercise improves memory, mood and sleep, although the exact mechanisms remain unclear.
The river winds through the valley, past the old mill and the church, before it reaches the sea at the
small fishing town. Most of the houses there were built of grey stone in the nineteenth century, when
the harbour was busier than it is today. She opened the letter slowly, as if she already knew what it
would say, and read it twice before putting it back in its envelope. Prices rose by 3.2% in March,
driven mainly by the cost of food and energy, according to figures published on Wednesday. If you
would like to change your appointment, please call the office at least two days in advance. The new
library, which opened last spring, has become one of the most popular places in the city for students
and families alike. He had never been particularly good at chess, but he enjoyed the long, quiet
evenings spent thinking about the next move. Scientists still debate how the first cells came to be,
and whether life might exist elsewhere in our galaxy. After the storm, the village came together to
clear the roads, repair the roofs and make sure that nobody was left without food or shelter.
"""


def english_text(n_bytes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    flat = " ".join(PROSE.split())
    sentences = [s.strip() + "." for s in flat.split(". ") if s.strip()]
    out, size = [], 0
    while size < n_bytes:
        paragraph = " ".join(rng.choice(sentences) for _ in range(rng.randint(3, 8))) + "\n\n"
        out.append(paragraph)
        size += len(paragraph)
    return "".join(out)


def mixed_text(n_bytes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
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


def best_of(repeats: int, fn, *args):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def hf_encode(tokenizer, text: str) -> list[int]:
    """What rwkv_ft.data does per segment."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb-english", type=float, default=2.0)
    parser.add_argument("--mb-mixed", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from rwkv_ft.tokenizers.world import DEFAULT_VOCAB_FILE, RwkvWorldTokenizer, WorldVocab

    texts = {
        "english": english_text(int(args.mb_english * 1e6)),
        "mixed CJK+ASCII": mixed_text(int(args.mb_mixed * 1e6)),
    }

    # First-encode cost of each encoder on a fresh (uncached) vocabulary object.
    raw = DEFAULT_VOCAB_FILE.read_bytes()
    load: dict[str, float] = {}
    for name, compiled in (("python", False), ("compiled", True)):
        fresh = WorldVocab(raw, str(DEFAULT_VOCAB_FILE))
        start = time.perf_counter()
        fresh.encode_text("warm up", compiled=compiled)
        load[name] = time.perf_counter() - start
        if compiled and fresh.compiled_encoder() is None:
            load[name] = float("nan")

    tokenizers = {"python": RwkvWorldTokenizer(encoder="python"), "compiled": RwkvWorldTokenizer(encoder="auto")}
    compiled_ok = tokenizers["compiled"].active_encoder == "compiled"
    status = tokenizers["compiled"]._world.compiled_status

    rows, ids_by = [], {}
    for text_name, text in texts.items():
        mb = len(text.encode("utf-8")) / 1e6
        for enc_name, tok in tokenizers.items():
            if enc_name == "compiled" and not compiled_ok:
                continue
            world, use_compiled = tok._world, enc_name == "compiled"
            t_core, ids = best_of(args.repeats, world.encode_text, text, use_compiled)
            t_hf, hf_ids = best_of(args.repeats, hf_encode, tok, text)
            assert hf_ids == ids, f"{enc_name}: HF ids differ from encode_text on {text_name}"
            ids_by[(text_name, enc_name)] = ids
            rows.append((text_name, enc_name, mb, len(ids), mb / t_core, mb / t_hf))

    print(f"date {datetime.date.today()}, {platform.node()}, Python {platform.python_version()}, {platform.machine()}")
    print(f"compiled encoder: {status}")
    print(f"first encode (load): python {load['python']:.2f} s, compiled {load['compiled']:.2f} s\n")
    print(f"{'text':17s} {'encoder':9s} {'MB':>5s} {'tokens':>8s} {'encode MB/s':>12s} {'tok() MB/s':>11s}")
    for text_name, enc_name, mb, n, core, hf in rows:
        print(f"{text_name:17s} {enc_name:9s} {mb:5.2f} {n:8d} {core:12.1f} {hf:11.1f}")
    if compiled_ok:
        same = all(ids_by[(t, "python")] == ids_by[(t, "compiled")] for t in texts)
        print(f"\nids identical between encoders on every text: {same}")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
