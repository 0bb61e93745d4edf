"""generate() on the transformers release installed: every decoding mode against a loop that cannot
be fooled by cache plumbing (full recomputation, or our own stateful RNN loop)."""

from __future__ import annotations

import pytest
import torch

import rwkv_ft  # noqa: F401  (registers the Auto classes)
from rwkv_ft.testing import MODEL_FACTORIES, random_ids


@pytest.fixture(scope="module", params=sorted(MODEL_FACTORIES))
def model(request):
    return MODEL_FACTORIES[request.param]().eval()


def greedy_by_recomputation(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding that feeds the whole sequence every step (no state at all)."""
    tokens = ids
    for _ in range(steps):
        with torch.no_grad():
            next_token = model(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


def greedy_by_rnn(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding through our own state: prompt once, then one token per call."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        tokens = ids
        for _ in range(steps):
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
            out = model(next_token, state=out.state, use_cache=True)
    return tokens


def no_eos(model) -> dict:
    # A random model may emit the eos id; these comparisons are about the tokens, not stopping.
    return {"eos_token_id": None, "pad_token_id": model.config.pad_token_id}


def test_greedy_equals_recomputation_and_rnn_loops(model):
    ids = random_ids(2, 6, model.config.vocab_size, seed=7)
    with torch.no_grad():
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, **no_eos(model)
        )
    assert torch.equal(generated, greedy_by_recomputation(model, ids, 10))
    assert torch.equal(generated, greedy_by_rnn(model, ids, 10))


def test_use_cache_false_gives_the_same_tokens(model):
    ids = random_ids(2, 5, model.config.vocab_size, seed=8)
    kw = dict(max_new_tokens=8, do_sample=False, **no_eos(model))
    with torch.no_grad():
        assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))


def test_sampling_with_and_without_cache_agree_under_one_seed(model):
    ids = random_ids(2, 4, model.config.vocab_size, seed=9)
    kw = dict(max_new_tokens=8, do_sample=True, top_k=20, temperature=1.3, **no_eos(model))
    runs = []
    for use_cache in (True, False, True):
        torch.manual_seed(0)
        with torch.no_grad():
            runs.append(model.generate(ids, use_cache=use_cache, **kw))
    assert runs[0].shape == (2, 12)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_beam_search_with_state_equals_recomputation(model):
    """Beam search reorders the state with the beams: same beams as recomputing every step."""
    ids = random_ids(2, 5, model.config.vocab_size, seed=10)
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, **no_eos(model))
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        recomputed = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, recomputed)


def test_generate_does_constant_work_per_token(model, monkeypatch):
    """After the prompt, every forward call sees exactly one new token."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.rwkv
    seen = []
    original = inner.forward

    def spy(input_ids=None, *args, **kwargs):
        seen.append(input_ids.shape[1])
        return original(input_ids, *args, **kwargs)

    monkeypatch.setattr(inner, "forward", spy)
    ids = random_ids(1, 5, model.config.vocab_size, seed=11)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, **no_eos(model))
    assert seen == [5] + [1] * 5


def test_generate_continues_from_a_passed_state(model):
    """generate(new_tokens, state=state_after_history) == generate(history + new_tokens)."""
    history = random_ids(1, 7, model.config.vocab_size, seed=12)
    new = random_ids(1, 3, model.config.vocab_size, seed=13)
    kw = dict(max_new_tokens=6, do_sample=False, **no_eos(model))
    with torch.no_grad():
        state = model(history, use_cache=True).state
        continued = model.generate(new, state=state, **kw)
        whole = model.generate(torch.cat([history, new], dim=1), **kw)
    assert torch.equal(continued[:, new.shape[1] :], whole[:, history.shape[1] + new.shape[1] :])


def test_left_padded_batch_generates_like_each_row_alone(model):
    vocab = model.config.vocab_size
    prompts = [random_ids(1, n, vocab, seed=20 + n)[0] for n in (3, 9, 6)]
    width = max(len(p) for p in prompts)
    pad = model.config.pad_token_id
    ids = torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    kw = dict(max_new_tokens=7, do_sample=False, **no_eos(model))
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kw)
        for row, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kw)
            assert torch.equal(batched[row, width:], alone[0, len(prompt) :]), f"row {row} differs"


def test_rows_past_eos_get_padding(model):
    """With an eos id, finished rows are padded exactly as a manual loop pads them."""
    ids = random_ids(3, 4, model.config.vocab_size, seed=14)
    expected = greedy_by_recomputation(model, ids, 8)
    eos = int(expected[0, 6])  # a token the first row emits mid-way
    pad = model.config.pad_token_id
    finished = torch.zeros(3, 1, dtype=torch.bool)
    manual = ids
    for t in range(8):
        token = expected[:, 4 + t : 5 + t].masked_fill(finished, pad)
        finished |= token == eos
        manual = torch.cat([manual, token], dim=1)
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(generated, manual[:, : generated.shape[1]])
