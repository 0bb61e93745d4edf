"""`rwkv-ft merge`: the merged model (ours, BlinkDL .pth in the `rwkv` package, transformers) gives
the unmerged peft model's logits; BASE in any format; bf16; state tuning; QLoRA; PiSSA; errors."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import rwkv_ft  # noqa: F401  (registers the Auto classes)
from rwkv_ft import Rwkv4ForCausalLM
from rwkv_ft.adapters import (
    add_state_tuning,
    blinkdl_state,
    load_initial_state,
    load_state_tuning,
    save_adapter,
)
from rwkv_ft.cli import main
from rwkv_ft.convert import export_model
from rwkv_ft.merge import MergeError, merge_adapter
from rwkv_ft.testing import assert_close, randomize_, relative_error, tiny_config


def base_model(**overrides) -> Rwkv4ForCausalLM:
    return randomize_(Rwkv4ForCausalLM(tiny_config(**overrides)), seed=1).eval()


IDS = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A base in our format, a LoRA adapter (with a trained head copy) and the unmerged logits."""
    root = tmp_path_factory.mktemp("merge")
    base_model().save_pretrained(root / "base")
    torch.manual_seed(0)
    peft_model = get_peft_model(base_model(), LoraConfig(r=4, init_lora_weights=False, modules_to_save=["head"]))
    with torch.no_grad():
        peft_model.base_model.model.head.modules_to_save["default"].weight.mul_(1.25)
    peft_model.eval().save_pretrained(root / "adapter")
    return root, logits(peft_model)


def rwkv_package_logits(path, ids: torch.Tensor, state=None) -> torch.Tensor:
    """Per-token logits from BlinkDL's `rwkv` package in RNN mode, for row 0 of `ids`."""
    os.environ["RWKV_JIT_ON"] = "0"
    os.environ["RWKV_CUDA_ON"] = "0"
    rwkv_model = pytest.importorskip("rwkv.model", reason="BlinkDL's rwkv package is the dev-extra oracle")
    oracle = rwkv_model.RWKV(model=str(path), strategy="cpu fp32", verbose=False)
    out = []
    for token in ids[0].tolist():
        step, state = oracle.forward([token], state)
        out.append(step.float())
    return torch.stack(out)


def test_hf_format_via_cli(setup, capsys):
    root, expected = setup
    assert main(["merge", str(root / "base"), str(root / "adapter"), str(root / "hf")]) == 0
    assert f"wrote {root / 'hf'}" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(root / "hf")
    assert not any("lora" in k for k in merged.state_dict())
    assert_close(logits(merged), expected, name="merged (ours) vs unmerged")


def test_pth_format_runs_in_rwkv_package(setup):
    root, expected = setup
    assert main(["merge", str(root / "base"), str(root / "adapter"), str(root / "merged.pth"), "--format", "pth"]) == 0
    assert_close(rwkv_package_logits(root / "merged.pth", IDS), expected[0], rel=1e-5, name="rwkv package vs unmerged")


def test_transformers_format_runs_in_transformers(setup):
    from transformers import RwkvForCausalLM

    root, expected = setup
    assert main(["merge", str(root / "base"), str(root / "adapter"), str(root / "tf"), "--format", "transformers"]) == 0
    merged = RwkvForCausalLM.from_pretrained(root / "tf").eval()
    assert_close(logits(merged), expected, rel=1e-5, name="transformers RwkvForCausalLM vs unmerged")


@pytest.mark.parametrize("base_format", ["pth", "transformers"])
def test_base_in_other_formats(setup, base_format):
    root, expected = setup
    base = root / ("base.pth" if base_format == "pth" else "base_tf")
    if not base.exists():
        export_model(root / "base", base, format=base_format)
    report = merge_adapter(base, root / "adapter", root / f"from_{base_format}", overwrite=True)
    assert report.merged == ["lora"]
    assert_close(logits(Rwkv4ForCausalLM.from_pretrained(report.out)), expected, name=f"base as {base_format}")


def test_bf16_output_within_bf16_tolerance(setup):
    root, expected = setup
    report = merge_adapter(root / "base", root / "adapter", root / "bf16", dtype="bf16")
    merged = Rwkv4ForCausalLM.from_pretrained(report.out)
    assert merged.rwkv.blocks[0].att.key.weight.dtype == torch.bfloat16
    assert merged.rwkv.blocks[0].att.time_decay.dtype == torch.float32
    # bf16 weights and activations through 2 blocks: within the shared bf16 tolerance (1.6e-2).
    assert_close(logits(merged), expected, torch.bfloat16, name="bf16 merged vs fp32 unmerged")


def test_state_tuning_and_lora(tmp_path, capsys):
    base_model().save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    model = get_peft_model(base_model(), LoraConfig(r=4, init_lora_weights=False))
    state = add_state_tuning(model)
    with torch.no_grad():
        state.wkv_value.normal_()
        state.wkv_log_weight.normal_()
    model.eval()
    expected = logits(model)
    save_adapter(model, tmp_path / "adapter")

    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "lora + state tuning" in out and "cannot hold the learned initial state" in out
    merged = Rwkv4ForCausalLM.from_pretrained(tmp_path / "hf")
    assert (logits(merged) - expected).abs().max() > 1e-3, "without the state the model must differ"
    load_state_tuning(merged, tmp_path / "hf")
    assert_close(logits(merged), expected, name="merged + learned state")

    report = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "m.pth", format="pth")
    assert report.state_file == tmp_path / "m.state_tuning.safetensors" and report.state_file.exists()
    state = blinkdl_state(load_initial_state(report.state_file))
    assert_close(
        rwkv_package_logits(tmp_path / "m.pth", IDS, state),
        expected[0],
        rel=1e-5,
        name="rwkv package + state",
    )


def test_qlora_adapter_folds_into_full_precision_base(tmp_path, capsys):
    from rwkv_ft.quantization import load_quantized

    config = dict(hidden_size=128, intermediate_size=256)
    base_model(**config).save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    qmodel = get_peft_model(load_quantized(tmp_path / "base", "nf4"), LoraConfig(r=4, init_lora_weights=False)).eval()
    unmerged_nf4 = logits(qmodel)
    save_adapter(qmodel, tmp_path / "adapter", base_model=str(tmp_path / "base"))

    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 0
    assert "trained on a 4-bit nf4 base" in capsys.readouterr().out
    merged = logits(Rwkv4ForCausalLM.from_pretrained(tmp_path / "out"))
    # Exactly the full-precision base plus the adapter ...
    full = PeftModel.from_pretrained(base_model(**config), tmp_path / "adapter").eval()
    assert_close(merged, logits(full), name="merged vs fp32 base + adapter")
    # ... and within the NF4 tolerance of what training saw (see tests/test_quantization.py).
    assert relative_error(merged, unmerged_nf4) < 0.15


def test_pissa_needs_conversion(tmp_path, capsys):
    base_model().save_pretrained(tmp_path / "base")
    model = get_peft_model(base_model(), LoraConfig(r=4, init_lora_weights="pissa"))
    model.save_pretrained(tmp_path / "init")  # the adapter right after init, for the conversion
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    expected = logits(model)
    model.save_pretrained(tmp_path / "raw")
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "raw"), str(tmp_path / "bad")]) == 2
    assert "path_initial_model_for_weight_conversion" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    report = merge_adapter(tmp_path / "base", tmp_path / "converted", tmp_path / "ok")
    assert_close(logits(Rwkv4ForCausalLM.from_pretrained(report.out)), expected, rel=1e-4, name="converted PiSSA")


def test_errors_are_messages(setup, tmp_path, capsys):
    root, _ = setup
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["merge", str(root / "base"), str(root / "adapter"), str(tmp_path / "taken")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", str(root / "base"), str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    assert "adapter directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["merge", str(root / "base"), str(tmp_path / "empty"), str(tmp_path / "o")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err

    base_model(hidden_size=48).save_pretrained(tmp_path / "other_base")
    with pytest.raises(MergeError, match="does not fit the base"):
        merge_adapter(tmp_path / "other_base", root / "adapter", tmp_path / "o")
    assert not (tmp_path / "o").exists()
