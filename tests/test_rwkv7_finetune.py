"""Fine-tuning RWKV-7: peft LoRA defaults, merging (also into a .pth the `rwkv` package runs),
8-bit and 4-bit bases, state tuning with its BlinkDL state file proven in the `rwkv` package, and
the recipes end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

import rwkv_ft  # noqa: F401  (registers the Auto classes and the peft defaults)
from rwkv_ft.adapters import StateTuningConfig, add_state_tuning, save_adapter
from rwkv_ft.cli import main
from rwkv_ft.testing import assert_close, random_ids, randomize_, relative_error, rwkv_package_model, tiny_rwkv7_config

ROOT = Path(__file__).resolve().parents[1]


def base(**overrides):
    from rwkv_ft.models.rwkv7 import Rwkv7ForCausalLM

    return randomize_(Rwkv7ForCausalLM(tiny_rwkv7_config(**overrides)), seed=1).eval()


def package_logits(pth: Path, ids: list[int], state=None) -> torch.Tensor:
    package = rwkv_package_model(7).RWKV(model=str(pth.with_suffix("")), strategy="cpu fp32")
    out = []
    for token in ids:
        logits, state = package.forward([token], state)
        out.append(logits.float())
    return torch.stack(out)


def train(model, params, ids, steps=12, lr=2e-2) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def test_lora_defaults_adapt_the_big_linears_only():
    model = get_peft_model(base(), LoraConfig(r=4))
    adapted = {n.rsplit(".lora_A", 1)[0].split("model.rwkv.")[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    expected = {f"blocks.{i}.{m}" for i in range(2) for m in
                ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")}  # fmt: skip
    assert adapted == expected


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"use_rslora": True}], ids=["lora", "dora", "rslora"])
def test_unmerged_equals_merged_equals_merge_and_unload(tmp_path, variant):
    from rwkv_ft.merge import merge_adapter

    base().save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    peft_model = get_peft_model(base(), LoraConfig(r=4, init_lora_weights=False, **variant)).eval()
    save_adapter(peft_model, tmp_path / "adapter")
    ids = random_ids(2, 10, 97, seed=2)
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        merged_in_memory = peft_model.merge_and_unload()(ids).logits
    report = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(report.out).eval()(ids).logits
    assert_close(merged_in_memory, unmerged, rel=1e-5, name="merge_and_unload")
    assert_close(merged, unmerged, rel=1e-5, name="rwkv-ft merge")


def test_merged_pth_runs_in_the_rwkv_package_like_the_unmerged_model(tmp_path):
    base().save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    peft_model = get_peft_model(base(), LoraConfig(r=4, init_lora_weights=False)).eval()
    save_adapter(peft_model, tmp_path / "adapter")
    rc = main(
        ["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged.pth"), "--format", "pth"]
    )
    assert rc == 0
    ids = random_ids(1, 9, 97, seed=3)
    with torch.no_grad():
        expected = peft_model(ids).logits[0]
    assert_close(package_logits(tmp_path / "merged.pth", ids[0].tolist()), expected, rel=1e-5, name="package logits")


@pytest.mark.parametrize("mode,tolerance", [("int8", 3e-2), ("nf4", 0.2)])
def test_quantized_bases_stay_close_and_qlora_lowers_the_loss(tmp_path, mode, tolerance):
    """Measured: 8-bit ~1e-2, NF4 ~1e-1 relative logits error (C=64, bitsandbytes' CPU kernels need >= 64)."""
    from peft import prepare_model_for_kbit_training

    from rwkv_ft.quantization import load_quantized, quantized_linear_names

    reference = base(hidden_size=64, head_size=16, intermediate_size=128)
    reference.save_pretrained(tmp_path / "base")
    quantized = load_quantized(tmp_path / "base", mode, dtype=torch.float32).eval()
    names = quantized_linear_names(quantized)
    assert len(names) == 2 * 6 and all(".att." in n or ".ffn." in n for n in names)
    assert quantized.rwkv.blocks[1].att.w1.dtype == torch.float32  # low-rank maps, norms, decay: kept
    ids = random_ids(2, 10, 97, seed=4)
    with torch.no_grad():
        err = relative_error(quantized(ids).logits, reference(ids).logits)
    assert err < tolerance, err
    model = get_peft_model(prepare_model_for_kbit_training(quantized), LoraConfig(r=8))
    losses = train(model, [p for p in model.parameters() if p.requires_grad], ids, steps=8, lr=1e-2)
    assert losses[-1] < losses[0], losses


def test_qlora_adapter_folds_into_the_full_precision_base(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rwkv_ft.quantization import load_quantized

    shape = dict(hidden_size=64, head_size=16, intermediate_size=128)
    base(**shape).save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    quantized = load_quantized(tmp_path / "base", "nf4", dtype=torch.float32)
    peft_model = get_peft_model(quantized, LoraConfig(r=4, init_lora_weights=False)).eval()
    save_adapter(peft_model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 0
    assert "trained on a 4-bit nf4 base" in capsys.readouterr().out
    ids = random_ids(2, 10, 97, seed=8)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(ids).logits
        full = PeftModel.from_pretrained(base(**shape), tmp_path / "adapter").eval()(ids).logits
    assert_close(merged, full, name="merged vs the fp32 base + adapter")


def test_state_tuning_trains_only_the_state_and_its_blinkdl_file_runs_in_the_package(tmp_path):
    model = base(head_size=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = add_state_tuning(model, StateTuningConfig())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"rwkv.initial_state.wkv"}
    ids = random_ids(4, 12, 97, seed=5)
    losses = train(model, list(state.parameters()), ids)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    # Export: merged (= the base) .pth and the BlinkDL state file, both read by the rwkv package.
    model.save_pretrained(tmp_path / "base")  # the base weights, unchanged by state tuning
    save_adapter(model, tmp_path / "adapter")
    rc = main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "m.pth"), "--format", "pth"])
    assert rc == 0 and (tmp_path / "m.state.pth").exists()
    time_state = torch.load(tmp_path / "m.state.pth", weights_only=True)
    assert set(time_state) == {"blocks.0.att.time_state", "blocks.1.att.time_state"}
    assert time_state["blocks.0.att.time_state"].shape == (3, 16, 16)
    C = model.config.hidden_size
    package_state = []
    for i in range(2):
        package_state += [torch.zeros(C), time_state[f"blocks.{i}.att.time_state"].clone(), torch.zeros(C)]
    prompt = random_ids(1, 7, 97, seed=6)
    with torch.no_grad():
        ours = model(prompt).logits[0]
    assert_close(package_logits(tmp_path / "m.pth", prompt[0].tolist(), package_state), ours, rel=1e-5, name="state")


@pytest.mark.parametrize("base_kind", ["bf16", "nf4"])
def test_state_tuning_on_a_bf16_or_nf4_base_trains_only_the_state(tmp_path, base_kind):
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from rwkv_ft.quantization import load_quantized

    base(hidden_size=64, head_size=16, intermediate_size=128).save_pretrained(tmp_path / "base")
    if base_kind == "nf4":  # bitsandbytes' CPU 4-bit kernels need in_features >= 64
        model = prepare_model_for_kbit_training(load_quantized(tmp_path / "base", "nf4", dtype=torch.float32))
    else:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = add_state_tuning(model, StateTuningConfig())
    assert all(p.dtype == torch.float32 for p in state.parameters())  # the learned state stays fp32
    losses = train(model, list(state.parameters()), random_ids(4, 12, 97, seed=9), steps=10)
    assert losses[-1] < losses[0] - 0.02, losses
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} changed"


def test_state_tuning_with_token_shift_composes_with_lora():
    model = get_peft_model(base(), LoraConfig(r=4))
    add_state_tuning(model, StateTuningConfig(train_token_shift=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {"wkv", "att_shift", "ffn_shift"} <= {n.split(".")[-1] for n in trainable}
    assert any("lora_A" in n for n in trainable)
    ids = random_ids(2, 8, 97, seed=7)
    losses = train(model, [p for p in model.parameters() if p.requires_grad], ids, steps=6)
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------------
# Recipes


RWKV7_RECIPES = sorted((ROOT / "recipes").glob("rwkv7_*.yaml"))


def test_rwkv7_recipes_cover_chat_alpaca_qlora_and_state_tuning():
    from rwkv_ft.recipe import load_recipe

    kinds = {(r.adapter.type, r.model.quantization, r.data.template) for r in map(load_recipe, RWKV7_RECIPES)}
    assert {("lora", None), ("lora", "nf4"), ("state", None)} <= {k[:2] for k in kinds}
    assert any(template == "g1" for *_, template in kinds)


QUICKSTART_VARIANTS = {
    "lora": [],
    "state": ["adapter.type=state"],
    "packed_checkpointed": ["data.pack=true", "training.gradient_checkpointing=true"],
}


@pytest.mark.parametrize("extra", QUICKSTART_VARIANTS.values(), ids=QUICKSTART_VARIANTS.keys())
def test_rwkv7_quickstart_trains_merges_and_generates(tmp_path, capsys, extra):
    recipe = ROOT / "recipes" / "quickstart_rwkv7.yaml"
    args = ["model.config={vocab_size: 65536, hidden_size: 64, num_hidden_layers: 2, head_size: 32}",
            "training.max_steps=3", "data.max_length=96", "generate.max_new_tokens=4", *extra]  # fmt: skip
    assert main(["train", str(recipe), *args, f"training.output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "merged model:" in out and "sample:" in out
    from rwkv_ft.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(str(tmp_path / "merged"))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "User: hi\n\nAssistant:"
