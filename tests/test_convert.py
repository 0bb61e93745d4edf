"""Checkpoint conversion both ways, and the errors for checkpoints we cannot load."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import rwkv_ft  # noqa: F401
from rwkv_ft import Rwkv4ForCausalLM
from rwkv_ft.cli import main
from rwkv_ft.convert import CheckpointError, convert_checkpoint, export_model, load_blinkdl
from rwkv_ft.models.rwkv4.conversion_rwkv4 import ours_key_to_blinkdl as ours_to_blinkdl
from rwkv_ft.models.rwkv4.conversion_rwkv4 import save_transformers_dir
from rwkv_ft.testing import randomize_, tiny_config


@pytest.fixture(scope="module")
def model() -> Rwkv4ForCausalLM:
    return randomize_(Rwkv4ForCausalLM(tiny_config()), seed=5).eval()


@pytest.fixture()
def pth(model, tmp_path):
    """A BlinkDL-format .pth of `model`, written with the keys and shapes BlinkDL uses."""
    path = tmp_path / "blinkdl.pth"
    torch.save({ours_to_blinkdl(k): v.clone() for k, v in model.state_dict().items()}, path)
    return path


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_pth_to_ours_to_pth_is_exact(model, pth, tmp_path):
    out = convert_checkpoint(pth, tmp_path / "ours", tokenizer="none")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert_same_weights(loaded, model)
    back = export_model(out, tmp_path / "back.pth", format="pth")
    original, again = torch.load(pth, weights_only=True), torch.load(back, weights_only=True)
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_transformers_dir_to_ours_and_back_is_exact(model, tmp_path):
    save_transformers_dir(model.config, model.state_dict(), tmp_path / "hf")
    out = convert_checkpoint(tmp_path / "hf", tmp_path / "ours", tokenizer="none")
    assert_same_weights(AutoModelForCausalLM.from_pretrained(out), model)
    export_model(out, tmp_path / "hf2", format="transformers")
    from transformers import RwkvForCausalLM

    a = RwkvForCausalLM.from_pretrained(tmp_path / "hf")
    b = RwkvForCausalLM.from_pretrained(tmp_path / "hf2")
    assert_same_weights(a, b)


def test_blinkdl_shapes_with_squeezed_time_mix_are_accepted(model, tmp_path):
    state_dict = {ours_to_blinkdl(k): v.clone() for k, v in model.state_dict().items()}
    state_dict["blocks.0.att.time_mix_k"] = state_dict["blocks.0.att.time_mix_k"].flatten()  # (C,)
    torch.save(state_dict, tmp_path / "m.pth")
    ckpt = load_blinkdl(tmp_path / "m.pth")
    config, loaded = ckpt.config, ckpt.state_dict
    assert loaded["rwkv.blocks.0.att.time_mix_k"].shape == (1, 1, 40)
    assert config.num_hidden_layers == 2 and config.hidden_size == 40 and config.intermediate_size == 72


def test_bf16_checkpoint_keeps_time_params_fp32(model, tmp_path):
    state_dict = {ours_to_blinkdl(k): v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    torch.save(state_dict, tmp_path / "m.pth")
    loaded = load_blinkdl(tmp_path / "m.pth").state_dict
    assert loaded["rwkv.blocks.1.att.time_decay"].dtype == torch.float32
    assert loaded["rwkv.blocks.1.att.key.weight"].dtype == torch.bfloat16


def test_missing_unexpected_and_misshaped_keys_are_all_listed(model, tmp_path):
    state_dict = {ours_to_blinkdl(k): v.clone() for k, v in model.state_dict().items()}
    del state_dict["blocks.1.att.key.weight"]
    state_dict["blocks.0.att.bonus"] = torch.zeros(3)
    state_dict["blocks.1.ffn.value.weight"] = torch.zeros(40, 40)
    torch.save(state_dict, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        load_blinkdl(tmp_path / "bad.pth")
    message = str(info.value)
    assert "bad.pth" in message
    assert "missing keys (1): blocks.1.att.key.weight" in message
    assert "unexpected keys (1): blocks.0.att.bonus" in message
    assert "blocks.1.ffn.value.weight: (40, 40), expected (40, 72)" in message


@pytest.mark.parametrize(
    "name,keys",
    [
        ("RWKV-5", ["blocks.0.att.ln_x.weight", "blocks.0.att.time_faaaa", "blocks.0.att.gate.weight"]),
        ("RWKV-6", ["blocks.0.att.time_maa_x", "blocks.0.att.time_faaaa", "blocks.0.att.ln_x.weight"]),
        ("RWKV-7 DeepEmbed", ["blocks.0.att.x_r", "blocks.0.att.w0", "blocks.0.ffn.s_emb.weight", "blocks.0.ffn.s1"]),
    ],
)
def test_unsupported_rwkv_relatives_are_named(tmp_path, name, keys):
    state_dict = {"emb.weight": torch.zeros(4, 8), **{k: torch.zeros(8) for k in keys}}
    torch.save(state_dict, tmp_path / "new.pth")
    with pytest.raises(CheckpointError, match=f"this is {name}"):
        load_blinkdl(tmp_path / "new.pth")


def test_unreadable_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_blinkdl(tmp_path / "nowhere.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_blinkdl(tmp_path / "junk.pth")


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "missing.pth" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_convert_then_export_both_formats(model, pth, tmp_path):
    assert main(["convert", str(pth), str(tmp_path / "ours"), "--tokenizer", "none"]) == 0
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "rwkv4"
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "out.pth"), "--format", "pth"]) == 0
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "hf"), "--format", "transformers"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "rwkv"
    # Refuses to overwrite, and says how.
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "hf"), "--format", "transformers"]) == 2


def test_bf16_export_halves_weights_but_not_time_params(model, tmp_path):
    model.save_pretrained(tmp_path / "ours")
    path = export_model(tmp_path / "ours", tmp_path / "m.pth", format="pth", dtype="bf16")
    state_dict = torch.load(path, weights_only=True)
    assert state_dict["blocks.0.att.key.weight"].dtype == torch.bfloat16
    assert state_dict["blocks.0.att.time_first"].dtype == torch.float32
