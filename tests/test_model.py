"""RWKV-4 model: parity with transformers' RwkvForCausalLM and BlinkDL's rwkv package, RNN vs parallel
mode, chunked state, generation, padding, packing and the HF plumbing."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import rwkv_ft  # noqa: F401  (registers the Auto classes)
from rwkv_ft import Rwkv4ForCausalLM
from rwkv_ft.convert import build_model, export_model, save_pth
from rwkv_ft.models.rwkv4.conversion_rwkv4 import save_transformers_dir
from rwkv_ft.testing import assert_close, randomize_, tiny_config


@pytest.fixture(scope="module")
def model() -> Rwkv4ForCausalLM:
    torch.manual_seed(0)
    return randomize_(Rwkv4ForCausalLM(tiny_config()), seed=1).eval()


def random_ids(batch: int, length: int, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def rnn_logits(model, ids: torch.Tensor, state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of feeding `ids` one token at a time (RNN mode)."""
    logits = []
    for t in range(ids.shape[1]):
        out = model(ids[:, t : t + 1], state=state, use_cache=True)
        state = out.state
        logits.append(out.logits)
    return torch.cat(logits, dim=1), state


# ------------------------------------------------------------------------------------------------
# Independent references


@pytest.mark.parametrize("batch,length", [(1, 1), (3, 17), (2, 64)])
def test_logits_match_transformers_rwkv(model, tmp_path, batch, length):
    from transformers import RwkvForCausalLM

    save_transformers_dir(model.config, model.state_dict(), tmp_path / "hf")
    reference = RwkvForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = random_ids(batch, length)
    with torch.no_grad():
        expected = reference(ids).logits
        ours = model(ids).logits
    assert_close(ours, expected, rel=1e-5, name="logits vs transformers")


def test_logits_match_blinkdl_rwkv_package_in_rnn_mode(model, tmp_path, monkeypatch):
    monkeypatch.setenv("RWKV_JIT_ON", "0")
    monkeypatch.setenv("RWKV_CUDA_ON", "0")
    rwkv_model = pytest.importorskip("rwkv.model", reason="BlinkDL's rwkv package is the dev-extra oracle")
    path = tmp_path / "model.pth"
    export_dir = tmp_path / "ours"
    model.save_pretrained(export_dir)
    export_model(export_dir, path, format="pth")
    oracle = rwkv_model.RWKV(model=str(path), strategy="cpu fp32", verbose=False)

    ids = random_ids(1, 12, seed=3)
    with torch.no_grad():
        ours = model(ids).logits[0]  # (T, V), parallel mode
        state = None
        for t, token in enumerate(ids[0].tolist()):
            expected, state = oracle.forward([token], state)
            assert_close(ours[t], expected.float(), rel=1e-5, name=f"logits at t={t} vs rwkv package")
        whole, _ = oracle.forward(ids[0].tolist(), None)  # the package's own sequence mode
    assert_close(ours[-1], whole.float(), rel=1e-5, name="last logits vs rwkv package sequence mode")


# ------------------------------------------------------------------------------------------------
# Modes and state


@pytest.mark.parametrize("length", [1, 9])
def test_parallel_mode_equals_rnn_mode(model, length):
    ids = random_ids(2, length, seed=4)
    with torch.no_grad():
        parallel = model(ids, use_cache=True)
        sequential, state = rnn_logits(model, ids)
    assert_close(sequential, parallel.logits, name="logits")
    assert_close(state, parallel.state, name="state")


def test_feeding_in_pieces_equals_feeding_whole(model):
    ids = random_ids(2, 23, seed=5)
    with torch.no_grad():
        whole = model(ids, use_cache=True)
        state, pieces = None, []
        for chunk in ids.split([7, 1, 10, 5], dim=1):
            out = model(chunk, state=state, use_cache=True)
            state = out.state
            pieces.append(out.logits)
    assert_close(torch.cat(pieces, dim=1), whole.logits, name="logits")
    assert_close(state, whole.state, name="state")


def test_gradient_flows_through_carried_state(model):
    ids = random_ids(1, 10, seed=6)
    first = model(ids[:, :5], use_cache=True)
    state = first.state.detach().requires_grad_(True)
    model(ids[:, 5:], state=state).logits.sum().backward()
    assert state.grad is not None and state.grad.abs().sum() > 0
    model.zero_grad()


# ------------------------------------------------------------------------------------------------
# Padding and packing (generation: tests/test_generation.py)


def test_left_padding_gives_same_logits_and_state(model):
    ids = random_ids(1, 6, seed=13)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 6)], dim=1).long()
    with torch.no_grad():
        plain = model(ids, use_cache=True)
        masked = model(padded, attention_mask=mask, use_cache=True)
    assert_close(masked.logits[:, 4:], plain.logits, name="logits")
    assert_close(masked.state, plain.state, name="state")


def test_padding_inside_a_continued_sequence_leaves_the_state_alone(model):
    ids = random_ids(1, 8, seed=14)
    with torch.no_grad():
        first = model(ids[:, :4], use_cache=True)
        plain = model(ids[:, 4:], state=first.state, use_cache=True)
        padded_ids = torch.cat([ids[:, 4:6], torch.zeros(1, 3, dtype=torch.long), ids[:, 6:]], dim=1)
        mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1]])
        masked = model(padded_ids, attention_mask=mask, state=first.state, use_cache=True)
    assert_close(masked.logits[:, [0, 1, 5, 6]], plain.logits, name="logits")
    assert_close(masked.state, plain.state, name="state")


def test_right_padding_leaves_real_positions_exact(model):
    ids = random_ids(2, 7, seed=15)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, :4]).logits
    assert_close(batched[1, :4], alone[0], name="logits")


def test_packed_sequences_do_not_leak(model):
    a, b, c = random_ids(1, 5, seed=16), random_ids(1, 3, seed=17), random_ids(1, 4, seed=18)
    packed = torch.cat([a, b, c], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(3), torch.arange(4)])[None]
    with torch.no_grad():
        out = model(packed, position_ids=position_ids).logits
        separate = torch.cat([model(x).logits for x in (a, b, c)], dim=1)
    assert_close(out, separate, name="packed logits")


def test_flattened_batches_run_in_one_pass_with_resets(model, monkeypatch):
    """RWKV-4 packs without re-padding: transformers' DataCollatorWithFlattening rows (position ids
    restarting at 0) reach the blocks once, with reset flags, and equal each example run alone."""
    from transformers import DataCollatorWithFlattening

    examples = [random_ids(1, n, seed=30 + n)[0].tolist() for n in (5, 3, 4)]
    batch = DataCollatorWithFlattening()([{"input_ids": ids} for ids in examples])
    seen = []
    original = type(model.rwkv)._forward_packed
    monkeypatch.setattr(type(model.rwkv), "_forward_packed", lambda *a, **k: seen.append(1) or original(*a, **k))
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"]).logits
        separate = torch.cat([model(torch.tensor([ids])).logits for ids in examples], dim=1)
    assert seen == []
    assert_close(packed, separate, name="packed logits")


def test_packed_row_continues_a_passed_state(model):
    """A packed row may take a state (long-context chunks do): its first example continues it, the
    others start empty, and the returned state is the last example's."""
    a, b, c = random_ids(2, 6, seed=33), random_ids(2, 4, seed=34), random_ids(2, 5, seed=35)
    with torch.no_grad():
        state = model(random_ids(2, 7, seed=36), use_cache=True).state
        position_ids = torch.cat([torch.arange(6), torch.arange(4), torch.arange(5)]).expand(2, -1)
        packed = model(torch.cat([a, b, c], 1), position_ids=position_ids, state=state, use_cache=True)
        first = model(a, state=state).logits
        last = model(c, use_cache=True)
        separate = torch.cat([first, model(b).logits, last.logits], dim=1)
    assert_close(packed.logits, separate, name="packed logits")
    assert_close(packed.state, last.state, name="state")


@pytest.mark.parametrize("version", ["rwkv4", "rwkv7"])
def test_packed_rows_refuse_padding_they_cannot_run_exactly(version):
    """Packed rows run in parallel mode with resets: left padding without a state is exact; inner
    padding, or left padding with a state, is refused (a pad would still decay the RWKV-4 state or
    hide the previous token from the token shift)."""
    from rwkv_ft.testing import MODEL_FACTORIES

    m = MODEL_FACTORIES[version]().eval()
    a, b = random_ids(1, 5, seed=37), random_ids(1, 4, seed=38)
    ids = torch.cat([torch.zeros(1, 2, dtype=torch.long), a, b], 1)
    left = torch.tensor([[0, 0] + [1] * 9])
    position_ids = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 0, 1, 2, 3]])
    inner = torch.tensor([[1, 1, 0, 0] + [1] * 7])
    with torch.no_grad():
        packed = m(ids, attention_mask=left, position_ids=position_ids).logits
        state = m(a, use_cache=True).state
        assert_close(packed[:, 2:], torch.cat([m(a).logits, m(b).logits], 1), name="left-padded packed logits")
        with pytest.raises(ValueError, match="padding only after"):
            m(ids, attention_mask=left, position_ids=position_ids, state=state)
        with pytest.raises(ValueError, match="padding only after"):
            m(ids, attention_mask=inner, position_ids=position_ids)


# Two packed rows: three examples (5, 7, 6 tokens), and two (9, 4) followed by five pads, laid out
# as SFTDataCollator pads a packed row (position ids continue the count over the padding).
PACKED_LENGTHS = [[5, 7, 6], [9, 4]]
PACKED_T = 18


def packed_batch(lengths_per_row, T, seed=40):
    ids = random_ids(len(lengths_per_row), T, seed=seed)
    mask = torch.zeros_like(ids)
    position_ids = torch.zeros_like(ids)
    for row, lengths in enumerate(lengths_per_row):
        used = sum(lengths)
        mask[row, :used] = 1
        position_ids[row] = torch.cat(
            [torch.arange(n) for n in lengths] + [torch.arange(lengths[-1], lengths[-1] + T - used)]
        )
    return ids, mask, position_ids


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_padded_rows_equal_examples_alone_with_gradients(backend, monkeypatch):
    """Packing + right padding, fp32: the logits at every real token and the gradient of every
    parameter equal running each example alone, on the reference and on the Triton kernel (under
    the interpreter, with 4-token chunks so examples start on and inside chunk borders)."""
    import rwkv_ft.kernels.rwkv4.triton_wkv4 as tw

    from rwkv_ft.train import set_kernel_backend

    monkeypatch.setattr(tw, "_CFG_OVERRIDE", (16, 4, 1))
    m = randomize_(Rwkv4ForCausalLM(tiny_config()), seed=3).train()
    monkeypatch.setattr(type(m.rwkv), "_forward_packed", lambda *a, **k: pytest.fail("packed rows were re-padded"))
    set_kernel_backend(m, backend)
    ids, mask, position_ids = packed_batch(PACKED_LENGTHS, PACKED_T)
    weights = torch.randn(*ids.shape, m.config.vocab_size, generator=torch.Generator().manual_seed(41))

    m.zero_grad()
    packed = m(ids, attention_mask=mask, position_ids=position_ids).logits
    (packed * weights * mask.unsqueeze(-1)).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in m.named_parameters()}

    m.zero_grad()
    for row, lengths in enumerate(PACKED_LENGTHS):
        start = 0
        for n in lengths:
            alone = m(ids[row : row + 1, start : start + n]).logits
            (alone * weights[row : row + 1, start : start + n]).sum().backward()
            assert_close(packed[row : row + 1, start : start + n], alone, name=f"logits row {row} at {start}")
            start += n
    for name, p in m.named_parameters():
        assert_close(packed_grads[name], p.grad, name=f"grad {name}")


# ------------------------------------------------------------------------------------------------
# Hugging Face plumbing


def test_save_and_auto_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is Rwkv4ForCausalLM
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = random_ids(1, 5)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_time_parameters_stay_fp32_when_loading_in_bf16(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    att = loaded.rwkv.blocks[0].att
    assert att.key.weight.dtype == torch.bfloat16
    assert att.time_decay.dtype == torch.float32 and att.time_first.dtype == torch.float32


def test_gradient_checkpointing_gives_same_gradients():
    config = tiny_config()
    ids = random_ids(2, 9, seed=19)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        m = randomize_(Rwkv4ForCausalLM(config), seed=2).train()
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        assert_close(checkpointed[name], plain[name], name=name)


def test_loss_ignores_masked_labels(model):
    ids = random_ids(1, 8, seed=20)
    labels = ids.clone()
    labels[:, :4] = -100
    logits = model(ids).logits
    expected = torch.nn.functional.cross_entropy(logits[0, 3:-1], ids[0, 4:])
    assert_close(model(ids, labels=labels).loss, expected, name="loss")


def test_embedding_accessors_and_resize():
    m = randomize_(Rwkv4ForCausalLM(tiny_config()), seed=3)
    assert m.get_input_embeddings() is m.rwkv.emb and m.get_output_embeddings() is m.head
    old = m.rwkv.emb.weight[:97].clone()
    m.resize_token_embeddings(120)
    assert m.rwkv.emb.weight.shape == (120, 40) and m.head.weight.shape == (120, 40)
    assert m.config.vocab_size == 120 and torch.equal(m.rwkv.emb.weight[:97], old)
    assert m(torch.tensor([[119, 3]])).logits.shape == (1, 2, 120)


def test_wrong_state_shape_is_named(model):
    with pytest.raises(ValueError, match="state must have shape"):
        model(random_ids(1, 3), state=torch.zeros(1, 2, 5, 8))


def test_bf16_parallel_mode_close_to_fp32(model):
    ids = random_ids(2, 11, seed=21)
    low = build_model(
        model.config,
        {
            k: v.to(torch.bfloat16) if not k.endswith(("time_decay", "time_first")) else v
            for k, v in model.state_dict().items()
        },
    )
    with torch.no_grad():
        assert_close(low(ids).logits.float(), model(ids).logits, dtype=torch.bfloat16, rel=3e-2, name="bf16 logits")


def test_pth_written_by_us_loads_with_weights_only(model, tmp_path):
    path = save_pth(model.state_dict(), tmp_path / "m.pth")
    state_dict = torch.load(path, weights_only=True)
    assert "emb.weight" in state_dict and "blocks.0.ln0.weight" in state_dict and "head.weight" in state_dict
    assert not any(k.startswith("rwkv.") for k in state_dict)
    assert os.listdir(tmp_path) == ["m.pth"]  # no temporary file left behind
