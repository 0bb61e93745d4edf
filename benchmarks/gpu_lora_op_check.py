"""On a CUDA machine: the adapted Linear's op (`rwkv_ft.adapters.fast_lora.linear_plus_low_rank`)
against the composed form it replaced, `addmm(xa @ b.T, x, W.T)`: bit for bit alone (bf16, outputs
and gradients, three shapes), then inside a small bf16 LoRA model on the Triton WKV kernels, eager
and compiled with CUDA graphs (losses and LoRA gradients over three steps; the WKV-4 kernel's
look-back makes eager runs differ by ~1e-3 from run to run). Exits 1 on a failure.

    source .whl/prelude.sh && python -u benchmarks/gpu_lora_op_check.py
"""

from __future__ import annotations

import sys

import torch
from peft import LoraConfig, get_peft_model

import rwkv_ft
from rwkv_ft.adapters import fast_lora
from rwkv_ft.testing import randomize_, relative_error

SHAPES = ((4096, 2048, 8192, 16), (1000, 4096, 4096, 16), (37, 64, 96, 4))  # rows, in, out, rank
MODEL_TOLERANCE = 2e-2  # bf16 gradients, compiled against eager (compile's roundings differ)


def composed(x, weight, xa, b):
    """The form the op replaced (also `bench_step.py --composed-lora`)."""
    return torch.addmm(torch.mm(xa, b.t()), x, weight.t())


def op_alone() -> bool:
    ok = True
    for rows, n_in, n_out, rank in SHAPES:
        bf16 = {"device": "cuda", "dtype": torch.bfloat16}
        x = torch.randn(rows, n_in, **bf16, requires_grad=True)
        weight = torch.randn(n_out, n_in, **bf16) / n_in**0.5
        xa = torch.randn(rows, rank, **bf16, requires_grad=True)
        b = torch.randn(n_out, rank, **bf16, requires_grad=True)
        grad = torch.randn(rows, n_out, **bf16)
        results = []
        for fn in (fast_lora.linear_plus_low_rank, composed):
            out = fn(x, weight, xa, b)
            out.backward(grad)
            results.append([out.detach(), x.grad, xa.grad, b.grad])
            x.grad = xa.grad = b.grad = None
        same = [torch.equal(a, e) for a, e in zip(*results, strict=True)]
        print(f"op alone {rows}x{n_in}->{n_out} r{rank}: bit for bit (out, dx, dxa, db) {same}", flush=True)
        ok &= all(same)
    return ok


def lora_model(graphs: bool):
    torch.manual_seed(1)
    config = rwkv_ft.Rwkv4Config(vocab_size=1000, hidden_size=256, num_hidden_layers=4, wkv_backend="triton")
    model = rwkv_ft.Rwkv4ForCausalLM(config)
    randomize_(model)
    model = get_peft_model(model.to("cuda", torch.bfloat16), LoraConfig(r=8, lora_alpha=16, init_lora_weights=False))
    fast_lora.enable_fast_lora(model)
    model.set_activation_recompute("selective")
    if graphs:
        model.compile_blocks(mode="reduce-overhead")
    return model.train()


def in_model() -> bool:
    real = fast_lora.linear_plus_low_rank
    batches = [torch.randint(0, 1000, (2, 256), device="cuda") for _ in range(3)]
    runs = {}
    for name, graphs, fn in (
        ("composed eager", False, composed),
        ("op eager", False, real),
        ("composed graphs", True, composed),
        ("op graphs", True, real),
    ):
        fast_lora.linear_plus_low_rank = fn
        model = lora_model(graphs)
        runs[name] = []
        for ids in batches:
            torch.compiler.cudagraph_mark_step_begin()
            loss = model(ids, labels=ids).loss
            loss.backward()
            grads = [p.grad.flatten().float() for _, p in sorted(model.named_parameters()) if p.requires_grad]
            runs[name].append((float(loss.detach()), torch.cat(grads)))
            model.zero_grad(set_to_none=True)
    fast_lora.linear_plus_low_rank = real
    ok = True
    for name, base in (
        ("op eager", "composed eager"),
        ("op graphs", "composed graphs"),
        ("composed graphs", "composed eager"),
    ):
        for step, ((loss, grads), (base_loss, base_grads)) in enumerate(zip(runs[name], runs[base], strict=True)):
            error = relative_error(grads, base_grads)
            print(f"{name} vs {base}, step {step}: loss {loss:.6f} / {base_loss:.6f}, LoRA gradients {error:.2e}")
            ok &= error < MODEL_TOLERANCE and abs(loss - base_loss) < MODEL_TOLERANCE
    return ok


def main() -> None:
    ok = op_alone() & in_model()
    print("OK" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
