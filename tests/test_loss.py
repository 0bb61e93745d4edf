"""The chunked head + cross-entropy equals the plain one: loss and the gradients of the hidden
states and of the head, with ignored labels, under gradient-accumulation weighting, in the model."""

from __future__ import annotations

import pytest
import torch

from rwkv_ft.models.loss import chunked_causal_lm_loss
from rwkv_ft.testing import MODEL_FACTORIES, assert_close, random_ids


def plain(hidden, weight, labels, num_items=None):
    logits = (hidden @ weight.t()).float()[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )
    return loss / (num_items if num_items is not None else (labels[:, 1:] != -100).sum())


@pytest.mark.parametrize("rows", [1, 7, 4096])
@pytest.mark.parametrize("num_items", [None, 50])
def test_equals_the_plain_loss_and_gradients(rows, num_items):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    weight = torch.randn(29, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 29, (3, 11), generator=g)
    labels[0, :5] = -100
    exact = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    expected = plain(*exact, labels, num_items)  # float64: the reference
    gh, gw = torch.autograd.grad(expected, exact)
    got = chunked_causal_lm_loss(hidden, weight, labels, rows=rows, num_items_in_batch=num_items)
    ch, cw = torch.autograd.grad(got, (hidden, weight))
    assert_close(got, expected, torch.float32, name="loss")
    assert_close(ch, gh, torch.float32, name="grad hidden")
    assert_close(cw, gw, torch.float32, name="grad weight")


@pytest.mark.parametrize("name", sorted(MODEL_FACTORIES))
def test_the_model_in_training_uses_it_with_the_same_result(name):
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
