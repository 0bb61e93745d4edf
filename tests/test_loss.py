"""The chunked head + cross-entropy equals the plain one: loss and the gradients of the hidden
states and of the head, with ignored labels, under gradient-accumulation weighting, in the model;
the logits are computed once (the gradient with the loss), never again in the backward."""

from __future__ import annotations

import pytest
import torch

import rwkv_ft.models.loss as loss_module
from rwkv_ft.models.loss import chunked_causal_lm_loss
from rwkv_ft.testing import MODEL_FACTORIES, assert_close, random_ids

BACKENDS = ["triton", "torch"]  # the kernel runs under TRITON_INTERPRET=1 (conftest.py)


def plain(hidden, weight, labels, num_items=None):
    logits = (hidden @ weight.t()).float()[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )
    return loss / (num_items if num_items is not None else (labels[:, 1:] != -100).sum())


def inputs(seed=0, vocab=29):
    """A vocabulary not a multiple of 64 (the head is padded inside the loss) unless `vocab` is."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    weight = torch.randn(vocab, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (3, 11), generator=g)
    labels[0, :5] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [1, 7, 4096])
@pytest.mark.parametrize("num_items", [None, 50])
@pytest.mark.parametrize("vocab", [29, 128])
def test_equals_the_plain_loss_and_gradients(rows, num_items, backend, vocab):
    hidden, weight, labels = inputs(vocab=vocab)
    exact = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    expected = plain(*exact, labels, num_items)  # float64: the reference
    gh, gw = torch.autograd.grad(expected * 2.5, exact)  # an incoming gradient other than 1
    got = chunked_causal_lm_loss(hidden, weight, labels, rows=rows, num_items_in_batch=num_items, backend=backend)
    ch, cw = torch.autograd.grad(got * 2.5, (hidden, weight))
    assert_close(got, expected, torch.float32, name="loss")
    assert_close(ch, gh, torch.float32, name="grad hidden")
    assert_close(cw, gw, torch.float32, name="grad weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_hidden_within_rounding_of_float64(backend):
    """bf16 activations and head (the training dtype): loss fp32-tight, gradients within bf16's."""
    hidden, weight, labels = inputs(1)
    exact = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    expected = plain(*exact, labels)
    gh, gw = torch.autograd.grad(expected, exact)
    h16, w16 = (x.detach().bfloat16().requires_grad_() for x in (hidden, weight))
    got = chunked_causal_lm_loss(h16, w16, labels, rows=7, backend=backend)
    ch, cw = torch.autograd.grad(got, (h16, w16))
    assert got.dtype == torch.float32 and ch.dtype == cw.dtype == torch.bfloat16
    # the logits come out of a bf16 matmul: the loss is fp32-tight against the plain loss of those
    assert_close(got, plain(h16.detach(), w16.detach(), labels), torch.float32, name="loss of the bf16 logits")
    assert_close(ch, gh, torch.bfloat16, name="grad hidden")
    assert_close(cw, gw, torch.bfloat16, name="grad weight")


def test_logits_computed_once_and_gradient_only_when_needed(monkeypatch):
    """With autograd on, each block of rows goes through the kernel once, with its gradient, in the
    forward; the backward runs no kernel. Under no_grad, or for inputs that need no gradient, the
    kernel computes the loss alone."""
    calls = []
    kernel = loss_module.cross_entropy_rows

    def spy(logits, targets, *, with_grad, **kwargs):
        calls.append(with_grad)
        return kernel(logits, targets, with_grad=with_grad, **kwargs)

    monkeypatch.setattr(loss_module, "cross_entropy_rows", spy)
    hidden, weight, labels = inputs()
    loss = chunked_causal_lm_loss(hidden, weight, labels, rows=7)
    assert calls == [True] * 5  # 33 rows in blocks of 7
    loss.backward()
    assert len(calls) == 5
    with torch.no_grad():
        chunked_causal_lm_loss(hidden, weight, labels, rows=7)
    chunked_causal_lm_loss(hidden.detach(), weight.detach(), labels, rows=7)
    assert calls[5:] == [False] * 10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(MODEL_FACTORIES))
def test_the_model_in_training_uses_it_with_the_same_result(name, backend, monkeypatch):
    """On CPU the model's loss runs the reference ("auto" takes the kernel on CUDA only); here it
    also runs the kernel, as it does on a GPU."""
    kernel = loss_module.cross_entropy_rows
    monkeypatch.setattr(loss_module, "cross_entropy_rows", lambda *a, **kw: kernel(*a, **{**kw, "backend": backend}))
    model = MODEL_FACTORIES[name]().train()
    ids = random_ids(2, 13, model.config.vocab_size, seed=1)
    fused = model(ids, labels=ids)
    assert fused.logits is None  # the logits were never materialised
    fused.loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.loss_chunk_rows = None
    plain_out = model(ids, labels=ids)
    plain_out.loss.backward()
    assert_close(fused.loss, plain_out.loss, name="loss")
    for n, p in model.named_parameters():
        assert_close(fused_grads[n], p.grad, name=n)


def test_a_trained_half_head_gradient_is_rounded_as_it_is_scaled():
    """The head's fp32 gradient sum is scaled by the incoming gradient and rounded to bf16 in one
    pass: bit for bit the two-step result, and the backward makes no fp32 tensor of the head's size
    (1 GiB at V 65,536 x C 4,096)."""
    hidden, weight, labels = inputs(2)
    h16, w16 = (x.detach().bfloat16().requires_grad_() for x in (hidden, weight))
    loss = chunked_causal_lm_loss(h16, w16, labels, rows=7) * 0.3
    made = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.extend((t.dtype, tuple(t.shape)) for t in [out] if isinstance(t, torch.Tensor))
            return out

    with Record():
        (grad_weight,) = torch.autograd.grad(loss, w16)
    assert (torch.float32, tuple(w16.shape)) not in made, made
    scaled = torch.randn(29, 16) * 1e3
    scale = torch.tensor(1 / 3)
    with torch.no_grad():
        assert torch.equal(loss_module._scaled_to(scaled, scale, torch.bfloat16), (scaled * scale).bfloat16())
    assert grad_weight.dtype == torch.bfloat16
