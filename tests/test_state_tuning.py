"""State tuning: only the learned initial state trains, the loss falls, the state is used in every
forward mode (parallel, RNN, padded, packed), saves and reloads, and composes with LoRA and NF4."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

import rwkv_ft  # noqa: F401  (registers the Auto classes)
from rwkv_ft import Rwkv4ForCausalLM
from rwkv_ft.adapters import (
    STATE_TUNING_FILE,
    StateTuningConfig,
    add_state_tuning,
    load_initial_state,
    load_state_tuning,
    read_adapter_info,
    remove_state_tuning,
    save_adapter,
    save_state_tuning,
)
from rwkv_ft.testing import assert_close, randomize_, tiny_config


def base_model(seed: int = 1, **overrides) -> Rwkv4ForCausalLM:
    return randomize_(Rwkv4ForCausalLM(tiny_config(**overrides)), seed=seed).eval()


def random_ids(batch: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def train(model, params, ids: torch.Tensor, steps: int = 15, lr: float = 5e-2) -> list[float]:
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


@pytest.mark.parametrize("train_token_shift", [False, True])
def test_only_the_state_trains_and_the_loss_falls(train_token_shift):
    model = base_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = add_state_tuning(model, StateTuningConfig(train_token_shift=train_token_shift))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"rwkv.initial_state.wkv_value", "rwkv.initial_state.wkv_log_weight"}
    if train_token_shift:
        expected |= {"rwkv.initial_state.att_shift", "rwkv.initial_state.ffn_shift"}
    assert trainable == expected
    losses = train(model, list(state.parameters()), random_ids())
    assert losses[-1] < losses[0] - 0.05, losses
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"base parameter {key} changed"


def test_learned_state_is_used_in_every_mode():
    model = base_model()
    state = add_state_tuning(model, StateTuningConfig(train_token_shift=True))
    with torch.no_grad():
        for p in state.parameters():
            p.normal_()
    ids = random_ids(2, 12)
    with torch.no_grad():
        parallel = model(ids).logits
        explicit = model(ids, state=state(2)).logits
        remove_state_tuning(model)
        empty = model(ids).logits
        model.rwkv.initial_state = state
        steps, current = [], None
        for t in range(12):
            out = model(ids[:, t : t + 1], state=current, use_cache=True)
            current = out.state
            steps.append(out.logits)
        # Packed: two examples in one row, each starts from the learned state.
        position_ids = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, -1)
        packed = model(ids, position_ids=position_ids).logits
        separate = torch.cat([model(ids[:, :5]).logits, model(ids[:, 5:]).logits], dim=1)
        # Left padding: the padded row starts from the learned state at its first real token.
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        padded = model(ids, attention_mask=mask).logits
        unpadded_row = model(ids[:1, 3:]).logits
    assert (parallel - empty).abs().max() > 1e-2
    assert_close(explicit, parallel, name="learned state vs passing it explicitly")
    assert_close(torch.cat(steps, dim=1), parallel, name="RNN mode")
    assert_close(packed, separate, name="packed")
    assert_close(padded[:1, 3:], unpadded_row, name="left padded")


def test_state_from_a_prompt_equals_continuing_the_prompt():
    # The canonical (a/b, 1, p + log b) form represents a real state exactly.
    model = base_model()
    ids = random_ids(1, 14)
    with torch.no_grad():
        out = model(ids[:, :8], use_cache=True)
        continued = model(ids[:, 8:], state=out.state).logits
        state = add_state_tuning(model, StateTuningConfig(train_token_shift=True))
        state.set_from_state(out.state[0])
        from_initial = model(ids[:, 8:]).logits
    assert_close(from_initial, continued, rel=1e-5, name="initial state set from a prompt")


def test_save_and_load_round_trip(tmp_path):
    model = base_model()
    state = add_state_tuning(model, StateTuningConfig(train_token_shift=True, init_log_weight=-1.0))
    train(model, list(state.parameters()), random_ids(), steps=3)
    ids = random_ids(2, 10, seed=5)
    with torch.no_grad():
        expected = model(ids).logits
    save_adapter(model, tmp_path / "adapter", base_model="some/base")
    assert (tmp_path / "adapter" / STATE_TUNING_FILE).stat().st_size < 10_000
    info = read_adapter_info(tmp_path / "adapter")
    assert info["base_model"] == "some/base" and info["quantization"] is None
    assert info["adapters"]["state_tuning"]["train_token_shift"] is True

    fresh = base_model()
    loaded = load_state_tuning(fresh, tmp_path / "adapter")
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert_close(fresh(ids).logits, expected, name="reloaded state")
        materialised = load_initial_state(tmp_path / "adapter" / STATE_TUNING_FILE)
        plain = base_model()(ids, state=materialised.expand(2, -1, -1, -1)).logits
    assert_close(plain, expected, name="materialised initial_state passed as state=")


def test_load_onto_the_wrong_model_names_the_file(tmp_path):
    model = base_model()
    add_state_tuning(model)
    save_state_tuning(model, tmp_path)
    with pytest.raises(ValueError, match=r"state_tuning\.safetensors.*\(2, 40\).*needs.*\(2, 48\)"):
        load_state_tuning(base_model(hidden_size=48), tmp_path)
    with pytest.raises(FileNotFoundError, match="no state-tuning file"):
        load_state_tuning(model, tmp_path / "missing")


def test_composes_with_lora(tmp_path):
    model = get_peft_model(base_model(), LoraConfig(r=4))
    state = add_state_tuning(model)  # after get_peft_model, so peft does not freeze it
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("initial_state" in n for n in trainable)
    assert all("lora_" in n or "initial_state" in n for n in trainable)
    losses = train(model, [p for p in model.parameters() if p.requires_grad], random_ids(), steps=8, lr=2e-2)
    assert losses[-1] < losses[0] - 0.1, losses
    assert state.wkv_value.abs().sum() > 0
    ids = random_ids(2, 10, seed=6)
    with torch.no_grad():
        expected = model(ids).logits
    save_adapter(model, tmp_path / "adapter")
    info = read_adapter_info(tmp_path / "adapter")
    assert set(info["adapters"]) == {"lora", "state_tuning"}

    reloaded = PeftModel.from_pretrained(base_model(), tmp_path / "adapter").eval()
    load_state_tuning(reloaded, tmp_path / "adapter")
    with torch.no_grad():
        assert_close(reloaded(ids).logits, expected, name="LoRA + state reloaded")


def test_composes_with_nf4_base_and_checkpointing(tmp_path):
    from rwkv_ft.quantization import load_quantized

    config = tiny_config(hidden_size=128, intermediate_size=256)
    base = randomize_(Rwkv4ForCausalLM(config), seed=2)
    base.save_pretrained(tmp_path / "base")
    model = prepare_model_for_kbit_training(load_quantized(tmp_path / "base", "nf4"))  # checkpointing on
    assert model.rwkv.gradient_checkpointing
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = add_state_tuning(model)
    losses = train(model, list(state.parameters()), random_ids(), steps=10)
    assert losses[-1] < losses[0] - 0.02, losses
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} changed"
    save_adapter(model, tmp_path / "adapter")
    assert read_adapter_info(tmp_path / "adapter")["quantization"]["bnb_4bit_quant_type"] == "nf4"
