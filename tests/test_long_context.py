"""Long-context training (`training.chunk_len`): the chunked loss and every gradient equal the
whole-sequence ones, for each RWKV version, with LoRA, state tuning, an NF4 base, packed rows and
right padding; a non-finite chunk is named."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from rwkv_ft.testing import MODEL_FACTORIES, assert_close, random_ids

T = 1000


def loss_and_grads(model, ids, labels=None, **kwargs):
    model.zero_grad()
    loss = model(ids, labels=ids if labels is None else labels, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def assert_same(chunked, whole):
    assert_close(chunked[0], whole[0], rel=1e-5, name="loss")
    assert chunked[1].keys() == whole[1].keys() and whole[1]
    for name, grad in whole[1].items():
        assert_close(chunked[1][name], grad, rel=1e-5, name=f"grad {name}")


# How the chunks before the last are recomputed: under torch.utils.checkpoint, or replayed by
# rwkv_ft.models.chunk_replay, as blocks compiled with CUDA graphs need ("graphs": that path's marks
# and copies, on blocks flagged as graphed but run eagerly: CUDA graph trees need a GPU).
RECOMPUTE_MODES = ["checkpoint", "replay", "graphs"]


def set_chunk(model, chunk, mode="checkpoint"):
    from rwkv_ft.models.modeling_utils import rwkv_blocks
    from rwkv_ft.train import causal_lms, set_chunk_len

    set_chunk_len(model, chunk)
    for lm in causal_lms(model):
        lm.chunk_recompute = "checkpoint" if mode == "checkpoint" else "replay"
    for block in rwkv_blocks(model):
        block.cudagraphs = mode == "graphs"


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def model(request):
    return MODEL_FACTORIES[request.param]().train()


@pytest.mark.parametrize("mode", RECOMPUTE_MODES)
@pytest.mark.parametrize("chunk", [64, 7])
def test_chunked_loss_and_gradients_equal_the_whole_sequence(model, chunk, mode):
    ids = random_ids(1, T, model.config.vocab_size, seed=1)
    labels = ids.clone()
    labels[:, :100] = -100  # a prompt, as in instruction data
    whole = loss_and_grads(model, ids, labels)
    set_chunk(model, chunk, mode)
    assert_same(loss_and_grads(model, ids, labels), whole)


def test_under_cuda_graphs_every_chunk_is_a_generation_and_nothing_outlives_it_in_graph_memory(model, monkeypatch):
    """With graphed blocks, a chunk's forward and its replay each begin a CUDA-graph generation
    (a replay reuses the previous generation's output memory), and the gradients get ordinary
    buffers before the first backward, so that autograd adds into them rather than adopting a
    graph's output."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    set_chunk(model, 64, "graphs")
    ids = random_ids(1, 200, model.config.vocab_size, seed=2)
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    assert len(marks) == 4  # ceil(200 / 64) chunk forwards
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    buffers = {n: p.grad for n, p in model.named_parameters()}
    loss.backward()
    assert len(marks) == 4 + 3  # and the replay of each chunk but the last
    assert all(p.grad is buffers[n] for n, p in model.named_parameters())  # added in place
    assert any(p.grad.any() for p in model.parameters())


def test_under_cuda_graphs_the_last_chunk_takes_one_of_few_lengths(model):
    """A new length under CUDA graphs is a graph of its own, recorded only once it recurs: a long
    sample's last chunk is right-padded (ignored targets) to a multiple of 512 tokens, at most a
    full chunk, so the gradient is the same and few lengths ever run."""
    from rwkv_ft.models.modeling_utils import graphed_length

    assert [graphed_length(t, 4096) for t in (4097, 4608, 4609, 8191, 8192, 65_536, 70_000)] == [
        4608, 4608, 5120, 8192, 8192, 65_536, 70_144,
    ]  # fmt: skip
    assert graphed_length(130, 64) == 192 and graphed_length(128, 64) == 128  # short chunks: whole ones
    ids = random_ids(1, 150, model.config.vocab_size, seed=9)
    whole = loss_and_grads(model, ids)
    lengths = []
    model.get_decoder().register_forward_hook(
        lambda module, args, kwargs, out: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    set_chunk(model, 64, "graphs")
    assert_same(loss_and_grads(model, ids), whole)
    assert set(lengths) == {64}  # 64, 64, and 22 padded to 64; then the replays


def test_replayed_chunks_draw_the_same_dropout_masks(model):
    """A replayed chunk runs under the RNG state of its first run, as torch.utils.checkpoint's
    recompute does: with LoRA dropout, the chunked gradient is still the whole-sequence one."""
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.3, init_lora_weights=False))
    ids = random_ids(1, 300, model.config.vocab_size, seed=6)
    torch.manual_seed(0)
    set_chunk(peft_model, 64, "checkpoint")
    checkpointed = loss_and_grads(peft_model, ids)
    torch.manual_seed(0)
    set_chunk(peft_model, 64, "replay")
    assert_same(loss_and_grads(peft_model, ids), checkpointed)


def test_replayed_chunks_run_under_the_autocast_of_their_first_run(model):
    """The backward runs outside the forward's autocast context; the replay restores it, as
    torch.utils.checkpoint does, so the recomputed chunk is the one whose output was used."""
    seen = []
    record = lambda *args: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))  # noqa: E731
    model.rwkv.ln_out.register_forward_hook(record)
    set_chunk(model, 64, "replay")
    ids = random_ids(1, 200, model.config.vocab_size, seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert seen == [(True, torch.bfloat16)] * (4 + 3)  # 4 chunks, then the replays of the 3 before the last


def test_chunks_with_cuda_graphs_refuse_the_offload(model):
    set_chunk(model, 64, "graphs")
    model.train_chunk_offload = 0.5
    ids = random_ids(1, 200, model.config.vocab_size, seed=2)
    with pytest.raises(ValueError, match="chunk_offload cannot be combined with blocks compiled with CUDA graphs"):
        model(ids, labels=ids)


@pytest.mark.parametrize("mode", RECOMPUTE_MODES)
def test_chunked_evaluation_gives_the_whole_sequence_loss(model, mode):
    ids = random_ids(1, 200, model.config.vocab_size, seed=7)
    with torch.no_grad():
        whole = model(ids, labels=ids).loss
        set_chunk(model, 64, mode)
        assert_close(model(ids, labels=ids).loss, whole, rel=1e-5, name="loss")


@pytest.mark.parametrize(("recompute_last", "mode"), [(False, "checkpoint"), (True, "checkpoint"), (False, "replay")])
def test_each_chunk_but_the_last_is_recomputed_once(model, recompute_last, mode):
    """Memory stays that of one chunk, and the last chunk (whose backward runs first) is not re-run,
    except where rwkv_ft.train asks for it (DeepSpeed ZeRO-3)."""
    calls = []
    model.get_decoder().register_forward_hook(lambda *args: calls.append(1))
    set_chunk(model, 64, mode)
    model.recompute_last_chunk = recompute_last
    ids = random_ids(1, T, model.config.vocab_size, seed=5)
    loss = model(ids, labels=ids).loss
    assert len(calls) == 16  # ceil(1000 / 64) chunks
    loss.backward()
    assert len(calls) == 16 + 15 + recompute_last


def test_token_ids_are_checked_once_per_chunked_forward(model, monkeypatch):
    """Checking the ids waits on the device (a host sync): the chunks share one check of the whole
    sample, not one per chunk and per recompute, and an id outside the vocabulary is still named."""
    from rwkv_ft.models import modeling_utils

    checked, check = [], modeling_utils.check_token_ids
    monkeypatch.setattr(modeling_utils, "check_token_ids", lambda ids, n: (checked.append(ids.shape), check(ids, n)))
    set_chunk(model, 64)
    ids = random_ids(1, T, model.config.vocab_size, seed=6)
    model(ids, labels=ids).loss.backward()
    assert checked == [ids.shape]
    vocab = model.config.vocab_size
    ids[0, 900] = vocab  # in the 15th chunk
    with pytest.raises(ValueError, match=f"token id {vocab} is outside the model's vocabulary"):
        model(ids, labels=ids)


@pytest.mark.parametrize("mode", RECOMPUTE_MODES)
def test_with_lora_and_state_tuning(model, mode):
    from rwkv_ft.adapters import StateTuningConfig, add_state_tuning

    peft_model = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False))
    state = add_state_tuning(peft_model, StateTuningConfig(train_token_shift=True))
    with torch.no_grad():
        for p in state.parameters():
            p.normal_(0, 0.5)
    ids = random_ids(1, T, model.config.vocab_size, seed=2)
    whole = loss_and_grads(peft_model, ids)
    set_chunk(peft_model, 64, mode)
    chunked = loss_and_grads(peft_model, ids)
    assert any("initial_state" in n for n in whole[1]) and any("lora_A" in n for n in whole[1])
    assert_same(chunked, whole)


@pytest.mark.parametrize("mode", RECOMPUTE_MODES)
def test_right_padding_and_grad_accumulation_weighting(model, mode):
    ids = random_ids(2, 200, model.config.vocab_size, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 130:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    whole = loss_and_grads(model, ids, labels, attention_mask=mask, num_items_in_batch=torch.tensor(500))
    set_chunk(model, 32, mode)
    chunked = loss_and_grads(model, ids, labels, attention_mask=mask, num_items_in_batch=torch.tensor(500))
    assert_same(chunked, whole)


@pytest.mark.parametrize("mode", RECOMPUTE_MODES)
def test_packed_rows_with_a_start_on_a_chunk_boundary(model, mode):
    lengths = [40, 24, 50, 14]  # starts at 0, 40, 64 (a chunk boundary), 114
    ids = random_ids(1, sum(lengths), 97, seed=4)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[0, torch.tensor([0, 40, 64, 114])] = -100
    whole = loss_and_grads(model, ids, labels, position_ids=positions)
    set_chunk(model, 32, mode)
    assert_same(loss_and_grads(model, ids, labels, position_ids=positions), whole)


def nf4_base_config(version: str):
    """(model class, config) with C=64: bitsandbytes' CPU 4-bit kernels need in_features >= 64."""
    from rwkv_ft.models.rwkv4 import Rwkv4ForCausalLM
    from rwkv_ft.models.rwkv7 import Rwkv7ForCausalLM
    from rwkv_ft.testing import tiny_config, tiny_rwkv7_config

    if version == "rwkv4":
        return Rwkv4ForCausalLM, tiny_config(hidden_size=64, intermediate_size=128)
    return Rwkv7ForCausalLM, tiny_rwkv7_config(hidden_size=64, head_size=16, intermediate_size=128)


@pytest.mark.parametrize("version", sorted(MODEL_FACTORIES))
def test_nf4_base(version, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is a dependency; its CPU kernels run NF4")
    from peft import prepare_model_for_kbit_training

    from rwkv_ft.quantization import load_quantized
    from rwkv_ft.testing import randomize_

    model_class, config = nf4_base_config(version)
    randomize_(model_class(config), seed=5).save_pretrained(tmp_path)
    base = prepare_model_for_kbit_training(
        load_quantized(tmp_path, "nf4", compute_dtype=torch.float32, dtype=torch.float32)
    )
    model = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False)).train()
    ids = random_ids(1, T, 97, seed=6)
    whole = loss_and_grads(model, ids)
    set_chunk(model, 64)
    assert_same(loss_and_grads(model, ids), whole)


@pytest.mark.parametrize("mode", ["checkpoint", "graphs"])
def test_a_non_finite_chunk_is_named(model, mode):
    """The model on its own raises naming the chunk (its default), in the sample's own tokens (under
    CUDA graphs its last chunk is padded)."""
    set_chunk(model, 50, mode)
    model.raise_on_nonfinite_chunk = True
    labels = random_ids(1, 120, model.config.vocab_size)
    labels[:, :110] = -100  # only the last chunk scores anything
    with torch.no_grad():
        model.get_decoder().blocks[0].ln1.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"chunk 2 \(tokens 100\.\.119 of 120\)"):
        model(random_ids(1, 120, model.config.vocab_size), labels=labels)


def test_training_reports_a_non_finite_chunk_instead_of_raising(model):
    """Under rwkv_ft.train (set_chunk_len) every chunk runs and the first non-finite one is reported,
    so that all ranks reach the step's cross-rank loss check before any of them stops."""
    from rwkv_ft.models.modeling_utils import describe_chunk

    set_chunk(model, 50)
    ids = random_ids(1, 120, model.config.vocab_size)
    model(ids, labels=ids)
    assert model.nonfinite_chunk() is None
    with torch.no_grad():
        model.get_decoder().blocks[0].ln1.weight.fill_(float("nan"))
    loss = model(ids, labels=ids).loss
    assert not torch.isfinite(loss)
    assert model.nonfinite_chunk() == (0, 0, 49, 120)
    assert describe_chunk(model.nonfinite_chunk()) == "chunk 0 (tokens 0..49 of 120)"


def test_document_data_trains_in_chunks_through_the_recipe(tmp_path):
    """The long-context recipe's path: document rows, the plain template, chunk_len below the length,
    half the chunks offloaded."""
    from pathlib import Path

    from rwkv_ft.recipe import load_recipe
    from rwkv_ft.train import run

    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(
        root / "recipes" / "rwkv7_long_context.yaml",
        [
            "model.path=null",
            "model.model_type=rwkv7_ft",
            "model.config={vocab_size: 65536, hidden_size: 32, num_hidden_layers: 2, head_size: 16}",
            "model.dtype=fp32",
            "tokenizer=world",
            f"data.path={root / 'data' / 'document_sample.jsonl'}",
            "training.chunk_len=64",
            # the recipe's compiled, CUDA-graphed blocks are a GPU matter (compiling takes minutes here)
            "training.compile=false",
            "training.gradient_checkpointing=false",
            "training.chunk_offload=0.5",  # on a CPU too: half the chunks keep their activations
            "training.max_steps=2",
            "training.precision=fp32",
            "merge.enabled=false",
            f"training.output_dir={tmp_path}",
        ],
    )
    summary = run(recipe)
    assert summary["steps"] == 2 and summary["train_loss"] > 0
    assert summary["tokens_seen"] > 2 * 64  # the samples are longer than one chunk


def test_plain_template_trains_every_document_token():
    from pathlib import Path

    from rwkv_ft.data import get_template, load_conversations
    from rwkv_ft.data.tokenize import tokenize_conversation
    from rwkv_ft.tokenizers import load_tokenizer

    rows = load_conversations(Path(__file__).resolve().parents[1] / "data" / "document_sample.jsonl")
    messages = [{k: v for k, v in m.items() if v is not None} for m in rows.dataset[0]["messages"]]
    tokenizer = load_tokenizer("world")
    example, _ = tokenize_conversation(messages, tokenizer, "plain", 100_000)
    assert example["labels"] == example["input_ids"] == tokenizer.encode(messages[0]["content"])
    assert get_template("plain").render_text(messages) == messages[0]["content"]


def test_a_non_finite_chunk_stops_training_naming_the_step_and_the_chunk(tmp_path):
    from pathlib import Path

    from transformers import TrainerCallback

    from rwkv_ft.recipe import load_recipe
    from rwkv_ft.train import run

    class PoisonAfterFirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    recipe = load_recipe(
        Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml",
        [
            "model.config={vocab_size: 65536, hidden_size: 32, num_hidden_layers: 2}",
            "data.max_length=64",
            "training.chunk_len=16",
            "training.max_steps=3",
            "merge.enabled=false",
            "generate.prompt=null",
            f"training.output_dir={tmp_path}",
        ],
    )
    with pytest.raises(FloatingPointError, match=r"not finite in chunk 0 \(tokens 0\.\.15 of \d+\).* at step 2 "):
        run(recipe, callbacks=[PoisonAfterFirstStep()])


def test_documents_up_to_131072_tokens_are_kept_whole(tmp_path):
    """data.max_length=131072: a 100k-token .txt document is one example, nothing cut to a model's
    pretraining context."""
    from rwkv_ft.data import prepare_sft_data
    from rwkv_ft.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("world")
    text = "".join(f"Paragraph {i}: the state carries everything before it.\n" for i in range(10_000))
    (tmp_path / "book.txt").write_text(text)
    expected = tokenizer.encode(text)
    assert 100_000 < len(expected) <= 131_072
    data = prepare_sft_data(tmp_path / "book.txt", tokenizer, template="plain", max_length=131_072)
    assert len(data.train) == 1 and data.train[0]["input_ids"] == expected == data.train[0]["labels"]


# -- chunks whose activations wait in host memory (training.chunk_offload) ------------------------


@pytest.fixture
def offload_everything(monkeypatch):
    """The tiny models' saved tensors are a few KB: offload them all (the default skips small ones),
    from a pool of this test's own."""
    from rwkv_ft.models import offload

    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    monkeypatch.setattr(offload, "_POOLS", {})
    packed = []
    finish = offload.ChunkOffload.finish_forward
    monkeypatch.setattr(
        offload.ChunkOffload, "finish_forward", lambda self: (packed.append(self.packed_bytes), finish(self))[1]
    )
    return packed


def test_offloaded_chunks_are_spread_evenly_and_never_the_last():
    from rwkv_ft.models.offload import offloaded_chunks

    assert offloaded_chunks(16, 0.5) == [i % 2 == 0 and i < 14 for i in range(15)] + [False]  # 7 of 15
    assert offloaded_chunks(16, 1.0) == [True] * 15 + [False]
    assert offloaded_chunks(16, 0.0) == [False] * 16
    assert offloaded_chunks(1, 1.0) == [False] and offloaded_chunks(0, 1.0) == []
    for n in range(1, 40):
        for share in (0.1, 0.25, 1 / 3, 0.5, 0.9):
            plan = offloaded_chunks(n, share)
            assert len(plan) == n and not plan[-1]
            assert sum(plan) == int(share * (n - 1) + 1e-9)
            if sum(plan) * 2 <= n - 1:  # up to half: never two in a row
                assert not any(a and b for a, b in zip(plan, plan[1:]))


def test_offloaded_chunks_keep_the_exact_gradient_and_are_not_recomputed(model, offload_everything):
    """Half the chunks offloaded, between recomputed ones (all of them: the tests below)."""
    share = 0.5
    ids = random_ids(1, T, model.config.vocab_size, seed=7)
    labels = ids.clone()
    labels[:, :100] = -100
    whole = loss_and_grads(model, ids, labels)
    set_chunk(model, 64)
    model.train_chunk_offload = share
    calls = []
    model.get_decoder().register_forward_hook(lambda *args: calls.append(1))
    assert_same(loss_and_grads(model, ids, labels), whole)
    offloaded = int(share * 15)  # of the 15 chunks before the last, rounded down
    assert len(calls) == 16 + 15 - offloaded
    assert offload_everything and offload_everything[-1] > 0


def test_offload_with_lora_state_tuning_and_padding(model, offload_everything):
    from rwkv_ft.adapters import StateTuningConfig, add_state_tuning

    peft_model = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False))
    state = add_state_tuning(peft_model, StateTuningConfig(train_token_shift=True))
    with torch.no_grad():
        for p in state.parameters():
            p.normal_(0, 0.5)
    ids = random_ids(2, 300, model.config.vocab_size, seed=8)
    mask = torch.ones_like(ids)
    mask[1, 170:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    whole = loss_and_grads(peft_model, ids, labels, attention_mask=mask)
    set_chunk(peft_model, 32)
    model.train_chunk_offload = 0.5
    assert_same(loss_and_grads(peft_model, ids, labels, attention_mask=mask), whole)
    assert offload_everything[-1] > 0


def test_offload_copies_a_tensor_saved_twice_once_and_never_a_parameter(monkeypatch):
    from rwkv_ft.models import offload

    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    weight = torch.nn.Parameter(torch.randn(16, 8, dtype=torch.float64))
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)

    def f():
        return ((x * x) @ weight).sin().sum()  # mul saves x twice, mm saves x * x and the weight

    f().backward()
    expected = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    hooks = offload.ChunkOffload(torch.device("cpu"), {weight.untyped_storage().data_ptr()})
    packed = []
    pack = hooks.pack
    hooks.pack = lambda t: (r := pack(t), packed.append(r))[0]
    with hooks.saving():
        loss = f()
    # x (saved twice: one copy), x * x, and the matmul's output for sin's backward; not the weight
    assert sum(p is weight for p in packed) == 1
    copies = {id(p): p for p in packed if isinstance(p, offload._Packed)}.values()
    assert sorted(p.saves for p in copies) == [1, 1, 2] and len(packed) == 5
    assert hooks.packed_bytes == (4 * 16 + 4 * 16 + 4 * 8) * x.element_size()
    hooks.finish_forward()
    loss.backward()
    assert torch.equal(x.grad, expected[0]) and torch.equal(weight.grad, expected[1])


def test_offload_gives_back_what_it_saved_with_its_layout(monkeypatch):
    from rwkv_ft.models import offload

    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    hooks = offload.ChunkOffload(torch.device("cpu"), set())
    base = torch.randn(6, 5, 4)
    for saved in (base, base.transpose(0, 2), base[1:3], base.permute(1, 0, 2), base[4:].permute(2, 0, 1)):
        packed = hooks.pack(saved)
        assert isinstance(packed, offload._Packed)
        back = hooks.unpack(packed)
        assert back.shape == saved.shape and back.stride() == saved.stride() and torch.equal(back, saved)
        assert back.untyped_storage().data_ptr() != saved.untyped_storage().data_ptr()
    # Strided with gaps or overlapping: there is no span to copy, so the tensor stays where it is.
    for kept in (base[:, ::2], base[:1].expand(3, 5, 4), base.permute(1, 0, 2)[2:]):
        assert hooks.pack(kept) is kept


def test_a_blocks_saved_tensors_come_back_in_one_copy(model, offload_everything, monkeypatch):
    """What a block saved is copied out at the block's end and copied back as one piece (a `_Group`
    per block and host buffer), and each saved tensor is a view of that piece: per tensor, the
    backward does no copy of its own. The gradient stays exact."""
    from rwkv_ft.models import offload

    ids = random_ids(1, 200, model.config.vocab_size, seed=15)
    whole = loss_and_grads(model, ids)
    copies = []
    copy_all = offload._copy_all
    monkeypatch.setattr(
        offload, "_copy_all", lambda dst, src, **kw: (copies.append(len(dst)), copy_all(dst, src, **kw))
    )
    hooks = []
    flush = offload.ChunkOffload.flush
    monkeypatch.setattr(offload.ChunkOffload, "flush", lambda self: (hooks.append(self), flush(self))[1])
    set_chunk(model, 64)
    model.train_chunk_offload = 1.0  # chunks 0-2 offloaded, 3 kept
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    out = list(copies)
    groups = [g for g in (ref() for ref in hooks[0].queue) if g is not None]
    assert len(groups) >= 3 * model.config.num_hidden_layers  # a group (at least) per offloaded block
    assert sum(g.members for g in groups) > 2 * len(groups)  # several tensors in each, on average
    assert sum(out) == sum(g.members for g in groups)  # copied out tensor by tensor, in one call per group
    copies.clear()
    loss.backward()
    assert copies == [1] * len(groups)  # back: one copy per group, of the whole group
    assert_same((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}), whole)


def test_host_buffers_are_reused_only_once_their_copies_have_ended():
    """A step's host buffers go back to the pool when its offload is collected, but only after the
    side stream that copied to and from them has finished (a copy back that nobody waited for may
    still run then)."""
    from rwkv_ft.models import offload

    pool = offload.HostMemoryPool(pin=False)
    free_when_synchronized = []

    class Copies:  # stands in for the side stream
        def synchronize(self):
            free_when_synchronized.append(sum(map(len, pool.free.values())))

    arena = offload.HostArena(pool, Copies())
    buffer, _ = arena.take(1000)
    del arena
    assert free_when_synchronized == [0] and pool.free[buffer.numel()] == [buffer]


def test_two_forwards_before_their_backwards_keep_their_own_host_memory(model, offload_everything):
    """A second forward must not reuse the host memory that the first one's backward still needs."""
    first, second = (random_ids(1, 300, model.config.vocab_size, seed=s) for s in (9, 10))
    expected = [loss_and_grads(model, ids)[1] for ids in (first, second)]
    set_chunk(model, 64)
    model.train_chunk_offload = 1.0
    model.zero_grad()
    losses = [model(ids, labels=ids).loss for ids in (first, second)]
    (losses[0] + losses[1]).backward()
    for name, grad in expected[0].items():
        param = dict(model.named_parameters())[name]
        assert_close(param.grad, grad + expected[1][name], rel=1e-5, name=name)


def test_a_host_short_of_memory_recomputes_instead(model, offload_everything, monkeypatch, caplog):
    from rwkv_ft.models import offload

    monkeypatch.setattr(offload, "available_host_bytes", lambda: offload.HOST_RESERVE_BYTES)
    offload.warn_host_memory_short.cache_clear()
    ids = random_ids(1, 300, model.config.vocab_size, seed=11)
    whole = loss_and_grads(model, ids)
    set_chunk(model, 64)
    model.train_chunk_offload = 1.0
    calls = []
    model.get_decoder().register_forward_hook(lambda *args: calls.append(1))
    with caplog.at_level("WARNING", logger="rwkv_ft.models.offload"):
        assert_same(loss_and_grads(model, ids), whole)
    assert len(calls) == 5 + 4  # every chunk but the last recomputed
    assert offload_everything == [0]
    assert "short of memory" in caplog.text and "training.chunk_offload" in caplog.text


def test_offload_refuses_uncompiled_selective_recompute(model):
    model.set_activation_recompute("selective")
    set_chunk(model, 64)
    model.train_chunk_offload = 0.5
    ids = random_ids(1, 200, model.config.vocab_size, seed=12)
    with pytest.raises(ValueError, match="chunk_offload needs compiled blocks"):
        model(ids, labels=ids)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.chunk_offload=1.5"], "training.chunk_offload must be between 0 and 1, got 1.5"),
        (["training.chunk_offload=.nan"], "training.chunk_offload must be between 0 and 1"),
        (["training.chunk_len=null", "training.chunk_offload=0.5"], "training.chunk_offload needs training.chunk_len"),
        (
            ["training.chunk_offload=0.5", "training.gradient_checkpointing=selective", "training.compile=false"],
            "with gradient_checkpointing: selective needs training.compile: true",
        ),
        (
            ["training.chunk_offload=0.5", "training.compile=reduce-overhead"],
            "chunk_offload cannot be combined with training.compile: reduce-overhead",
        ),
    ],
)
def test_recipe_checks_chunk_offload(overrides, message):
    from pathlib import Path

    from rwkv_ft.recipe import RecipeError, load_recipe

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "rwkv7_long_context.yaml"
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe, overrides)


@pytest.mark.parametrize("limit", [0, 50_000, 1 << 40])  # 50,000: above each chunk's last (smallest) group
def test_the_backward_prefetches_the_last_saved_first_within_the_limit(model, monkeypatch, limit):
    """The prefetch as on a GPU (a CPU run never prefetches), with a window of `limit` bytes copied
    back ahead of their use: the blocks' hooks start it before any offloaded tensor is needed, the
    last saved come back first, never more than one chunk ahead of the backward (one further back
    would sit through the chunks between) nor more bytes than the window, and with no window each
    tensor is fetched only when needed."""
    from rwkv_ft.models import offload

    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    monkeypatch.setattr(offload, "_POOLS", {})
    fetched, needed_before_fetch, backward_at, most_ahead = [], [], [99], [0]
    fetch, unpack = offload.ChunkOffload._fetch, offload.ChunkOffload.unpack
    finish, hook = offload.ChunkOffload.finish_forward, offload.ChunkOffload._prefetch_hook

    def record_fetch(self, batch, ahead=False):
        assert all(p.chunk >= min(backward_at) - 1 for p in batch), "fetched more than one chunk ahead of the backward"
        fetched.extend(batch)
        fetch(self, batch, ahead)
        most_ahead[0] = max(most_ahead[0], self.ahead_bytes)

    def record_hook(self, chunk, grad):
        backward_at.append(chunk)
        hook(self, chunk, grad)

    def record_unpack(self, saved):
        if isinstance(saved, offload._Packed):
            backward_at.append(saved.chunk)
            if not saved.group.fetched:
                needed_before_fetch.append(saved.group)
        return unpack(self, saved)

    def finish_with_limit(self):
        finish(self)
        self.window = limit
        order.extend(ref() for ref in self.queue)

    order = []
    monkeypatch.setattr(offload.ChunkOffload, "_fetch", record_fetch)
    monkeypatch.setattr(offload.ChunkOffload, "unpack", record_unpack)
    monkeypatch.setattr(offload.ChunkOffload, "_prefetch_hook", record_hook)
    monkeypatch.setattr(offload.ChunkOffload, "finish_forward", finish_with_limit)
    ids = random_ids(1, 200, model.config.vocab_size, seed=13)
    whole = loss_and_grads(model, ids)
    set_chunk(model, 64)
    model.train_chunk_offload = 1.0  # chunks 0-2 offloaded, 3 kept
    assert_same(loss_and_grads(model, ids), whole)
    assert order and sorted(map(id, fetched)) == sorted(map(id, order))  # each copied back once
    assert most_ahead[0] <= limit
    if limit == 1 << 40:
        assert fetched == order[::-1] and not needed_before_fetch
        assert {p.chunk for p in fetched} == {0, 1, 2} and min(backward_at) == 0
    elif limit:
        assert 0 < len(needed_before_fetch) < len(fetched)  # some ahead, some when needed
    else:
        assert needed_before_fetch == fetched
