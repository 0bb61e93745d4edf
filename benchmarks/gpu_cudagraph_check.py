"""On a CUDA machine: compiled blocks under CUDA graphs (`compile_blocks(mode="reduce-overhead")`)
with each kind of recompute and with long-context chunks, against the eager model.

Each case trains nothing: it runs a few forward + backward steps (new tokens every step, the
Trainer's `cudagraph_mark_step_begin()` before each) of a small LoRA model on the Triton WKV
kernels and compares every step's loss and LoRA gradients with the eager model's (fp32 weights,
so that only the compiled code's rounding differs). One case reproduces what transformers
releases before 5.23 do, an eager checkpoint around each compiled block, which CUDA graph trees
reject at the recompute ("accessing tensor output of CUDAGraphs that has been overwritten").
Exits 1 if a case other than that one fails. The long-context cases (chunks of 64 of 256 tokens)
run the chunks the way CUDA graphs need them (`rwkv_ft.models.chunk_replay`).

    source .whl/prelude.sh && python -u benchmarks/gpu_cudagraph_check.py [--skip-chunks | --only-chunks]
        [--version=rwkv4|rwkv7]
"""

from __future__ import annotations

import re
import sys
import traceback

import torch
from peft import LoraConfig, get_peft_model

import rwkv_ft
from rwkv_ft.models.modeling_utils import RwkvBlock
from rwkv_ft.testing import randomize_, relative_error
from rwkv_ft.train import set_chunk_len

CONFIGS = {
    "rwkv4": lambda: rwkv_ft.Rwkv4ForCausalLM(
        rwkv_ft.Rwkv4Config(vocab_size=1000, hidden_size=256, num_hidden_layers=4, wkv_backend="triton")
    ),
    "rwkv7": lambda: rwkv_ft.Rwkv7ForCausalLM(
        rwkv_ft.Rwkv7Config(vocab_size=1000, hidden_size=256, num_hidden_layers=4, head_size=64, wkv_backend="triton")
    ),
}
STEPS, BATCH, LENGTH, CHUNK = 3, 2, 256, 64
TOLERANCE = 2e-3  # fp32 weights; inductor's fused reductions and the kernels' fp32 accumulation orders differ


def lora_model(version: str, recompute: str):
    model = randomize_(CONFIGS[version](), seed=0).cuda()
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False))
    model.set_activation_recompute(recompute)
    return model.train()


class EagerCheckpoint(torch.nn.Module):
    """What transformers' GradientCheckpointingLayer did before 5.23: checkpoint the compiled call."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.block, *args, use_reentrant=False)


def eager_checkpoint_around_compiled_blocks(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and all(isinstance(b, RwkvBlock) for b in module):
            for index, block in enumerate(module):
                module[index] = EagerCheckpoint(block)


def run_steps(model, batches, cudagraphs: bool):
    out = []
    for ids in batches:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = {
            re.sub(r"(blocks\.\d+)\.block\.", r"\1.", n): p.grad.detach().float().clone()  # EagerCheckpoint's names
            for n, p in model.named_parameters()
            if p.requires_grad
        }
        out.append((loss.detach().float().clone(), grads))
    torch.cuda.synchronize()
    return out


def compare(got, ref) -> float:
    worst = 0.0
    for (loss, grads), (ref_loss, ref_grads) in zip(got, ref):
        worst = max(worst, relative_error(loss, ref_loss))
        for name in ref_grads:
            worst = max(worst, relative_error(grads[name], ref_grads[name]))
    return worst


def cases(chunks: bool, only_chunks: bool = False, versions=tuple(CONFIGS)):
    for version in versions:
        for recompute in ("none", "selective", "full"):
            if not only_chunks:
                yield version, recompute, None, False
            if chunks:
                yield version, recompute, CHUNK, False
        if not only_chunks:
            yield version, "full", None, True  # the control: expected to fail


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator("cuda").manual_seed(0)
    batches = [torch.randint(1, 1000, (BATCH, LENGTH), device="cuda", generator=g) for _ in range(STEPS)]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    failures, references = [], {}
    only_chunks = "--only-chunks" in sys.argv
    versions = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--version=")] or list(CONFIGS)
    for version, recompute, chunk, control in cases("--skip-chunks" not in sys.argv, only_chunks, versions):
        name = f"{version} recompute={recompute} chunk_len={chunk}" + (
            " eager-checkpoint-around-graphs" if control else ""
        )
        key = (version, chunk)
        if key not in references:
            eager = lora_model(version, "none")
            set_chunk_len(eager, chunk)
            references[key] = run_steps(eager, batches, cudagraphs=False)
        torch._dynamo.reset()
        try:
            model = lora_model(version, recompute if not control else "none")
            set_chunk_len(model, chunk)
            model.compile_blocks(mode="reduce-overhead")
            if control:
                eager_checkpoint_around_compiled_blocks(model)
            err = compare(run_steps(model, batches, cudagraphs=True), references[key])
            ok = err <= TOLERANCE
            print(f"{'ok  ' if ok else 'FAIL'} {name}: worst relative error {err:.2e}", flush=True)
            if not ok and not control:
                failures.append(name)
        except Exception as e:
            print(f"{'expected failure' if control else 'FAIL'} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            if not control:
                traceback.print_exc()
                failures.append(name)
    print("all cases passed" if not failures else f"failed: {failures}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
