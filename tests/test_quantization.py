"""bitsandbytes 8-bit / NF4 / FP4 loading through the standard transformers API, on CPU: which
layers are quantized, logits close to fp32 within the documented tolerance, QLoRA training."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

import rwkv_ft  # noqa: F401  (registers the Auto classes)
from rwkv_ft import Rwkv4ForCausalLM
from rwkv_ft.quantization import bnb_config, load_quantized, quantization_info, quantized_linear_names
from rwkv_ft.testing import randomize_, relative_error, tiny_config

# Relative Frobenius error of all logits vs fp32, measured on this model (8-bit 1.1e-2, NF4 9.3e-2,
# FP4 1.3e-1; see rwkv_ft/quantization.py), bounded here with ~1.5-2.5x headroom.
TOLERANCE = {"8bit": 0.03, "nf4": 0.15, "fp4": 0.2}
BLOCK_LINEARS = (
    "att.key",
    "att.value",
    "att.receptance",
    "att.output",
    "ffn.key",
    "ffn.value",
    "ffn.receptance",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # C=128 so the 4-bit blocks (64 values) and 8-bit rows are realistic; small vocab keeps it fast.
    config = tiny_config(hidden_size=128, intermediate_size=256, vocab_size=97, num_hidden_layers=2)
    model = randomize_(Rwkv4ForCausalLM(config), seed=3).eval()
    path = tmp_path_factory.mktemp("quant") / "base"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(model_dir, ids) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir).eval()(ids).logits


@pytest.mark.parametrize("mode", ["8bit", "nf4", "fp4"])
def test_quantized_layers_and_logits(model_dir, ids, reference, mode):
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config(mode)).eval()
    expected = {f"rwkv.blocks.{i}.{part}" for i in range(2) for part in BLOCK_LINEARS}
    assert set(quantized_linear_names(model)) == expected
    params = dict(model.named_parameters())
    for name, p in params.items():
        if "time_decay" in name or "time_first" in name:
            assert p.dtype == torch.float32, name
        elif any(s in name for s in (".ln", "time_mix", "emb.", "head.")):
            assert p.dtype == torch.float32, f"{name} should not be quantized, is {p.dtype}"
    assert type(model.head) is torch.nn.Linear and type(model.rwkv.emb) is torch.nn.Embedding

    with torch.no_grad():
        logits = model(ids).logits.float()
    assert torch.isfinite(logits).all()
    err = relative_error(logits, reference)
    assert err < TOLERANCE[mode], f"{mode}: logits relative error {err:.3e} > {TOLERANCE[mode]}"
    assert err > 1e-4, "quantization should change the logits somewhat; were the layers really quantized?"
    info = quantization_info(model)
    assert info["load_in_8bit"] == (mode == "8bit") and info["load_in_4bit"] == (mode != "8bit")


def test_nf4_double_quant_bf16_compute(model_dir):
    model = load_quantized(model_dir, "nf4", compute_dtype=torch.bfloat16, double_quant=True)
    layer = model.rwkv.blocks[0].att.key
    assert layer.compute_dtype == torch.bfloat16
    assert layer.weight.quant_state.nested, "double quantization should quantize the block scales"
    assert layer.weight.quant_type == "nf4"


@pytest.mark.parametrize("mode", ["8bit", "nf4"])
def test_qlora_steps_lower_the_loss(model_dir, ids, mode):
    model = load_quantized(model_dir, mode)
    model = prepare_model_for_kbit_training(model)  # also turns on gradient checkpointing
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16))
    frozen = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and p.is_floating_point()
    }
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} changed"


def test_bad_mode_names_the_choices():
    with pytest.raises(ValueError, match="int8, nf4, fp4"):
        bnb_config("int4")


def test_kbit_preparation_keeps_frozen_embedding_and_head_in_bf16(model_dir, ids):
    from rwkv_ft.quantization import prepare_for_kbit_training

    model = load_quantized(model_dir, "nf4", dtype=torch.bfloat16)
    model = prepare_for_kbit_training(model, gradient_checkpointing=True)
    assert model.rwkv.emb.weight.dtype == torch.bfloat16 and model.head.weight.dtype == torch.bfloat16
    assert model.rwkv.ln_out.weight.dtype == torch.float32  # peft's fp32 upcast of the rest stays
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16)).train()
    loss = model(ids, labels=ids).loss  # mixed dtypes without autocast: the model casts at the seams
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
