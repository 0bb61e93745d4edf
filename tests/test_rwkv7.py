"""RWKV-7: a real trained model against an independent C implementation and BlinkDL's `rwkv` package,
random models at released shapes against the package, every forward mode against every other,
conversion both ways (BlinkDL .pth, fla directories), and the Hugging Face plumbing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import rwkv_ft  # noqa: F401  (registers the Auto classes)
from rwkv_ft.cli import main
from rwkv_ft.convert import CheckpointError, load_any_checkpoint, load_blinkdl
from rwkv_ft.testing import assert_close, random_ids, randomize_, rwkv_package_model, tiny_rwkv7_config

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "rwkv-cpp-tiny"
TINY_PTH = FIXTURES / "7v0-834K.pth"
needs_fixture = pytest.mark.skipif(
    not TINY_PTH.exists(), reason="../shared/fixtures (rwkv.cpp's tiny models) is absent"
)


def oracle(pth: Path):
    """BlinkDL's rwkv package (x070) on `pth`, fp32 on the CPU. It appends '.pth' itself."""
    return rwkv_package_model(7).RWKV(model=str(pth.with_suffix("")), strategy="cpu fp32")


def oracle_logits(model, ids: list[int], state=None) -> tuple[torch.Tensor, list]:
    """Per-token logits (T, V) from the package's RNN mode, and its state after the last token."""
    out = []
    for token in ids:
        logits, state = model.forward([token], state)
        out.append(logits.float())
    return torch.stack(out), state


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory) -> Path:
    """The trained rwkv.cpp RWKV-7 fixture, converted with `rwkv-ft convert`."""
    if not TINY_PTH.exists():
        pytest.skip("../shared/fixtures (rwkv.cpp's tiny models) is absent")
    out = tmp_path_factory.mktemp("rwkv7") / "tiny"
    assert main(["convert", str(TINY_PTH), str(out)]) == 0
    return out


# ------------------------------------------------------------------------------------------------
# The real trained model


@needs_fixture
def test_trained_model_logits_equal_an_independent_c_implementation(tiny_trained):
    model = AutoModelForCausalLM.from_pretrained(tiny_trained).eval()
    expected = torch.from_numpy(np.fromfile(FIXTURES / "expected-logits-7v0-834K.bin", dtype=np.float32))
    with torch.no_grad():
        ours = model(torch.tensor([[34, 105, 110]])).logits[0, -1]  # the bytes '"in'
    assert_close(ours, expected, rel=1e-5, name="logits vs rwkv.cpp")


@needs_fixture
def test_trained_model_equals_the_rwkv_package_on_longer_text(tiny_trained):
    model = AutoModelForCausalLM.from_pretrained(tiny_trained).eval()
    ids = list(b"In the beginning the Universe was created. This has made a lot of people very angry.")
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    expected, _ = oracle_logits(oracle(TINY_PTH), ids)
    assert_close(ours, expected, rel=1e-5, name="logits vs rwkv package")


@needs_fixture
def test_trained_model_greedy_generation_equals_the_rwkv_package(tiny_trained):
    model = AutoModelForCausalLM.from_pretrained(tiny_trained).eval()
    prompt = list(b"The quick brown fox")
    with torch.no_grad():
        ours = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None)[0]
    package = oracle(TINY_PTH)
    logits, state = package.forward(prompt, None)
    tokens = []
    for _ in range(24):
        token = int(logits.argmax())
        tokens.append(token)
        logits, state = package.forward([token], state)
    assert ours[len(prompt) :].tolist() == tokens


@needs_fixture
def test_exported_pth_runs_in_the_rwkv_package_with_our_logits(tiny_trained, tmp_path):
    assert main(["export", str(tiny_trained), str(tmp_path / "back"), "--format", "pth"]) == 0
    ids = list(b"hello world")
    expected, _ = oracle_logits(oracle(TINY_PTH), ids)
    again, _ = oracle_logits(oracle(tmp_path / "back.pth"), ids)
    assert torch.equal(again, expected)
    original, back = torch.load(TINY_PTH, weights_only=True), torch.load(tmp_path / "back.pth", weights_only=True)
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)


# ------------------------------------------------------------------------------------------------
# Random models at released shapes


def random_pth(tmp_path: Path, config, *, layer0_v: bool = False, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A random model of ours saved as a BlinkDL .pth (optionally with the unused layer-0 v0/v1/v2)."""
    from rwkv_ft.models.rwkv7 import Rwkv7ForCausalLM
    from rwkv_ft.models.rwkv7.conversion_rwkv7 import ours_key_to_blinkdl

    model = randomize_(Rwkv7ForCausalLM(config), seed=seed).eval()
    state_dict = {ours_key_to_blinkdl(k): v.clone() for k, v in model.state_dict().items()}
    if layer0_v:
        C, D = config.hidden_size, config.v_low_rank
        state_dict |= {"blocks.0.att.v0": torch.randn(1, 1, C), "blocks.0.att.v1": torch.randn(C, D)}
        state_dict["blocks.0.att.v2"] = torch.randn(D, C)
    path = tmp_path / f"random-{seed}.pth"
    torch.save(state_dict, path)
    return path, model


@pytest.mark.parametrize(
    "shape",
    [
        dict(hidden_size=768, decay_low_rank=64, a_low_rank=64, v_low_rank=32, gate_low_rank=128),
        dict(hidden_size=2048, decay_low_rank=96, a_low_rank=96, v_low_rank=64, gate_low_rank=256),
    ],
    ids=["C768", "C2048"],
)
def test_random_models_at_released_shapes_equal_the_rwkv_package(tmp_path, shape):
    config = tiny_rwkv7_config(num_hidden_layers=2, head_size=64, intermediate_size=4 * shape["hidden_size"], **shape)
    path, model = random_pth(tmp_path, config, layer0_v=True, seed=7)
    loaded = load_blinkdl(path)
    assert (
        loaded.config.decay_low_rank == shape["decay_low_rank"]
        and loaded.config.num_heads == shape["hidden_size"] // 64
    )
    assert "rwkv.blocks.0.att.v0" not in loaded.state_dict  # present in the file, unused by the reference
    ids = random_ids(1, 9, 97, seed=3)[0].tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    expected, _ = oracle_logits(oracle(path), ids)
    assert_close(ours, expected, rel=1e-5, name="logits vs rwkv package")


# ------------------------------------------------------------------------------------------------
# Modes and state


@pytest.fixture(scope="module")
def model():
    from rwkv_ft.testing import tiny_rwkv7

    return tiny_rwkv7().eval()


def assert_parallel_equals_rnn_equals_pieces(model, ids: torch.Tensor, split: list[int]) -> None:
    with torch.no_grad():
        whole = model(ids, use_cache=True)
        state, steps = None, []
        for t in range(ids.shape[1]):
            out = model(ids[:, t : t + 1], state=state, use_cache=True)
            state, _ = out.state, steps.append(out.logits)
        assert_close(torch.cat(steps, 1), whole.logits, name="rnn logits")
        assert_close(state, whole.state, name="rnn state")
        state, pieces = None, []
        for chunk in ids.split(split, dim=1):
            out = model(chunk, state=state, use_cache=True)
            state, _ = out.state, pieces.append(out.logits)
    assert_close(torch.cat(pieces, 1), whole.logits, name="piece logits")
    assert_close(state, whole.state, name="piece state")


def test_parallel_equals_rnn_equals_pieces(model):
    assert_parallel_equals_rnn_equals_pieces(model, random_ids(2, 13, 97, seed=4), [5, 1, 7])


@needs_fixture
def test_trained_model_parallel_equals_rnn_equals_pieces(tiny_trained):
    model = AutoModelForCausalLM.from_pretrained(tiny_trained).eval()
    ids = torch.tensor([list(b"Feeding it whole, byte by byte, or in pieces gives one answer.")])
    assert_parallel_equals_rnn_equals_pieces(model, ids, [20, 1, 9, ids.shape[1] - 30])


def test_state_layout_matches_the_rwkv_package(tiny_trained):
    """Our (B, L, 2C + H*N*N) state, read per layer, is the package's [att shift, WKV, ffn shift]."""
    from rwkv_ft.models.rwkv7.initial_state_rwkv7 import Rwkv7InitialState

    model = AutoModelForCausalLM.from_pretrained(tiny_trained).eval()
    ids = list(b"state layout")
    with torch.no_grad():
        ours = model(torch.tensor([ids]), use_cache=True).state[0]
    _, theirs = oracle_logits(oracle(TINY_PTH), ids)
    for mine, expected in zip(Rwkv7InitialState.rwkv_package_state(ours), theirs, strict=True):
        assert_close(mine, expected.float(), rel=1e-5, name="state")


def test_left_padding_and_packing_are_exact(model):
    a, b, c = random_ids(1, 5, 97, seed=5), random_ids(1, 3, 97, seed=6), random_ids(1, 4, 97, seed=8)
    with torch.no_grad():
        plain = model(a, use_cache=True)
        padded = model(torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1),
                       attention_mask=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]), use_cache=True)  # fmt: skip
        packed = model(torch.cat([a, b, c], 1), position_ids=torch.cat([torch.arange(n) for n in (5, 3, 4)])[None])
        separate = torch.cat([model(x).logits for x in (a, b, c)], 1)
    assert_close(padded.logits[:, 3:], plain.logits, name="left-padded logits")
    assert_close(padded.state, plain.state, name="left-padded state")
    assert_close(packed.logits, separate, name="packed logits")


def test_packed_rows_run_in_one_pass_with_resets(model, monkeypatch):
    """RWKV-7 packs without re-padding: the blocks see the packed row once, with reset flags."""
    seen = []
    original = type(model.rwkv)._forward_packed
    monkeypatch.setattr(type(model.rwkv), "_forward_packed", lambda *a, **k: seen.append(1) or original(*a, **k))
    with torch.no_grad():
        model(random_ids(2, 9, 97, seed=9), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1]] * 2))
    assert seen == []


def test_gradients_match_with_checkpointing_and_reach_every_parameter():
    from rwkv_ft.models.rwkv7 import Rwkv7ForCausalLM

    ids = random_ids(2, 9, 97, seed=10)

    def grads(checkpointing: bool):
        m = randomize_(Rwkv7ForCausalLM(tiny_rwkv7_config()), seed=2).train()
        if checkpointing:
            m.gradient_checkpointing_enable()
        m(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in m.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name, grad in plain.items():
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {name}"
        assert_close(checkpointed[name], grad, name=name)


def test_bf16_weights_keep_the_decay_offset_fp32(model, tmp_path):
    model.save_pretrained(tmp_path)
    low = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    att = low.rwkv.blocks[1].att
    assert att.key.weight.dtype == torch.bfloat16 and att.w0.dtype == torch.float32
    ids = random_ids(2, 11, 97, seed=11)
    with torch.no_grad():
        out = low(ids, use_cache=True)
        assert_close(out.logits.float(), model(ids).logits, dtype=torch.bfloat16, rel=4e-2, name="bf16 logits")
    assert out.state.dtype == torch.float32  # the carried state (shifts and WKV) stays fp32 too


def test_save_and_auto_load_round_trip(model, tmp_path):
    from rwkv_ft.models.rwkv7 import Rwkv7ForCausalLM

    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is Rwkv7ForCausalLM and loaded.config.model_type == "rwkv7_ft"
    ids = random_ids(1, 6, 97)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


# ------------------------------------------------------------------------------------------------
# fla directories and unsupported relatives


def fla_state_dict(model) -> dict[str, torch.Tensor]:
    """Our model's tensors under fla's RWKV7ForCausalLM names and shapes (the inverse mapping)."""
    from rwkv_ft.models.rwkv7.conversion_rwkv7 import _FLA_PROJ
    from rwkv_ft.models.rwkv7.modeling_rwkv7 import TIME_MIX_LERPS

    modules = {"att": "attn", "ffn": "ffn", "ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
    proj = {ours: theirs for theirs, ours in _FLA_PROJ.items()}
    out = {"model.embeddings.weight": model.rwkv.emb.weight, "lm_head.weight": model.head.weight}
    out |= {"model.norm.weight": model.rwkv.ln_out.weight, "model.norm.bias": model.rwkv.ln_out.bias}
    for i, block in enumerate(model.rwkv.blocks):
        for key, tensor in block.state_dict().items():
            module, rest = key.split(".", 1)
            prefix = f"model.layers.{i}.{modules[module]}."
            if module == "att" and rest in TIME_MIX_LERPS:
                continue
            if module == "att" and rest[0] in "wavg" and rest[1:] in ("0", "1", "2"):
                name = {"0": "lora.2.bias", "1": "lora.0.weight", "2": "lora.2.weight"}[rest[1]]
                out[prefix + f"{rest[0]}_lora.{name}"] = tensor.flatten() if rest[1] == "0" else tensor.t()
            elif rest in ("k_k", "k_a", "x_k"):
                out[prefix + rest] = tensor.flatten()
            else:
                head, *tail = rest.split(".")
                head = proj.get(head, head) if module == "att" else head
                out[prefix + ".".join([head, *tail])] = tensor
        out[f"model.layers.{i}.attn.x_x"] = torch.cat([getattr(block.att, n).reshape(1, -1) for n in TIME_MIX_LERPS])
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def test_fla_directories_convert_exactly(model, tmp_path):
    import json

    from safetensors.torch import save_file

    (tmp_path / "fla").mkdir()
    save_file(fla_state_dict(model), tmp_path / "fla" / "model.safetensors")
    (tmp_path / "fla" / "config.json").write_text(json.dumps({"model_type": "rwkv7", "norm_eps": 1e-5}))
    ckpt = load_any_checkpoint(tmp_path / "fla")
    assert ckpt.kind == "fla" and ckpt.config.v_low_rank == model.config.v_low_rank
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.state_dict[key], value), key


@pytest.mark.parametrize(
    "extra,name",
    [
        ({"blocks.0.ffn.s_emb.weight": torch.zeros(97, 32)}, "DeepEmbed"),
        ({"blocks.0.att.dea.q.weight": torch.zeros(4)}, "DEA"),
    ],
)
def test_relatives_are_named_not_half_loaded(tmp_path, extra, name):
    path, _ = random_pth(tmp_path, tiny_rwkv7_config())
    state_dict = torch.load(path, weights_only=True) | extra
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError, match=f"this is RWKV-7 .*{name}"):
        load_blinkdl(path)


def test_the_model_on_the_triton_kernel_equals_the_model_on_the_reference():
    """The model's calls into the WKV-7 kernel (views, the fp32 decay, masks, resets) under the
    Triton interpreter: logits and every gradient as on the PyTorch reference."""
    from rwkv_ft.models.rwkv7 import Rwkv7ForCausalLM
    from rwkv_ft.train import set_kernel_backend

    config = tiny_rwkv7_config(hidden_size=64, head_size=32, num_hidden_layers=2)
    ids = random_ids(2, 21, 97, seed=12)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    results = []
    for backend in ("torch", "triton"):
        model = randomize_(Rwkv7ForCausalLM(config), seed=3).train()
        model.loss_chunk_rows = None  # this test compares logits, which the fused head loss skips
        set_kernel_backend(model, backend)
        out = model(ids, labels=ids, attention_mask=mask)
        out.loss.backward()
        packed = model(ids, position_ids=torch.tensor([list(range(9)) + list(range(12))] * 2)).logits
        results.append((out.logits, packed, {n: p.grad for n, p in model.named_parameters()}))
    (ref_logits, ref_packed, ref_grads), (logits, packed, grads) = results
    assert_close(logits, ref_logits, name="logits")
    assert_close(packed, ref_packed, name="packed logits")
    for name, grad in ref_grads.items():
        assert_close(grads[name], grad, name=name)


def test_the_tokenizer_follows_the_vocabulary_size():
    """World and G-series (65,536 rows): World; Pile (GPT-NeoX's 50,277 padded to 50,304): GPT-NeoX."""
    from rwkv_ft.models.rwkv7.conversion_rwkv7 import tokenizer_for_vocab

    assert tokenizer_for_vocab(65536) == "world" and tokenizer_for_vocab(50304) == "neox"
    assert tokenizer_for_vocab(256) is None  # byte-level test models: none rather than a wrong one
