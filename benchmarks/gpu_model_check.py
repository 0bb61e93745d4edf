"""On a CUDA machine: the model with the Triton WKV kernel against the same model on the PyTorch
reference, for logits, every parameter gradient and the carried state, plus left-padded batched
generation against each row alone. Exits 1 on a mismatch.

    python benchmarks/gpu_model_check.py
"""

from __future__ import annotations

import sys

import torch

import rwkv_ft
from rwkv_ft.testing import TOLERANCES, randomize_, relative_error


def model_with(backend: str, dtype: torch.dtype, config) -> rwkv_ft.Rwkv4ForCausalLM:
    model = randomize_(rwkv_ft.Rwkv4ForCausalLM(config), seed=0).to("cuda", dtype)
    for block in model.rwkv.blocks:
        block.att.wkv_backend = backend
        block.att.time_decay.data = block.att.time_decay.data.float()
        block.att.time_first.data = block.att.time_first.data.float()
    return model


def check(dtype: torch.dtype) -> list[str]:
    config = rwkv_ft.Rwkv4Config(vocab_size=1000, hidden_size=320, num_hidden_layers=3, wkv_backend="torch")
    ids = torch.randint(1, 1000, (3, 257), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results, bound = {}, TOLERANCES[dtype][0] * 3
    for backend in ("torch", "triton"):
        model = model_with(backend, dtype, config)
        out = model(ids, labels=ids, use_cache=True)
        out.loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters()}
        results[backend] = (out.logits.float(), out.state, grads)
    failures = []
    (ref_logits, ref_state, ref_grads), (logits, state, grads) = results["torch"], results["triton"]
    for name, a, b in [("logits", logits, ref_logits), ("state", state, ref_state)] + [
        (f"grad {n}", grads[n], ref_grads[n]) for n in ref_grads
    ]:
        err = relative_error(a, b)
        if not err <= bound:
            failures.append(f"{dtype} {name}: relative error {err:.2e} > {bound:.1e}")
    print(f"{dtype}: logits {relative_error(logits, ref_logits):.2e}, state {relative_error(state, ref_state):.2e}")
    return failures


def check_left_padding() -> list[str]:
    """A left-padded batch gives each row the logits (and greedy tokens) it gets alone.

    Token equality of greedy generation is reported but not required: cuBLAS may pick other GEMM
    kernels for batch 3 and batch 1, and a near-tie between the top two logits of a random model can
    then flip. The logits must agree within fp32 tolerance.
    """
    config = rwkv_ft.Rwkv4Config(vocab_size=1000, hidden_size=256, num_hidden_layers=2, wkv_backend="triton")
    model = model_with("triton", torch.float32, config).eval()
    prompts = [torch.randint(1, 1000, (n,), device="cuda") for n in (5, 40, 17)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([p.new_zeros(width - len(p)), p]) for p in prompts])
    mask = torch.stack([torch.cat([p.new_zeros(width - len(p)), torch.ones_like(p)]) for p in prompts])
    failures, same_tokens = [], 0
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        full_mask = torch.cat([mask, torch.ones_like(batched[:, width:])], dim=1)
        batched_logits = model(batched, attention_mask=full_mask).logits
        for row, prompt in enumerate(prompts):
            tokens = torch.cat([prompt, batched[row, width:]])[None]
            alone_logits = model(tokens).logits[0]
            err = relative_error(batched_logits[row, width - len(prompt) :], alone_logits)
            if not err <= 1e-5:
                failures.append(f"left padding: row {row} logits differ from the row alone by {err:.2e}")
            alone = model.generate(
                prompt[None],
                attention_mask=torch.ones_like(tokens[:, : len(prompt)]),
                max_new_tokens=12,
                do_sample=False,
            )
            same_tokens += int(torch.equal(batched[row, width:], alone[0, len(prompt) :]))
    print(f"left padding: logits match; greedy tokens identical for {same_tokens} of {len(prompts)} rows")
    return failures


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA device"
    failures = check(torch.float32) + check(torch.bfloat16) + check_left_padding()
    print("\n".join(failures) if failures else "gpu_model_check: all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
