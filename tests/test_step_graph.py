"""`rwkv_ft.step_graph.StepGraphs`: a recorded micro-step gives the eager micro-step's loss and
gradients, batch after batch, under gradient accumulation, with right padding; batches a graph
cannot stand for run eagerly and say why.

CUDA graphs need a GPU, so these tests record with `rwkv_ft.testing.RerunRecorder`: its "replay"
runs the recorded function again on the recorded input tensors and writes the results into the
recorded output tensors, which is what a CUDA graph's replay does to them. Everything around the recording (when a
signature is recorded, the copy into the recorded inputs, the gradients' accumulation and aliasing,
the eager fallbacks, the token check) is the code that runs on the GPU. The recording itself runs on
the GPU in `benchmarks/bench_step.py --step-graph`, which checks the replayed gradients against an
eager step before it times them.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import rwkv_ft  # noqa: F401  (registers the Auto classes and the peft defaults)
from rwkv_ft.step_graph import StepGraphs
from rwkv_ft.testing import MODEL_FACTORIES, RerunRecorder, assert_close, random_ids


def lora_model(version: str):
    model = get_peft_model(MODEL_FACTORIES[version](), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    for name, p in model.named_parameters():  # LoRA B starts at zero: give every gradient a value
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(3))
    return model.train()


def trained(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def eager_grads(model, batches: list[dict]) -> tuple[list[float], list[torch.Tensor]]:
    """Losses and the accumulated gradients of `loss.backward()` over `batches`."""
    model.zero_grad(set_to_none=True)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    grads = [p.grad.clone() for p in trained(model)]
    model.zero_grad(set_to_none=True)
    return losses, grads


def graphed(model, recorder=None, **kwargs) -> StepGraphs:
    return StepGraphs(
        lambda inputs: model(**inputs).loss,
        trained(model),
        recorder=recorder or RerunRecorder(),
        vocab_size=model.config.vocab_size,
        **kwargs,
    )


def batch_of(seed: int, B: int = 2, T: int = 9) -> dict:
    ids = random_ids(B, T, seed=seed)
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("version", sorted(MODEL_FACTORIES))
def test_replayed_steps_give_the_eager_loss_and_gradients(version):
    model = lora_model(version)
    recorder = RerunRecorder()
    RerunRecorder.recorded = RerunRecorder.replays = 0
    steps = graphed(model, recorder, warmup=1)
    for seed in range(4):
        batch = batch_of(seed)
        (expected_loss,), expected = eager_grads(model, [batch])
        loss = steps(batch)
        assert steps.eager_reason is None
        assert_close(loss, expected_loss, name=f"loss, batch {seed}")
        for i, (p, g) in enumerate(zip(trained(model), expected)):
            assert_close(p.grad, g, name=f"gradient {i}, batch {seed}")
        model.zero_grad(set_to_none=True)
    # batch 0 warms up, batch 1 is recorded and replayed, batches 2 and 3 replay
    assert (recorder.recorded, recorder.replays, len(steps.graphs)) == (1, 3, 1)


def test_gradient_accumulation_sums_replays_without_aliasing():
    """Two replays into gradients left from the first: the second must not overwrite the first's
    (the first micro-step's `.grad` is the graph's own output tensor until the next replay)."""
    model = lora_model("rwkv4")
    steps = graphed(model, warmup=0)
    batches = [batch_of(1), batch_of(2), batch_of(3)]
    _, expected = eager_grads(model, batches)
    for batch in batches:
        steps(batch)
    for i, (p, g) in enumerate(zip(trained(model), expected)):
        assert_close(p.grad, g, name=f"accumulated gradient {i}")


def test_a_gradient_in_another_layout_lands_in_the_parameters_layout():
    """A gradient that comes out transposed (an op that writes it so) is left in `.grad` in the
    parameter's own layout, as `backward()` leaves it."""

    class TransposedGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return w.clone()

        @staticmethod
        def backward(ctx, g):
            return g.t().contiguous().t()  # the same values, column-major

    w = torch.nn.Parameter(torch.randn(3, 5, generator=torch.Generator().manual_seed(4)))
    target = torch.randn(3, 5, generator=torch.Generator().manual_seed(5))
    steps = StepGraphs(
        lambda inputs: (TransposedGradient.apply(w) * inputs["x"]).square().sum(),
        [w],
        recorder=RerunRecorder(),
        warmup=0,
    )
    for accumulated in (1, 2):
        steps({"x": target})
        assert w.grad.stride() == w.stride() and torch.allclose(w.grad, accumulated * 2 * w.detach() * target**2)


def test_a_new_shape_is_a_new_graph_and_max_graphs_bounds_them():
    model = lora_model("rwkv4")
    recorder = RerunRecorder()
    RerunRecorder.recorded = 0
    steps = graphed(model, recorder, warmup=0, max_graphs=2)
    for T in (5, 7, 5, 7):
        steps(batch_of(T, T=T))
        model.zero_grad(set_to_none=True)
    assert (recorder.recorded, len(steps.graphs)) == (2, 2)
    batch = batch_of(0, T=11)
    (expected_loss,), expected = eager_grads(model, [batch])
    loss = steps(batch)
    assert "max_graphs" in steps.eager_reason
    assert recorder.recorded == 2
    assert_close(loss, expected_loss, name="loss of the eager fallback")
    assert_close(trained(model)[0].grad, expected[0], name="gradient of the eager fallback")


def test_right_padding_before_ignored_labels_is_replayed_exactly():
    """The collator's batches: right padding, labels -100 there. The graph runs without the mask
    (a pad only follows the real tokens); loss and gradients equal the masked eager step's."""
    model = lora_model("rwkv4")
    steps = graphed(model, warmup=0)
    ids = random_ids(2, 9, seed=5)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids.masked_fill(mask == 0, 0), "labels": labels, "attention_mask": mask}
    (expected_loss,), expected = eager_grads(model, [batch])
    loss = steps(batch)
    assert steps.eager_reason is None and len(steps.graphs) == 1
    assert "attention_mask" not in next(iter(steps.graphs.values())).static  # no host decision to record
    assert_close(loss, expected_loss, name="loss")
    for i, (p, g) in enumerate(zip(trained(model), expected)):
        assert_close(p.grad, g, name=f"gradient {i}")


@pytest.mark.parametrize(
    "case, reason",
    [
        ("left_padding", "padding other than right padding"),
        ("scored_padding", "padding other than right padding"),
        ("packed", "packed rows"),
    ],
)
def test_batches_a_graph_cannot_stand_for_run_eagerly(case, reason, caplog):
    model = lora_model("rwkv4")
    recorder = RerunRecorder()
    RerunRecorder.recorded = 0
    steps = graphed(model, recorder, warmup=0)
    ids = random_ids(2, 8, seed=6)
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": mask}
    if case == "left_padding":
        mask[0, :3] = 0
        batch["labels"][0, :3] = -100
    elif case == "scored_padding":  # right padding whose labels are scored: the mask changes the loss
        mask[0, 5:] = 0
    else:
        batch["position_ids"] = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2)
        del batch["attention_mask"]
    (expected_loss,), expected = eager_grads(model, [batch])
    with caplog.at_level("WARNING", logger="rwkv_ft.step_graph"):
        steps(batch)
        model.zero_grad(set_to_none=True)
        loss = steps(batch)
    assert reason in steps.eager_reason
    assert [r.getMessage() for r in caplog.records if reason in r.getMessage()] != [], "the user is told why"
    assert len(caplog.records) == 1, "once per reason, not at every step"
    assert RerunRecorder.recorded == 0
    assert_close(loss, expected_loss, name="loss")
    for i, (p, g) in enumerate(zip(trained(model), expected)):
        assert_close(p.grad, g, name=f"gradient {i}")


def test_token_ids_are_checked_before_every_replay():
    model = lora_model("rwkv4")
    steps = graphed(model, warmup=0)
    steps(batch_of(0))
    bad = batch_of(1)
    bad["input_ids"] = bad["input_ids"].clone()
    bad["input_ids"][1, 4] = model.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {model.config.vocab_size} is outside"):
        steps(bad)


def test_no_trained_parameters_is_a_clear_error():
    model = MODEL_FACTORIES["rwkv4"]().requires_grad_(False)
    with pytest.raises(ValueError, match="no trained parameters"):
        StepGraphs(lambda inputs: model(**inputs).loss, model.parameters())
