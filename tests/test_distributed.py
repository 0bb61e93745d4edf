"""Several processes (issue 13): the accelerate configs, sharded checkpoints, and a failing rank.

The multi-process tests run 2 CPU processes over gloo: DDP and DeepSpeed ZeRO-2/3 through
`accelerate launch` (DeepSpeed's CPU accelerator), FSDP2 through torch's `fully_shard` directly
(accelerate enables FSDP only on GPUs); tests/multiprocess_worker.py is what each process runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rwkv_ft.testing import assert_close, free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "accelerate"
ACCELERATE_CONFIGS = sorted(CONFIGS.glob("*.yaml"))
WORKER = Path(__file__).resolve().parent / "multiprocess_worker.py"
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
NO_DEEPSPEED = "DeepSpeed is not installed (pip install -e '.[deepspeed]'; scripts/test.sh installs it)"


def accelerate_has_fsdp2() -> bool:
    from accelerate.utils import fsdp_utils

    return hasattr(fsdp_utils, "fsdp2_prepare_auto_wrap_policy")


NEEDS_FSDP2 = pytest.mark.skipif(
    not accelerate_has_fsdp2(), reason="FSDP2 needs accelerate >= 1.6 (CI's lower bound is older)"
)


TINY = [
    "model.config={vocab_size: 65536, hidden_size: 32, num_hidden_layers: 2}",
    "data.max_length=64",
    "adapter.dropout=0.0",
    "training.lr=0.01",
    "training.logging_steps=1",
    "training.warmup_steps=0",
    "training.schedule=constant",
    "training.eval_steps=100",
    "data.eval_fraction=null",
    "data.eval_size=3",
    "merge.enabled=false",
    "generate.prompt=null",
]


def launch(config: Path, out: Path, *args: str, fault: str | None = None, env: dict | None = None, timeout: int = 300):
    """`accelerate launch --config_file CONFIG worker train quickstart.yaml ...` with 2 processes on
    the CPU; the launcher and its workers are killed if they outlive `timeout` (a hang fails)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--main_process_port", str(free_port()),
        str(WORKER), "train", str(QUICKSTART), *TINY, "training.batch_size=2", f"training.output_dir={out}", *args,
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    environment.pop("RWKV_FT_TEST_FAULT", None)
    environment.update(env or {}, **({"RWKV_FT_TEST_FAULT": fault} if fault else {}))
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every worker
        proc.communicate()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def one_process(out: Path, *args: str):
    from rwkv_ft.recipe import load_recipe
    from rwkv_ft.train import run

    return run(load_recipe(QUICKSTART, [*TINY, "training.batch_size=4", f"training.output_dir={out}", *args]))


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


# ------------------------------------------------------------------------------------------------
# The configs


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.name for p in ACCELERATE_CONFIGS])
def test_accelerate_configs_load_and_name_their_command(path):
    """accelerate reads each config (its own loader rejects unknown keys), whose header gives the
    exact command."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.distributed_type in {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}
    assert config.num_processes >= 1
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    command = f"accelerate launch --config_file recipes/accelerate/{path.name} -m rwkv_ft.train RECIPE"
    assert any(command in line for line in header), f"{path.name}: the header must give `{command}`"


def test_the_set_covers_ddp_fsdp2_and_zero_2_and_3():
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in ACCELERATE_CONFIGS}
    assert configs["multi_gpu"]["distributed_type"] == "MULTI_GPU"
    assert configs["fsdp"]["distributed_type"] == "FSDP" and configs["fsdp"]["fsdp_config"]["fsdp_version"] == 2
    stages = {c["deepspeed_config"]["zero_stage"] for c in configs.values() if c["distributed_type"] == "DEEPSPEED"}
    assert stages == {2, 3}


@NEEDS_FSDP2
@pytest.mark.parametrize("version", ["rwkv4", "rwkv7"])
def test_fsdp2_config_shards_whole_blocks_of_every_version(version):
    """accelerate's FSDP2 wrap policy from fsdp.yaml makes each RWKV block (of either version, under
    peft) one unit and nothing else; the model's _no_split_modules names its block class."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from peft import LoraConfig, get_peft_model

    from rwkv_ft.models.architecture import architecture_for_model_type
    from rwkv_ft.models.modeling_utils import rwkv_blocks
    from rwkv_ft.testing import MODEL_FACTORIES

    config = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())
    fsdp = config["fsdp_config"]
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp, "naming one version's block breaks the other's"
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT" and fsdp["fsdp_reshard_after_forward"] is True
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"],
        auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        state_dict_type=fsdp["fsdp_state_dict_type"],
    )
    model = MODEL_FACTORIES[version]()
    assert list(model._no_split_modules) == [architecture_for_model_type(model.config.model_type).block_class_name]
    model = get_peft_model(model, LoraConfig(r=4, task_type="CAUSAL_LM"))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert [m for m in model.modules() if policy(m)] == rwkv_blocks(model)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason=NO_DEEPSPEED)
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_configs_leave_batch_accumulation_and_clipping_to_the_recipe(stage):
    """The DeepSpeed config accelerate builds from deepspeed_zeroN.yaml fixes none of the values the
    Trainer fills from the recipe (a fixed one that disagreed would stop the run)."""
    from accelerate.utils import DeepSpeedPlugin

    config = yaml.safe_load((CONFIGS / f"deepspeed_zero{stage}.yaml").read_text())
    ds = DeepSpeedPlugin(**config["deepspeed_config"]).deepspeed_config
    assert ds["zero_optimization"]["stage"] == stage
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert ds[key] == "auto", key
    assert ds.get("gradient_clipping", "auto") == "auto"
    assert config["mixed_precision"] == "no", "training.precision decides"
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_extra_is_declared():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(spec.startswith("deepspeed>=") for spec in extras["deepspeed"])


# ------------------------------------------------------------------------------------------------
# Pieces


def test_pad_batch_pads_as_the_collator_does():
    """Padding a collated batch to the longest on any rank gives what the collator gives for that
    width: masked, labels -100, packed position ids continuing (no new segment)."""
    from rwkv_ft.data import SFTDataCollator
    from rwkv_ft.train import pad_batch

    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]},
        {"input_ids": [8, 9], "labels": [8, 9], "position_ids": [0, 1]},
    ]
    narrow = SFTDataCollator(pad_token_id=0)(features)
    wide = SFTDataCollator(pad_token_id=0, pad_to_multiple_of=8)(features)
    padded = pad_batch(narrow, 8, pad_token_id=0)
    assert padded.keys() == wide.keys()
    for key in wide:
        assert torch.equal(padded[key], wide[key]), key
    assert pad_batch(narrow, 3, pad_token_id=0) is narrow


def test_nonfinite_loss_message_names_the_ranks_and_chunks():
    from rwkv_ft.train import nonfinite_loss_message

    one = nonfinite_loss_message([[0, 1, 2, 100, 149, 300]], step=7, epoch=0.5)
    assert one.startswith("the loss is not finite in chunk 2 (tokens 100..149 of 300) of this batch at step 7 ")
    two = nonfinite_loss_message([[0, 0, -1, -1, -1, -1], [1, 1, -1, -1, -1, -1]], step=3, epoch=1.0)
    assert two.startswith("the loss is not finite on rank 1 at step 3 (epoch 1.00)")


@pytest.mark.parametrize("version", ["rwkv4", "rwkv7"])
def test_saved_adapters_read_back_by_parameter_name(tmp_path, version):
    """What --resume reads from a checkpoint: every trained tensor, keyed by the parameter it belongs
    to (peft's saved names mapped back, the learned state's prefix restored)."""
    from peft import LoraConfig, get_peft_model

    from rwkv_ft.adapters import add_state_tuning, read_trained_tensors, save_adapter
    from rwkv_ft.testing import MODEL_FACTORIES

    model = get_peft_model(MODEL_FACTORIES[version](), LoraConfig(r=4, modules_to_save=["head"], task_type="CAUSAL_LM"))
    add_state_tuning(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    save_adapter(model, tmp_path)
    tensors = read_trained_tensors(model, tmp_path)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert tensors.keys() == trained.keys()
    for name, p in trained.items():
        assert torch.equal(tensors[name], p.detach()), name


# ------------------------------------------------------------------------------------------------
# Two processes


@pytest.mark.slow
def test_fsdp2_shards_gather_into_a_normal_adapter(tmp_path):
    """Under FSDP2 (2 gloo processes; RWKV-7 with compiled blocks over the Triton kernel) a step
    gives the unsharded model's loss; the trained parameters (LoRA, a trained head, the learned
    state) are gathered whole and saved as the adapter an unsharded model of the same values saves;
    `rwkv-ft merge` reads it; whole tensors go back into the shards (resume)."""
    from rwkv_ft.merge import merge_adapter

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={free_port()}"]
    command = [*torchrun, str(WORKER), "fsdp2", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-3000:]
    for version in ("rwkv4", "rwkv7"):
        sharded, whole = tmp_path / version / "sharded", tmp_path / version / "whole"
        for name in ("adapter_model.safetensors", "state_tuning.safetensors"):
            got, expected = load_file(sharded / name), load_file(whole / name)
            assert got.keys() == expected.keys() and got
            for key in expected:
                assert torch.equal(got[key], expected[key]), (version, name, key)
        merged = merge_adapter(tmp_path / version / "base", sharded, tmp_path / version / "merged")
        assert (merged.out / "model.safetensors").exists()


SHARDED_RUN = ["training.max_steps=4", "training.save_steps=2"]


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    """The one-process run the sharded runs (ZeRO-2, ZeRO-3, FSDP2) are compared with (its summary
    and adapter). ZeRO-3's runs take long-context chunks, whose loss and gradients equal the whole
    sequence's (test_long_context.py), so one unchunked run serves all."""
    out = tmp_path_factory.mktemp("one_process_reference")
    summary = one_process(out, *SHARDED_RUN)
    return summary, adapter(out / "adapter")


def check_two_processes(config: Path, tmp_path: Path, reference, *args: str, env: dict | None = None, resume: bool):
    """2 CPU processes under `config`: the adapter and eval loss of one process with the same global
    batch; a checkpoint `rwkv-ft merge` reads; with `resume`, a run killed after its checkpoint
    resumes to exactly the adapter of the run that was not killed."""
    from rwkv_ft.merge import merge_adapter
    from rwkv_ft.train import complete_checkpoints

    single, one = reference
    straight = launch(config, tmp_path / "two", *SHARDED_RUN, *args, env=env)
    assert straight.returncode == 0, straight.stderr[-12000:]
    two = adapter(tmp_path / "two" / "adapter")
    assert one.keys() == two.keys()
    for key in one:
        assert_close(two[key], one[key], rel=1e-4, name=key)
    summary = json.loads((tmp_path / "two" / "training_summary.json").read_text())
    assert summary["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-4)
    merged = merge_adapter(tmp_path / "two" / "base", tmp_path / "two" / "checkpoint-2", tmp_path / "merged")
    assert (merged.out / "model.safetensors").exists()
    if not resume:
        return
    killed = launch(config, tmp_path / "killed", *SHARDED_RUN, *args, fault="kill:1:3", env=env)
    assert killed.returncode != 0
    assert [p.name for p in complete_checkpoints(tmp_path / "killed")] == ["checkpoint-2"]
    resumed = launch(config, tmp_path / "killed", *SHARDED_RUN, *args, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = adapter(tmp_path / "killed" / "adapter")
    for key in two:
        assert torch.equal(final[key], two[key]), key


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason=NO_DEEPSPEED)
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_one_process(tmp_path, stage, one_process_reference):
    """ZeRO-2 (the shipped config) and ZeRO-3 (every parameter partitioned; long-context chunks of 8
    tokens, whose count differs between the ranks' batches: unpadded, the ranks' parameter fetches
    mismatch and the run aborts, checked at 8 and at 4 tokens) on 2 CPU processes: the adapter of one
    process with the same global batch, and a checkpoint `rwkv-ft merge` reads. ZeRO-3's run killed
    after its checkpoint resumes exactly (ZeRO-2's resume is the same code: the Trainer loads
    DeepSpeed's engine checkpoint, of a stage that partitions less)."""
    args = []
    config = CONFIGS / "deepspeed_zero2.yaml"
    if stage == 3:
        config = zero3_partitioning_everything(tmp_path)
        args.append("training.chunk_len=8")  # 4 tokens checks the same, in 1.6x the time
    check_two_processes(config, tmp_path, one_process_reference, *args, resume=stage == 3)
    assert (tmp_path / "two" / "checkpoint-2" / "global_step2").is_dir(), "DeepSpeed's engine checkpoint"


@pytest.mark.slow
@NEEDS_FSDP2
def test_fsdp2_through_accelerate_matches_one_process(tmp_path, one_process_reference):
    """recipes/accelerate/fsdp.yaml through accelerate and the Trainer (FSDP2 over gloo: the worker
    undoes accelerate's CPU fallback): the adapter of one process with the same global batch; the
    checkpoint holds accelerate's sharded model and optimizer state, and a run killed after it
    resumes exactly (optimizer state through torch.distributed.checkpoint, the adapter into the
    shards)."""
    config = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())
    config["use_cpu"] = True
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(config))
    check_two_processes(
        tmp_path / "fsdp.yaml", tmp_path, one_process_reference, env={"RWKV_FT_TEST_FSDP_ON_CPU": "1"}, resume=True
    )
    checkpoint = tmp_path / "two" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir(), "FSDP2's shards"


def zero3_partitioning_everything(tmp_path: Path) -> Path:
    """deepspeed_zero3.yaml with a DeepSpeed config that partitions every parameter, however small
    (by default a tiny model's parameters would all stay whole on every rank)."""
    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 0,
            "stage3_max_reuse_distance": 0,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
    }
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    config = yaml.safe_load((CONFIGS / "deepspeed_zero3.yaml").read_text())
    config.pop("mixed_precision")  # accelerate refuses it beside a DeepSpeed config file
    config["deepspeed_config"] = {"deepspeed_config_file": str(tmp_path / "zero3.json"), "zero3_init_flag": False}
    (tmp_path / "zero3.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "zero3.yaml"


@pytest.mark.slow
def test_a_nonfinite_chunk_on_one_rank_stops_every_rank_naming_it(tmp_path):
    """A NaN in one long-context chunk of one rank's batch: every rank stops at that step, before the
    optimizer step (no rank left waiting in a collective); the main process names the rank, the chunk
    and the step, sets aside the checkpoint whose weights produced it and names the last good one."""
    from rwkv_ft.train import REJECTED_DIR, complete_checkpoints

    args = ["training.max_steps=5", "training.save_steps=1", "training.chunk_len=8"]
    proc = launch(CONFIGS / "cpu_ddp.yaml", tmp_path, *args, fault="nan:1:3:1")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line and "not finite" in line]
    assert len(errors) == 1, proc.stderr[-3000:]  # the main process reports it; rank 1 agreed silently
    assert "not finite on rank 1 in chunk 1 (tokens 8..15 of " in errors[0] and " at step 3 " in errors[0]
    assert "checkpoint-2 holds the weights that produced it" in errors[0]
    assert f"last good checkpoint is {tmp_path / 'checkpoint-1'}" in errors[0]
    assert proc.stderr.count("Traceback (most recent call last)") == 1, "the launcher's own; none from a worker"
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert (tmp_path / REJECTED_DIR / "checkpoint-2").is_dir()


@pytest.mark.slow
def test_an_error_on_one_rank_ends_the_run_with_its_message(tmp_path):
    """A bad batch on rank 1 only: the run ends (no hang), rank 1's message says what and where,
    and the other rank stops without a traceback."""
    proc = launch(CONFIGS / "cpu_ddp.yaml", tmp_path, "training.max_steps=5", fault="error:1:2", timeout=240)
    assert proc.returncode != 0
    assert proc.stderr.count("error (rank 1): injected: a bad batch on rank 1 at step 2") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("Traceback (most recent call last)") == 1, "the launcher's own; none from a worker"


def test_long_context_chunks_under_cuda_graphs_are_refused_on_several_processes(tmp_path):
    """Under CUDA graphs each chunk's backward is a nested autograd pass that accumulates every
    gradient once per chunk, which DDP's hooks do not expect: the run stops at once, naming why."""
    proc = launch(
        CONFIGS / "cpu_ddp.yaml", tmp_path, "training.max_steps=1", "training.chunk_len=16",
        "training.compile=reduce-overhead",
    )  # fmt: skip
    assert proc.returncode != 0
    assert "training.compile: reduce-overhead runs on one process only" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("Traceback (most recent call last)") == 1, "the launcher's own; none from a worker"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason=NO_DEEPSPEED)
def test_compiled_blocks_and_triton_kernels_train_under_zero2(tmp_path):
    """The GPU recipes' path (compiled blocks, selective recompute, the Triton WKV kernel: here under
    the interpreter) under ZeRO-2 on 2 processes: step by step the losses of one eager process."""
    from rwkv_ft.train import complete_checkpoints

    args = ["training.max_steps=3", "data.max_length=32"]
    one_process(tmp_path / "eager", *args)
    fast = ["training.compile=true", "training.gradient_checkpointing=selective", "model.wkv_backend=triton"]
    proc = launch(CONFIGS / "deepspeed_zero2.yaml", tmp_path / "compiled", *args, *fast, env={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(directory: Path) -> torch.Tensor:
        history = json.loads((complete_checkpoints(directory)[-1] / "trainer_state.json").read_text())["log_history"]
        return torch.tensor([entry["loss"] for entry in history if "loss" in entry])

    assert len(losses(tmp_path / "compiled")) == 3
    assert_close(losses(tmp_path / "compiled"), losses(tmp_path / "eager"), rel=1e-4, name="losses")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason=NO_DEEPSPEED)
def test_zero3_refuses_compiled_blocks_by_name(tmp_path):
    """training.compile under ZeRO-3 (whose parameter gathering cannot be compiled) stops at once,
    naming the key and what to use instead."""
    proc = launch(CONFIGS / "deepspeed_zero3.yaml", tmp_path, "training.max_steps=1", "training.compile=true")
    assert proc.returncode != 0
    assert "training.compile does not work under DeepSpeed ZeRO-3" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("Traceback (most recent call last)") == 1, "the launcher's own; none from a worker"
