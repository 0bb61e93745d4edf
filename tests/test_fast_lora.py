"""LoRA computed in the activations' dtype (rwkv_ft.adapters.fast_lora): the same function as peft's
forward, fp32 master weights and gradients, peft's fallbacks, and unchanged saving and merging."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

import rwkv_ft  # noqa: F401  (registers the Auto classes and the peft defaults)
from rwkv_ft.adapters.fast_lora import FastLoraLinear, disable_fast_lora, enable_fast_lora, linear_plus_low_rank
from rwkv_ft.models.modeling_utils import rwkv_blocks
from rwkv_ft.testing import MODEL_FACTORIES, assert_close, random_ids, relative_error

LINEAR_PLUS_LOW_RANK = torch.ops.rwkv_ft.linear_plus_low_rank.default


def peft_model(version="rwkv4", dtype=torch.float32, seed=0, **config):
    base = MODEL_FACTORIES[version]().to(dtype)
    torch.manual_seed(seed)
    kwargs = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **config}
    return get_peft_model(base, LoraConfig(**kwargs))


def step(model, ids):
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("version", sorted(MODEL_FACTORIES))
def test_fp32_equals_peft(version):
    """With fp32 activations the fast forward is peft's math (scaling folded into B): loss, logits
    and every adapter gradient agree to fp32 rounding."""
    ids = random_ids(2, 7, seed=1)
    stock = peft_model(version).train()
    fast = copy.deepcopy(stock)
    assert enable_fast_lora(fast) == sum(isinstance(m, LoraLinear) for m in stock.modules()) > 0
    loss, grads = step(fast, ids)
    ref_loss, ref_grads = step(stock, ids)
    assert_close(loss, ref_loss, name="loss")
    for name, g in grads.items():
        assert_close(g, ref_grads[name], name=name)


@pytest.mark.parametrize("version", sorted(MODEL_FACTORIES))
def test_bf16_keeps_fp32_master_weights_and_is_as_accurate_as_peft(version):
    """bf16 base: the adapter weights and their gradients stay fp32, the block outputs stay bf16,
    and the step is as close to fp32 arithmetic on the same weights as peft's fp32-upcast path is."""
    ids = random_ids(2, 7, seed=2)
    stock = peft_model(version, torch.bfloat16).train()
    fp32, fast = copy.deepcopy(stock).float(), copy.deepcopy(stock)
    enable_fast_lora(fast)
    ref = step(fp32, ids)
    results = {"fast": step(fast, ids), "peft": step(stock, ids)}
    assert all(p.dtype == torch.float32 for n, p in fast.named_parameters() if p.requires_grad)
    errors = {}
    for key, (loss, grads) in results.items():
        assert all(g.dtype == torch.float32 for g in grads.values())
        flat = torch.cat([grads[n].flatten() for n in sorted(grads)])
        ref_flat = torch.cat([ref[1][n].flatten() for n in sorted(grads)])
        errors[key] = (relative_error(loss, ref[0]), relative_error(flat, ref_flat))
    assert errors["fast"][0] <= 2 * errors["peft"][0] + 1e-3, errors
    assert errors["fast"][1] <= 1.5 * errors["peft"][1] + 1e-3, errors


def test_bf16_adapters_compute_in_bf16():
    """No fp32 activation is made: every matmul in a bf16 fast-LoRA forward takes bf16 operands."""
    model = peft_model(dtype=torch.bfloat16).train()
    enable_fast_lora(model)
    seen = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, LINEAR_PLUS_LOW_RANK):
                seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
            return func(*args, **(kwargs or {}))

    lora = next(m for m in model.modules() if isinstance(m, FastLoraLinear))
    x = torch.randn(2, 5, lora.in_features, dtype=torch.bfloat16)
    with Record():
        lora(x)
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen), seen


@pytest.mark.parametrize("version", sorted(MODEL_FACTORIES))
def test_selective_recompute_keeps_the_adapted_linears_outputs(version, monkeypatch):
    """An adapted Linear's output is one product (the base product added onto the LoRA term), which
    selective recompute keeps: its backward runs no addmm again (before, every adapted Linear's LoRA
    addition did), and the gradients are those of a run without recompute."""
    from rwkv_ft.models import modeling_utils

    monkeypatch.setattr(modeling_utils, "SELECTIVE_MIN_INNER_DIM", 8)  # the tiny widths count as large, r = 4 not
    ids = random_ids(2, 7, seed=7)
    model = peft_model(version, torch.bfloat16).train()
    enable_fast_lora(model)
    expected_loss, expected = step(copy.deepcopy(model), ids)
    model.set_activation_recompute("selective")
    assert all(block.selective_recompute for block in rwkv_blocks(model))
    addmm_in_backward = []

    class CountAddmm(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.addmm.default, LINEAR_PLUS_LOW_RANK):
                addmm_in_backward.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    loss = model(ids, labels=ids).loss
    with CountAddmm():
        loss.backward()
    assert addmm_in_backward == []
    assert torch.equal(loss, expected_loss)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, expected[name]), name


def test_dropout_is_applied_to_the_adapter_input():
    """lora_dropout drops the adapter's input as peft does: the same seed gives peft's output."""
    stock = peft_model(lora_dropout=0.5).train()
    fast = copy.deepcopy(stock)
    enable_fast_lora(fast)
    ids = random_ids(2, 7, seed=3)
    torch.manual_seed(5)
    ref = stock(ids).logits
    torch.manual_seed(5)
    assert_close(fast(ids).logits, ref, name="logits with dropout")


def test_fallbacks_run_peft_forward():
    """DoRA, disabled or merged adapters and fp16 activations (outside autocast) take peft's path."""
    ids = random_ids(2, 6, seed=4)
    dora = peft_model(use_dora=True).eval()
    expected = dora(ids).logits
    enable_fast_lora(dora)
    assert torch.equal(dora(ids).logits, expected)

    model = peft_model().eval()
    enable_fast_lora(model)
    base = MODEL_FACTORIES["rwkv4"]().eval()(ids).logits
    with model.disable_adapter():
        assert torch.equal(model(ids).logits, base)
    unmerged = model(ids).logits
    model.merge_adapter()
    assert_close(model(ids).logits, unmerged, name="merged")
    model.unmerge_adapter()

    half = peft_model(dtype=torch.float16).eval()
    expected = half(ids).logits
    enable_fast_lora(half)
    assert torch.equal(half(ids).logits, expected)


def test_saving_merging_and_switching_back(tmp_path):
    """The swap changes no parameter name: the saved adapter reloads into a stock peft model with the
    same outputs, merge_and_unload gives plain Linears, and disable_fast_lora restores peft's class."""
    ids = random_ids(2, 6, seed=6)
    model = peft_model().eval()
    enable_fast_lora(model)
    out = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(MODEL_FACTORIES["rwkv4"](), tmp_path / "adapter").eval()
    assert_close(reloaded(ids).logits, out, name="reloaded")
    assert disable_fast_lora(model) > 0 and not any(isinstance(m, FastLoraLinear) for m in model.modules())
    enable_fast_lora(model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert_close(merged(ids).logits, out, name="merged")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_plus_low_rank_op_registration(dtype):
    """The op's schema, fake implementation and autograd formula pass torch's own checks."""
    g = torch.Generator().manual_seed(8)
    args = [torch.randn(*shape, generator=g).to(dtype) for shape in ((6, 16), (12, 16), (6, 4), (12, 4))]
    for t in (args[0], args[2], args[3]):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.rwkv_ft.linear_plus_low_rank, args)
    args[1].requires_grad_(True)  # a trained base weight (full fine-tuning through the same op)
    torch.library.opcheck(torch.ops.rwkv_ft.linear_plus_low_rank, args)


@pytest.mark.parametrize("trained_weight", [False, True])
def test_linear_plus_low_rank_against_float64(trained_weight):
    """x @ W.T + xa @ b.T and the gradients of every input that needs one, against float64
    autograd on plain ops; no gradient for a frozen base weight."""
    g = torch.Generator().manual_seed(9)
    x, weight, xa, b = (torch.randn(*shape, generator=g) for shape in ((37, 24), (40, 24), (37, 3), (40, 3)))
    grad = torch.randn(37, 40, generator=g)
    weight.requires_grad_(trained_weight)
    inputs = [t.requires_grad_(True) if t is not weight else t for t in (x, weight, xa, b)]
    out = linear_plus_low_rank(*inputs)
    out.backward(grad)
    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    ref_x, ref_weight, ref_xa, ref_b = ref_inputs
    ref = ref_x @ ref_weight.t() + ref_xa @ ref_b.t()
    ref.backward(grad.double())
    assert_close(out, ref, name="output")
    for name, t, r in zip(("x", "weight", "xa", "b"), inputs, ref_inputs, strict=True):
        if r.requires_grad:
            assert_close(t.grad, r.grad, name=f"grad of {name}")
        else:
            assert t.grad is None, name


def test_one_adapter_runs_as_one_op_without_a_copy_of_the_lora_term():
    """With one adapter and bf16 activations, an adapted Linear is one `linear_plus_low_rank` call
    (the base product accumulated onto the LoRA term in place, no addmm into a new tensor), with
    the output of the composed form (addmm of the base product onto the LoRA term) bit for bit."""
    model = peft_model(dtype=torch.bfloat16).train()
    enable_fast_lora(model)
    lora = next(m for m in model.modules() if isinstance(m, FastLoraLinear))
    x = torch.randn(2, 5, lora.in_features, dtype=torch.bfloat16)
    calls = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func)
            return func(*args, **(kwargs or {}))

    with Record():
        out = lora(x)
    assert calls.count(LINEAR_PLUS_LOW_RANK) == 1 and torch.ops.aten.addmm.default not in calls, calls
    rows = x.reshape(-1, x.shape[-1])
    a = lora.lora_A["default"].weight.to(x.dtype)
    b = (lora.lora_B["default"].weight * lora.scaling["default"]).to(x.dtype)
    composed = torch.addmm((rows @ a.t()) @ b.t(), rows, lora.base_layer.weight.t())
    assert torch.equal(out.reshape(composed.shape), composed)


def test_meta_tensors_take_the_one_op_path():
    """Shape-only runs (benchmarks/activation_memory.py runs the model on meta tensors) go through
    the op's fake implementation: meta has no autocast to ask about."""
    model = peft_model(dtype=torch.bfloat16).train()
    enable_fast_lora(model)
    lora = next(m for m in model.modules() if isinstance(m, FastLoraLinear)).to_empty(device="meta")
    out = lora(torch.empty(2, 5, lora.in_features, dtype=torch.bfloat16, device="meta"))
    assert out.shape == (2, 5, lora.out_features) and out.device.type == "meta"
