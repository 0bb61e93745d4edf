"""What each process of the multi-process tests runs (tests/test_distributed.py launches it).

`train RECIPE [overrides] [--resume]`: rwkv_ft.train's command line, with a fault injected on one
rank when RWKV_FT_TEST_FAULT says so, and accelerate's FSDP enabled on the CPU when
RWKV_FT_TEST_FSDP_ON_CPU is set (see `enable_fsdp_on_cpu`):
    "error:RANK:STEP"       a ValueError in the forward of training step STEP on rank RANK
    "kill:RANK:STEP"        rank RANK killed (SIGKILL) at the start of training step STEP
    "nan:RANK:STEP:CHUNK"   a NaN loss in chunk CHUNK of step STEP on rank RANK (training.chunk_len)

`fsdp2 OUT_DIR`: a LoRA + state-tuning model of each RWKV version sharded with FSDP2 the way
accelerate shards it (torch's fully_shard: each block a unit, then the root) over gloo; trains one
step (RWKV-7: compiled blocks over the Triton kernel, under the interpreter: TRITON_INTERPRET=1)
with the loss of the unsharded eager model, then checks that rwkv_ft.train gathers its trained
parameters whole (and saves them as a normal adapter, in OUT_DIR/<version>/sharded, beside the
unsharded model's in .../whole), copies whole tensors back into the shards, and finds a
non-finite value in one rank's shard.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def inject_fault(spec: str) -> None:
    from rwkv_ft.models.modeling_utils import RwkvForCausalLMBase

    kind, fault_rank, step, *chunk = spec.split(":")
    if rank() != int(fault_rank):
        return
    steps = {"forward": 0, "chunk": 0}
    forward, head_loss_sum = RwkvForCausalLMBase.forward, RwkvForCausalLMBase._head_loss_sum

    def counting_forward(self, *args, **kwargs):
        if self.training:
            steps["forward"] += 1
            steps["chunk"] = 0
            if kind == "error" and steps["forward"] == int(step):
                raise ValueError(f"injected: a bad batch on rank {rank()} at step {step}")
            if kind == "kill" and steps["forward"] == int(step):
                os.kill(os.getpid(), signal.SIGKILL)
        return forward(self, *args, **kwargs)

    def poisoned_head_loss_sum(self, hidden, targets):
        loss = head_loss_sum(self, hidden, targets)
        if torch.is_grad_enabled() and steps["forward"] == int(step):
            steps["chunk"] += 1
            if steps["chunk"] == int(chunk[0]) + 1:
                return loss * float("nan")
        return loss

    RwkvForCausalLMBase.forward = counting_forward
    RwkvForCausalLMBase._head_loss_sum = poisoned_head_loss_sum


def enable_fsdp_on_cpu() -> None:
    """accelerate turns an FSDP config into FSDP only on accelerators: with `use_cpu` it runs plain
    multi-CPU data parallel. Switched back to FSDP (gloo), the Trainer takes accelerate's FSDP2 path
    on the CPU: its sharding, its sharded checkpoint saving and loading, as on GPUs."""
    from accelerate import state
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    init = state.AcceleratorState.__init__

    def fsdp_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()  # from the env

    state.AcceleratorState.__init__ = fsdp_init


def train(argv: list[str]) -> int:
    if os.environ.get("RWKV_FT_TEST_FSDP_ON_CPU"):
        enable_fsdp_on_cpu()
    if os.environ.get("RWKV_FT_TEST_FAULT"):
        inject_fault(os.environ["RWKV_FT_TEST_FAULT"])
    from rwkv_ft.train import main

    return main(argv, prog="python -m rwkv_ft.train")


def lora_and_state_model(version: str, base_dir: Path):
    """A tiny base (bf16, saved to base_dir by rank 0) with LoRA (fp32, trained head too) and a
    learned initial state, the trainable values random (the same on every rank)."""
    from peft import LoraConfig, get_peft_model

    from rwkv_ft.adapters import add_state_tuning
    from rwkv_ft.convert import save_model_dir
    from rwkv_ft.models.rwkv7 import Rwkv7ForCausalLM
    from rwkv_ft.testing import randomize_, tiny_rwkv4, tiny_rwkv7_config

    torch.manual_seed(0)
    if version == "rwkv4":
        base = tiny_rwkv4()
    else:  # heads of 32: a size the Triton kernel takes
        base = randomize_(Rwkv7ForCausalLM(tiny_rwkv7_config(hidden_size=64, head_size=32)), seed=1)
    base = base.to(torch.bfloat16)
    if rank() == 0:
        save_model_dir(base, base_dir, tokenizer=None, overwrite=True)
    base.name_or_path = base.config._name_or_path = str(base_dir.resolve())
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, modules_to_save=["head"], task_type="CAUSAL_LM"))
    add_state_tuning(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def fsdp2(out_dir: Path) -> int:
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rwkv_ft.adapters import save_adapter
    from rwkv_ft.models.modeling_utils import rwkv_blocks
    from rwkv_ft.testing import assert_close
    from rwkv_ft.train import (
        _nonfinite_tensors,
        consolidated_state_dict,
        fp32_trained_parameters,
        load_trained_tensors,
        set_kernel_backend,
    )

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for version in ("rwkv4", "rwkv7"):
        where = out_dir / version
        model = lora_and_state_model(version, where / "base")
        fp32_trained_parameters(model)  # as rwkv_ft.train does under FSDP2 (the trained head is bf16)
        whole = copy.deepcopy(model)
        if version == "rwkv7":  # the GPU recipes' path: compiled blocks over the Triton kernel
            set_kernel_backend(model, "triton")
            model.compile_blocks()
        for block in rwkv_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert all(type(p).__name__ == "DTensor" for _, p in trained), "FSDP2 shards the trained parameters too"

        # One step on each rank's own batch: FSDP2 gathers bf16 base and fp32 LoRA weights together.
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(rank()))
        loss = model(input_ids=ids, labels=ids).loss
        with torch.no_grad():
            assert_close(loss, whole(input_ids=ids, labels=ids).loss, rel=2e-2, name=f"{version} loss")  # bf16
        loss.backward()
        optimizer = torch.optim.SGD([p for _, p in trained], lr=0.1)
        optimizer.step()
        optimizer.zero_grad()
        state = consolidated_state_dict(model, "fsdp2", trainable_only=True)
        if rank() == 0:
            assert sorted(state) == sorted(n for n, _ in trained)
            for name, p in whole.named_parameters():
                if p.requires_grad:
                    assert state[name].shape == p.shape, name
            save_adapter(model, where / "sharded", state_dict=state)
            with torch.no_grad():  # the unsharded model with the gathered values: saved the plain way
                for name, p in whole.named_parameters():
                    if p.requires_grad:
                        p.copy_(state[name])
            save_adapter(whole, where / "whole")

        # Whole tensors back into the shards (what --resume does), then gathered again.
        shifted = {name: value + 1.0 for name, value in (state or {}).items()}
        names = [n for n, _ in trained]
        if rank() != 0:  # every rank passes the whole tensors (each reads the checkpoint)
            shifted = {name: torch.empty(0) for name in names}
        shared = [shifted]
        dist.broadcast_object_list(shared, src=0)
        load_trained_tensors(model, shared[0], "fsdp2")
        again = consolidated_state_dict(model, "fsdp2", trainable_only=True)
        if rank() == 0:
            for name in names:
                assert_close(again[name], shared[0][name], rel=0, name=name)

        # A NaN in rank 1's shard only: rank 1's local check finds it, rank 0's does not.
        name, victim = trained[0]
        if rank() == 1:
            with torch.no_grad():
                victim.to_local().view(-1)[0] = float("nan")
        found = _nonfinite_tensors(trained)
        assert found == ([name] if rank() == 1 else []), (rank(), found)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from rwkv_ft.testing import patch_the_triton_language_once_per_module_and_launch

    patch_the_triton_language_once_per_module_and_launch()  # test speed: see its docstring
    mode, *rest = sys.argv[1:]
    sys.exit(train(rest) if mode == "train" else fsdp2(Path(rest[0])))
