"""Recipes and the training entry point: validation, a real (tiny) run, resume, NaN stop, two processes."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from rwkv_ft.recipe import RecipeError, load_recipe
from rwkv_ft.testing import assert_close, free_port
from rwkv_ft.train import complete_checkpoints, run

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

TINY = [
    "model.config={vocab_size: 65536, hidden_size: 32, num_hidden_layers: 2}",
    "data.max_length=64",
    "data.eval_fraction=0.2",
    "adapter.dropout=0.0",
    "training.batch_size=4",
    "training.lr=0.01",
    "training.logging_steps=1",
    "training.warmup_steps=0",
    "training.schedule=constant",
    "merge.enabled=false",
    "generate.prompt=null",
]


def tiny_recipe(tmp_path: Path, *extra: str, recipe: Path = ROOT / "recipes" / "quickstart.yaml"):
    return load_recipe(recipe, [*TINY, f"training.output_dir={tmp_path}", *extra])


# ------------------------------------------------------------------------------------------------
# Recipes


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads_and_names_its_command(path):
    recipe = load_recipe(path)
    header = path.read_text().splitlines()[:8]
    assert any("rwkv_ft.train" in line or "rwkv-ft train" in line for line in header), "header must give the command"
    assert recipe.training.output_dir.startswith("outputs/")
    if recipe.model.path is None:
        assert recipe.model.config and recipe.model.model_type, "a recipe without model.path builds from model.config"


def test_recipe_set_covers_lora_qlora_and_state_tuning():
    kinds = {(r.adapter.type, r.model.quantization) for r in map(load_recipe, RECIPES)}
    assert {("lora", None), ("lora", "nf4"), ("lora", "int8"), ("state", None)} <= kinds


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rate: 0.1\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: unknown key 'training\.learning_rate'"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="training.batch_size should be int"):
        load_recipe(None, ["training.batch_size=four"])
    with pytest.raises(RecipeError, match="model.quantization must be one of"):
        load_recipe(None, ["model.quantization=int3"])


def test_selective_blocks_refusals_name_the_key(tmp_path):
    with pytest.raises(RecipeError, match="selective_blocks needs training.gradient_checkpointing: true"):
        load_recipe(None, ["training.selective_blocks=2"])
    with pytest.raises(RecipeError, match="selective_blocks must be >= 0"):
        load_recipe(None, ["training.gradient_checkpointing=true", "training.selective_blocks=-1"])
    recipe = tiny_recipe(tmp_path, "training.gradient_checkpointing=true", "training.selective_blocks=3")
    with pytest.raises(RecipeError, match="training.selective_blocks must be between 0 and the model's 2 blocks"):
        run(recipe)


def test_overrides_parse_yaml_values():
    recipe = load_recipe(None, ["training.lr=3e-4", "data.pack=true", "adapter.target_modules=[key, value]"])
    assert recipe.training.lr == pytest.approx(3e-4) and recipe.data.pack is True
    assert recipe.adapter.target_modules == ["key", "value"]


# ------------------------------------------------------------------------------------------------
# Training runs


def adapter_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def test_lora_run_lowers_the_loss_and_leaves_its_outputs(tmp_path):
    summary = run(tiny_recipe(tmp_path, "training.max_steps=8", "training.eval_steps=4", "training.save_steps=4"))
    history = json.loads((complete_checkpoints(tmp_path)[-1] / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert summary["steps"] == 8 and summary["eval_loss"] is not None
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*")), "tensorboard logs"
    assert json.loads((tmp_path / "training_summary.json").read_text())["steps"] == 8
    assert not (tmp_path / ".staging").exists()


class CrashAt(TrainerCallback):
    """Simulates a crash (e.g. a killed process) when `step` is reached."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash at step {self.step}")


STATE_TUNING = ["adapter.type=state", "adapter.modules_to_save=null", "training.lr=0.1"]


@pytest.mark.parametrize("extra", [[], STATE_TUNING], ids=["lora", "state"])
def test_resume_continues_bit_for_bit(tmp_path, extra):
    """A crashed run resumed from its checkpoint ends with exactly the straight run's adapter; the
    checkpoint is itself an adapter (LoRA and/or the learned state) that the merge reads."""
    from rwkv_ft.merge import merge_adapter

    args = ["training.max_steps=6", "training.save_steps=3", "training.eval_steps=100", *extra]
    run(tiny_recipe(tmp_path / "straight", *args))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_recipe(tmp_path / "crashed", *args), callbacks=[CrashAt(5)])
    assert [p.name for p in complete_checkpoints(tmp_path / "crashed")] == ["checkpoint-3"]
    with pytest.raises(RecipeError, match="--resume"):
        run(tiny_recipe(tmp_path / "crashed", *args))  # refuses to start over existing checkpoints
    run(tiny_recipe(tmp_path / "crashed", *args), resume=True)
    name = "state_tuning.safetensors" if extra else "adapter_model.safetensors"
    straight, resumed = (load_file(tmp_path / run_dir / "adapter" / name) for run_dir in ("straight", "crashed"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert (checkpoint / name).exists() and not (checkpoint / "model.safetensors").exists()
    merge_adapter(tmp_path / "straight" / "base", checkpoint, tmp_path / "merged")


class PoisonAfter(TrainerCallback):
    """Makes the loss NaN from the step after `step` by poisoning a trainable weight."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match="at step 4.*last good checkpoint is .*checkpoint-2"):
        run(tiny_recipe(tmp_path, "training.max_steps=6", "training.save_steps=2"), callbacks=[PoisonAfter(3)])
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2"]


def test_non_finite_weights_are_never_saved(tmp_path):
    with pytest.raises(FloatingPointError, match="after step 2 .* not finite.*checkpoint-2 was not saved"):
        run(tiny_recipe(tmp_path, "training.max_steps=6", "training.save_steps=2"), callbacks=[PoisonAfter(2)])
    assert complete_checkpoints(tmp_path) == []


def test_length_grouped_packed_and_gradient_checkpointed_run(tmp_path):
    extra = ["training.group_by_length=true", "data.pack=true", "training.gradient_checkpointing=true"]
    summary = run(tiny_recipe(tmp_path, "training.max_steps=2", *extra))
    assert summary["steps"] == 2 and summary["tokens_seen"] > 0


def test_bad_data_row_names_file_and_line(tmp_path):
    data = tmp_path / "data.jsonl"
    good = json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi!"})
    data.write_text("\n".join([good] * 6 + ['{"instruction": "oops"'] + [good] * 3) + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl.*line 7"):
        run(tiny_recipe(tmp_path / "out", f"data.path={data}", "training.max_steps=1"))
    summary = run(tiny_recipe(tmp_path / "out2", f"data.path={data}", "training.max_steps=1", "data.strict=false"))
    assert sum(summary["skipped_rows"].values()) == 1


def test_cli_entry_point_reports_errors_cleanly(tmp_path):
    from rwkv_ft.cli import main

    assert main(["train", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """`accelerate launch --num_processes 2` (CPU, gloo) gives the adapter a single process gives, and
    the same eval loss on an eval set that does not split evenly over the two (3 examples)."""
    args = [*TINY, "training.max_steps=3", "training.save_steps=100", "training.eval_steps=100"]
    args += ["data.eval_fraction=null", "data.eval_size=3"]
    single = run(load_recipe(ROOT / "recipes" / "quickstart.yaml", [*args, f"training.output_dir={tmp_path / 'one'}"]))
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", str(free_port()),
        "-m", "rwkv_ft.train", str(ROOT / "recipes" / "quickstart.yaml"),
        *args, "training.batch_size=2", f"training.output_dir={tmp_path / 'two'}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = launcher.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and both workers
        raise
    assert launcher.returncode == 0, stderr[-3000:]
    one, two = adapter_weights(tmp_path / "one"), adapter_weights(tmp_path / "two")
    for key in one:
        assert_close(two[key], one[key], rel=1e-4, name=key)
    double = json.loads((tmp_path / "two" / "training_summary.json").read_text())
    assert double["eval_tokens"] == single["eval_tokens"] > 0
    assert double["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-4)


def test_eval_loss_is_the_token_weighted_mean(tmp_path):
    """eval_loss = sum of token losses / scored tokens over the eval set, whatever the batch size."""
    from transformers import AutoModelForCausalLM

    args = ["training.max_steps=1", "training.lr=0", "data.eval_fraction=null", "data.eval_size=5"]
    summaries = [run(tiny_recipe(tmp_path / f"b{bs}", *args, f"training.eval_batch_size={bs}")) for bs in (1, 2)]
    assert summaries[0]["eval_loss"] == pytest.approx(summaries[1]["eval_loss"], rel=1e-5)
    # By hand, with the untrained base (lr=0 leaves the LoRA product at zero).
    from rwkv_ft.data import SFTDataCollator, prepare_sft_data
    from rwkv_ft.tokenizers import load_tokenizer

    recipe = tiny_recipe(tmp_path / "b1", *args)
    tokenizer = load_tokenizer("world")
    data = prepare_sft_data(recipe.data.path, tokenizer, max_length=64, eval_size=5, seed=recipe.training.seed)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "b1" / "base").eval()
    total = tokens = 0.0
    with torch.no_grad():
        for example in data.eval:
            batch = SFTDataCollator.from_tokenizer(tokenizer)([example])
            logits = model(batch["input_ids"]).logits[0, :-1]
            labels = batch["labels"][0, 1:]
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            tokens += (labels != -100).sum().item()
    assert summaries[0]["eval_tokens"] == tokens
    assert summaries[0]["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path):
    run(tiny_recipe(tmp_path, "training.max_steps=5", "training.save_steps=1", "training.save_total_limit=2"))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]


def test_summary_of_a_resumed_run_covers_the_whole_run(tmp_path):
    args = ["training.max_steps=6", "training.save_steps=3", "training.eval_steps=100"]
    straight = run(tiny_recipe(tmp_path / "straight", *args))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_recipe(tmp_path / "crashed", *args), callbacks=[CrashAt(5)])
    resumed = run(tiny_recipe(tmp_path / "crashed", *args), resume=True)
    assert resumed["steps"] == straight["steps"] == 6
    assert resumed["resumed_from_step"] == 3 and resumed["sessions"] == 2
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-6)
    assert resumed["tokens_seen"] == straight["tokens_seen"]
    first_session = json.loads((tmp_path / "crashed" / "checkpoint-3" / "rwkv_ft_progress.json").read_text())
    assert resumed["train_runtime_s"] > first_session["runtime_s"] > 0


# bitsandbytes' CPU 4-bit kernels need in_features >= 64.
QLORA = ["model.quantization=nf4", "model.config={vocab_size: 65536, hidden_size: 64, num_hidden_layers: 2}"]


@pytest.mark.parametrize("extra", [QLORA, ["adapter.type=state"]], ids=["qlora_nf4", "state"])
def test_qlora_and_state_tuning_recipes_train_and_merge(tmp_path, extra):
    summary = run(
        tiny_recipe(tmp_path, "training.max_steps=3", "merge.enabled=true", "adapter.modules_to_save=null", *extra)
    )
    assert summary["steps"] == 3 and (tmp_path / "merged" / "model.safetensors").exists()
    info = json.loads((tmp_path / "adapter" / "rwkv_ft_adapter.json").read_text())
    if extra is QLORA:
        assert info["quantization"] is not None
    else:
        assert (tmp_path / "adapter" / "state_tuning.safetensors").exists()


def test_cli_train_merges_and_prints_a_sample(tmp_path, capsys, monkeypatch):
    import rwkv_ft.generation as generation
    from rwkv_ft.cli import main

    prompts, real = [], generation.chat_prompt

    def spy(tokenizer, message):
        prompts.append(real(tokenizer, message))
        return prompts[-1]

    monkeypatch.setattr(generation, "chat_prompt", spy)
    recipe = ROOT / "recipes" / "quickstart.yaml"
    args = [*TINY, "training.max_steps=2", "merge.enabled=true", "generate.prompt=Say hi.", "generate.max_new_tokens=4"]
    assert main(["train", str(recipe), *args, f"training.output_dir={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    assert f"merged model: {tmp_path / 'merged'}" in printed and "sample: 'Say hi.' -> " in printed
    assert prompts == ["User: Say hi.\n\nAssistant:"]  # the sample is prompted through the chat template


# ------------------------------------------------------------------------------------------------
# Training-step speed switches (issue 11)


def test_speed_switches_reach_the_model(tmp_path):
    """adapter.lora_compute, training.compile and training.gradient_checkpointing=selective are
    applied by attach_adapter; bf16 weights train without autocast (it would only upcast norms)."""
    from rwkv_ft.adapters.fast_lora import FastLoraLinear
    from rwkv_ft.models.modeling_utils import rwkv_blocks
    from rwkv_ft.testing import tiny_rwkv4
    from rwkv_ft.train import attach_adapter, needs_autocast, training_arguments

    def attached(*overrides):
        return attach_adapter(tiny_rwkv4(), tiny_recipe(tmp_path, *overrides))

    fast = attached("training.compile=true", "training.gradient_checkpointing=selective")
    assert any(isinstance(m, FastLoraLinear) for m in fast.modules())
    assert all(b.selective_recompute and b._compiled_call_impl is not None for b in rwkv_blocks(fast))
    stock = attached("adapter.lora_compute=fp32")
    assert not any(isinstance(m, FastLoraLinear) for m in stock.modules())
    assert all(not b.selective_recompute and b._compiled_call_impl is None for b in rwkv_blocks(stock))

    calls = []
    real_compile = type(fast.base_model.model).compile_blocks
    try:  # reduce-overhead reaches torch.compile as its mode (CUDA graphs; a GPU-only effect)
        type(fast.base_model.model).compile_blocks = lambda self, **kw: calls.append(kw)
        attached("training.compile=reduce-overhead")
        attached("training.compile=true")
        attached("training.compile=step-graph")  # blocks without graphs of their own: the step is one
    finally:
        type(fast.base_model.model).compile_blocks = real_compile
    assert calls == [{"mode": "reduce-overhead"}, {}, {}]
    with pytest.raises(RecipeError, match="training.compile"):
        tiny_recipe(tmp_path, "training.compile=fast")

    bf16 = tiny_recipe(tmp_path, "model.dtype=bf16", "training.precision=bf16")
    assert not needs_autocast(bf16) and not training_arguments(bf16, tmp_path, False).bf16
    for other in (["model.dtype=fp32"], ["model.dtype=bf16", "model.quantization=nf4"]):
        recipe = tiny_recipe(tmp_path, "training.precision=bf16", *other)
        assert needs_autocast(recipe) and training_arguments(recipe, tmp_path, False).bf16


def test_under_cuda_graphs_batch_widths_come_in_few_sizes(tmp_path):
    """training.compile: reduce-overhead (and step-graph) records a CUDA graph per batch width: the run's collator
    rounds widths up to multiples of 128 (padding with ignored labels, which leaves the loss as it
    was); other settings keep each batch's own width."""
    from types import SimpleNamespace

    from rwkv_ft.testing import random_ids, tiny_rwkv4
    from rwkv_ft.train import GRAPHED_WIDTH_STEP, data_collator

    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=0)
    ids = random_ids(2, 131, seed=4)
    features = [{"input_ids": ids[0].tolist(), "labels": ids[0].tolist()}, {"input_ids": ids[1, :7].tolist()}]
    graphed = data_collator(tiny_recipe(tmp_path, "training.compile=reduce-overhead"), tokenizer)(features)
    step_graphed = data_collator(tiny_recipe(tmp_path, "training.compile=step-graph"), tokenizer)(features)
    plain = data_collator(tiny_recipe(tmp_path, "training.compile=true"), tokenizer)(features)
    assert plain["input_ids"].shape == (2, 131) and graphed["input_ids"].shape == (2, 2 * GRAPHED_WIDTH_STEP)
    assert step_graphed["input_ids"].shape == graphed["input_ids"].shape
    assert (graphed["labels"][:, 131:] == -100).all() and (graphed["attention_mask"][:, 131:] == 0).all()
    model = tiny_rwkv4().train()
    losses = [
        model(**{k: batch[k] for k in ("input_ids", "labels", "attention_mask")}).loss for batch in (plain, graphed)
    ]
    assert_close(losses[1], losses[0], name="loss with the padded width")


@pytest.mark.parametrize("adapter", ["none", "lora", "state"])
@pytest.mark.parametrize("version", ["rwkv4", "rwkv7"])
def test_fp32_weights_train_and_generate_under_bf16_autocast(version, adapter):
    """`training.precision: bf16` over fp32 weights runs under autocast (needs_autocast): the
    projections come out in bf16 while their products with fp32 parameters are promoted to fp32.
    RWKV-7 raised "k dtype torch.float32 != r dtype torch.bfloat16" there, in training and in
    generation; now each model's loss is within bf16 rounding of its fp32 loss."""
    from peft import LoraConfig, get_peft_model

    from rwkv_ft.adapters import StateTuningConfig, add_state_tuning
    from rwkv_ft.adapters.fast_lora import enable_fast_lora
    from rwkv_ft.testing import MODEL_FACTORIES, random_ids

    model = MODEL_FACTORIES[version]().train()
    if adapter == "lora":
        model = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False))
        enable_fast_lora(model)  # the recipes' LoRA path
    elif adapter == "state":
        add_state_tuning(model, StateTuningConfig(train_token_shift=True))
    ids = random_ids(2, 40, 97, seed=12)
    reference = model(ids, labels=ids).loss.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
        loss.backward()
        generated = model.eval().generate(ids[:, :8], max_new_tokens=3, do_sample=False)
    assert_close(loss.float(), reference, dtype=torch.bfloat16, rel=2e-2, name="bf16-autocast loss")
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert generated.shape == (2, 11)


@pytest.mark.slow
def test_compiled_run_with_selective_recompute_matches_eager(tmp_path, monkeypatch):
    """training.compile=true with selective recompute and the Triton WKV op (interpreter here) trains
    through the real Trainer loop: the same losses, step by step, as the eager run. The blocks compile
    with aot_eager: the Trainer's wiring is under test here; inductor's code for the same blocks is
    checked in test_compile.py and, through the Trainer, under ZeRO-2 in test_distributed.py."""
    from torch._dynamo.utils import counters

    from rwkv_ft import train

    monkeypatch.setattr(train, "compile_options", lambda setting: {"backend": "aot_eager"})
    args = ["training.max_steps=3", "data.eval_fraction=null", "model.wkv_backend=triton", "data.max_length=32"]
    eager = run(tiny_recipe(tmp_path / "eager", *args))
    torch._dynamo.reset()
    counters.clear()
    compiled = run(
        tiny_recipe(tmp_path / "compiled", *args, "training.compile=true", "training.gradient_checkpointing=selective")
    )
    assert counters["stats"]["unique_graphs"] > 0, "the blocks ran compiled"
    torch._dynamo.reset()

    def losses(directory):
        history = json.loads((complete_checkpoints(directory)[-1] / "trainer_state.json").read_text())["log_history"]
        return torch.tensor([entry["loss"] for entry in history if "loss" in entry])

    assert compiled["steps"] == eager["steps"] == 3
    assert_close(losses(tmp_path / "compiled"), losses(tmp_path / "eager"), rel=1e-4, name="losses")


def test_step_graph_run_trains_as_the_eager_run(tmp_path, monkeypatch):
    """training.compile=step-graph through the real Trainer loop, with gradient accumulation and the
    collator's right padding: the same losses, step by step, as the eager run, most micro-steps
    replayed. The CUDA graph is stood in for by `RerunRecorder` (CPU); the blocks compile with
    aot_eager (the recording, not inductor, is under test here)."""
    from rwkv_ft import step_graph, train
    from rwkv_ft.testing import RerunRecorder

    monkeypatch.setattr(step_graph, "CudaGraphRecorder", RerunRecorder)
    monkeypatch.setattr(train, "check_step_graph_setup", lambda processes, device, gpus: None)
    monkeypatch.setattr(train, "compile_options", lambda setting: {"backend": "aot_eager"})
    RerunRecorder.recorded = RerunRecorder.replays = 0
    # RWKV-7: its PyTorch WKV steps 16 tokens at a time, where RWKV-4's reference unrolls every token
    # into the traced graph (3 minutes of tracing on CI's CPU at 32 tokens).
    rwkv7 = ROOT / "recipes" / "quickstart_rwkv7.yaml"
    args = [
        "model.config={vocab_size: 65536, hidden_size: 64, num_hidden_layers: 2, head_size: 32}",
        "training.max_steps=4",
        "training.grad_accum=2",
        "data.eval_fraction=null",
        "data.max_length=32",
    ]
    eager = run(tiny_recipe(tmp_path / "eager", *args, recipe=rwkv7))
    torch._dynamo.reset()
    graphed = run(tiny_recipe(tmp_path / "graphed", *args, "training.compile=step-graph", recipe=rwkv7))
    torch._dynamo.reset()
    assert RerunRecorder.recorded >= 1 and RerunRecorder.replays >= 2, "micro-steps were recorded and replayed"

    def losses(directory):
        history = json.loads((complete_checkpoints(directory)[-1] / "trainer_state.json").read_text())["log_history"]
        return torch.tensor([entry["loss"] for entry in history if "loss" in entry])

    assert graphed["steps"] == eager["steps"] == 4
    assert_close(losses(tmp_path / "graphed"), losses(tmp_path / "eager"), rel=1e-5, name="losses")


def test_step_graph_refuses_what_it_cannot_record(tmp_path):
    from rwkv_ft.train import check_step_graph_setup

    if not torch.cuda.is_available():  # refused before any data is read or model built: nothing left behind
        with pytest.raises(RecipeError, match="step-graph needs a CUDA GPU"):
            run(tiny_recipe(tmp_path / "run", "training.compile=step-graph"))
        assert not (tmp_path / "run").exists()

    with pytest.raises(RecipeError, match="one process, not 2"):
        check_step_graph_setup(2, "cuda")
    with pytest.raises(RecipeError, match="needs a CUDA GPU"):
        check_step_graph_setup(1, "cpu")
    with pytest.raises(RecipeError, match="this process sees 2"):
        check_step_graph_setup(1, "cuda", gpus=2)
    with pytest.raises(RecipeError, match="training.chunk_len"):
        load_recipe(None, ["training.compile=step-graph", "training.chunk_len=64"])
    with pytest.raises(RecipeError, match="quantized base"):
        load_recipe(None, ["training.compile=step-graph", "model.quantization=nf4"])


def test_trainer_bookkeeping_runs_over_the_trained_parameters(tmp_path):
    """The Trainer's per-step FLOP count, training-mode switch, gradient zeroing and clipping give
    what the stock Trainer gives, without walking the frozen base each step; eval() still reaches
    every module, and train() puts the model's own methods back."""
    from transformers import Trainer

    from rwkv_ft.testing import tiny_rwkv4
    from rwkv_ft.train import _make_trainer_class, attach_adapter, training_arguments

    recipe = tiny_recipe(tmp_path)
    model = attach_adapter(tiny_rwkv4(), recipe)
    trainer = _make_trainer_class()(model=model, args=training_arguments(recipe, tmp_path, False))
    ids = torch.randint(1, model.config.vocab_size, (2, 9))
    assert trainer.floating_point_ops({"input_ids": ids}) == Trainer.floating_point_ops(trainer, {"input_ids": ids}) > 0

    trained = [p for p in model.parameters() if p.requires_grad]
    assert trainer.trained_parameters() == trained and len(trained) < len(list(model.parameters()))
    trainer._walk_trained_parameters_only(model)
    model(ids, labels=ids).loss.backward()
    if hasattr(Trainer, "_clip_grad_norm"):  # transformers releases that clip in a method
        copies = [torch.nn.Parameter(p.detach().clone()) for p in trained]
        for copy, p in zip(copies, trained):
            copy.grad = p.grad.clone()
        expected = torch.nn.utils.clip_grad_norm_(copies, trainer.args.max_grad_norm)
        assert torch.equal(trainer._clip_grad_norm(model), expected) and float(expected) > trainer.args.max_grad_norm
        assert all(torch.equal(p.grad, copy.grad) for p, copy in zip(trained, copies))  # clipped alike
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())

    model.eval()  # a walk: every module leaves training mode
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    model.base_model.model.eval()  # the LM alone (from_pretrained returns it so): the next train() walks
    model.train()
    assert all(m.training for m in model.modules())
    lora = next(m for name, m in model.named_modules() if name.endswith("lora_A"))
    lora.eval()
    model.train()  # already in training mode: skipped
    assert not lora.training
    trainer._restore_walks()
    assert "train" not in vars(model) and "zero_grad" not in vars(model)
    model.train()  # the model's own method again: a walk
    assert lora.training


@pytest.mark.parametrize("max_norm", [0.5, 1e9], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("dtypes", [[torch.float32] * 5, [torch.float32, torch.bfloat16, torch.float32]])
def test_gradient_clipping_is_torchs_bit_for_bit(max_norm, dtypes):
    """clip_grad_norm (no call per tensor) gives torch.nn.utils.clip_grad_norm_'s norm and scaled
    gradients exactly, with gradients of several dtypes; no gradients at all give 0."""
    from rwkv_ft.train import clip_grad_norm

    g = torch.Generator().manual_seed(len(dtypes))
    ours = [(torch.randn(3 + i, 5, generator=g) * 0.4).to(d) for i, d in enumerate(dtypes)]
    theirs = [torch.nn.Parameter(x.clone()) for x in ours]
    for p, x in zip(theirs, ours):
        p.grad = x.clone()
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert torch.equal(clip_grad_norm(ours, max_norm), expected)
    assert all(torch.equal(x, p.grad) for x, p in zip(ours, theirs))
    assert (float(expected) > max_norm) == (max_norm == 0.5)  # both cases are exercised
    assert float(clip_grad_norm([], 1.0)) == 0.0


class ModesAtEachStep(TrainerCallback):
    """Records whether every module of the model was in training mode at the end of each step."""

    def __init__(self):
        self.all_training = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.all_training.append(all(m.training for m in model.modules()))


def test_every_module_trains_at_every_step_around_evaluations(tmp_path):
    modes = ModesAtEachStep()
    run(tiny_recipe(tmp_path, "training.max_steps=4", "training.eval_steps=2"), callbacks=[modes])
    assert modes.all_training == [True] * 4


class FrozenObjectsAtEachStep(TrainerCallback):
    """Records how many objects Python's garbage collector has frozen at the end of each step."""

    def __init__(self):
        self.frozen = []

    def on_step_end(self, args, state, control, **kwargs):
        self.frozen.append(gc.get_freeze_count())


class CollectorInForwardAndBetweenSteps(TrainerCallback):
    """Records whether Python's garbage collector runs during each training forward and at each
    step's end."""

    def __init__(self):
        self.in_forward, self.at_step_end = [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def record(module, *_):
            if module.training:  # not the evaluation's forwards
                self.in_forward.append(gc.isenabled())

        model.register_forward_hook(record)

    def on_step_end(self, args, state, control, **kwargs):
        self.at_step_end.append(gc.isenabled())


def test_the_garbage_collector_is_paused_inside_each_training_step(tmp_path):
    """A long-context step's objects live until its backward ends; the collector walking them
    again and again cost seconds per step at 131,072 tokens. It is paused inside each step only."""
    seen = CollectorInForwardAndBetweenSteps()
    run(tiny_recipe(tmp_path, "training.max_steps=2", "training.chunk_len=8"), callbacks=[seen])
    assert seen.in_forward and not any(seen.in_forward)
    assert seen.at_step_end == [True, True] and gc.isenabled()


def test_collector_paused_restores_the_collector_crash_or_not():
    from rwkv_ft.train import collector_paused

    with pytest.raises(RuntimeError, match="inside"):
        with collector_paused():
            assert not gc.isenabled()
            raise RuntimeError("inside")
    assert gc.isenabled()
    gc.disable()  # a program that turned the collector off keeps it off
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_garbage_collector_skips_the_model_while_training(tmp_path):
    """The objects that exist when training starts (the model among them) are frozen for the
    garbage collector while the Trainer runs, and thawed after it, crash or not."""
    assert gc.get_freeze_count() == 0
    frozen = FrozenObjectsAtEachStep()
    run(tiny_recipe(tmp_path, "training.max_steps=1"), callbacks=[frozen])
    assert len(frozen.frozen) == 1 and min(frozen.frozen) > 10_000
    assert gc.get_freeze_count() == 0
    with pytest.raises(KeyboardInterrupt, match="crash at step 1"):
        run(tiny_recipe(tmp_path / "crashed", "training.max_steps=2"), callbacks=[CrashAt(1)])
    assert gc.get_freeze_count() == 0


def test_chunk_offload_is_refused_where_parameters_are_sharded(tmp_path, monkeypatch):
    """FSDP2 and DeepSpeed gather parameters into fresh memory, which the offload would copy to the
    host with the activations: refused by name before any step (a one-process stand-in for them)."""
    import rwkv_ft.train as train

    monkeypatch.setattr(train, "sharding", lambda accelerator: "fsdp2")
    recipe = tiny_recipe(tmp_path, "training.chunk_len=16", "training.chunk_offload=0.5", "training.max_steps=1")
    with pytest.raises(RecipeError, match="training.chunk_offload works on one GPU or under DDP, not under fsdp2"):
        train.run(recipe)
