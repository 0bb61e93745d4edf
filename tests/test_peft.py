"""LoRA-family adapters on RWKV-4 through plain peft: default targets, merge parity, save/load,
several adapters, modules_to_save, DoRA / rsLoRA / PiSSA, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import rwkv_ft  # noqa: F401  (registers the Auto classes and the peft defaults)
from rwkv_ft import Rwkv4ForCausalLM
from rwkv_ft.models import RWKV4
from rwkv_ft.testing import assert_close, randomize_, tiny_config


def base_model(seed: int = 1, dtype: torch.dtype = torch.float32) -> Rwkv4ForCausalLM:
    model = randomize_(Rwkv4ForCausalLM(tiny_config()), seed=seed).eval()
    return model.to(dtype) if dtype != torch.float32 else model


def random_ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def test_default_targets_are_the_block_linears():
    model = get_peft_model(base_model(), LoraConfig(r=4))
    adapted = {
        name.removesuffix(".lora_A.default") for name, _ in model.named_modules() if name.endswith(".lora_A.default")
    }
    expected = {
        f"base_model.model.rwkv.blocks.{i}.{part}"
        for i in range(2)
        for part in (
            "att.key",
            "att.value",
            "att.receptance",
            "att.output",
            "ffn.key",
            "ffn.value",
            "ffn.receptance",
        )
    }
    assert adapted == expected
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert set(model.peft_config["default"].target_modules) == set(RWKV4.lora_target_modules)


@pytest.mark.parametrize("kwargs", [{}, {"use_dora": True}, {"use_rslora": True}], ids=["lora", "dora", "rslora"])
def test_unmerged_equals_merged(kwargs):
    ids = random_ids()
    base = logits(base_model(), ids)
    model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)).eval()
    unmerged = logits(model, ids)
    assert (unmerged - base).abs().max() > 1e-2, "the adapter should change the logits"
    merged = logits(model.merge_and_unload(), ids)
    assert_close(merged, unmerged, name="merge_and_unload vs unmerged")


def test_bf16_merge_within_bf16_tolerance():
    ids = random_ids()
    model = get_peft_model(base_model(dtype=torch.bfloat16), LoraConfig(r=4, init_lora_weights=False)).eval()
    unmerged = logits(model, ids)
    merged = logits(model.merge_and_unload(), ids)
    # Merging rounds W + BA to bf16 once more than the unmerged path: one bf16 rounding per weight.
    assert_close(merged, unmerged, torch.bfloat16, name="bf16 merged vs unmerged")


def test_save_and_reload_adapter(tmp_path):
    ids = random_ids()
    model = get_peft_model(base_model(), LoraConfig(r=4, init_lora_weights=False)).eval()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(base_model(), tmp_path / "adapter").eval()
    assert_close(logits(reloaded, ids), expected, name="reloaded adapter")


def test_several_adapters_switch(tmp_path):
    ids = random_ids()
    torch.manual_seed(0)
    first = get_peft_model(base_model(), LoraConfig(r=4, init_lora_weights=False)).eval()
    torch.manual_seed(1)
    second = get_peft_model(base_model(), LoraConfig(r=2, target_modules=["key"], init_lora_weights=False)).eval()
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    expected_a, expected_b, expected_base = logits(first, ids), logits(second, ids), logits(base_model(), ids)

    model = PeftModel.from_pretrained(base_model(), tmp_path / "a", adapter_name="a").eval()
    model.load_adapter(tmp_path / "b", adapter_name="b")
    model.set_adapter("b")
    assert_close(logits(model, ids), expected_b, name="adapter b")
    model.set_adapter("a")
    assert_close(logits(model, ids), expected_a, name="adapter a")
    with model.disable_adapter():
        assert_close(logits(model, ids), expected_base, name="adapters disabled")


def test_modules_to_save_head_trains_and_round_trips(tmp_path):
    ids = random_ids()
    model = get_peft_model(base_model(), LoraConfig(r=4, modules_to_save=["head"]))
    head_params = [n for n, p in model.named_parameters() if p.requires_grad and "head" in n]
    assert head_params, "the head copy must be trainable"
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    expected = logits(model, ids)
    assert (expected - logits(base_model(), ids)).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(base_model(), tmp_path / "adapter").eval()
    assert_close(logits(reloaded, ids), expected, name="reloaded head adapter")
    assert_close(logits(reloaded.merge_and_unload(), ids), expected, name="merged head adapter")


def test_pissa_init_keeps_the_function():
    # PiSSA moves the top singular directions of W into the adapter and leaves the residual in the
    # base, so right after init the model computes the same function.
    ids = random_ids()
    expected = logits(base_model(), ids)
    model = get_peft_model(base_model(), LoraConfig(r=4, init_lora_weights="pissa")).eval()
    assert_close(logits(model, ids), expected, rel=1e-4, name="PiSSA at init")


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_with_lora(reentrant):
    ids = random_ids(2, 10)

    def lora_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = get_peft_model(base_model(), LoraConfig(r=4, init_lora_weights=False))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            # Reentrant checkpointing needs an input that requires grad, or no gradient reaches LoRA.
            model.enable_input_require_grads()
            assert model.base_model.model.rwkv.gradient_checkpointing
        model.train()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = lora_grads(False), lora_grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        assert_close(checkpointed[name], plain[name], rel=1e-4, name=name)
