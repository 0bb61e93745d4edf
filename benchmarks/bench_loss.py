"""The language-model head + cross-entropy on a GPU: ours (the fused row kernel) against the plain
form transformers uses and against our own row-blocked form on eager PyTorch, in one run.

    source .whl/prelude.sh && python -u benchmarks/bench_loss.py [--configs] [--rep-ms 200]
    TRITON_INTERPRET=1 python benchmarks/bench_loss.py --tiny --configs   # CPU, small shapes, in seconds

Implementations, each over `hidden` (N, C) and a head `weight` (V, C) in bf16, labels with every
7th row ignored, loss = mean over scored rows, forward + backward:
  plain          logits = hidden @ weight.T (N x V, bf16), .float(), F.cross_entropy: what
                 transformers' ForCausalLMLoss does over the model's logits
  ours_torch     rwkv_ft.models.loss, backend="torch": 1,024 rows at a time, eager PyTorch rows
  ours           rwkv_ft.models.loss, backend="auto": 1,024 rows at a time, the Triton row kernel
Sections: (1) accuracy against float64 (relative error of the loss and of each gradient, next to
the error of rounding the float64 gradient to bf16), at V = 65,536 and at 50,277 (the head padded);
(2) medians (triton's do_bench) of forward + backward
and the peak memory above the inputs, per shape, with the head frozen (LoRA) and trained;
(3) with --configs, the row kernel alone under each (rows, columns, warps) config.
Writes DIR/bench_loss.json (DIR: --out, default $OUT or '.').
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch

from rwkv_ft.models.loss import linear_cross_entropy_sum

SHAPES = [  # (N rows = batch x ctx, C, V): RWKV-4 1.6B / RWKV-7 1.5B at batch 4, 7.6B at batch 1
    (4096, 2048, 65536),
    (1024, 4096, 65536),
    (4096, 2048, 50277),
]
CONFIGS = [(1, 4096, 8), (2, 4096, 8), (1, 8192, 16), (1, 2048, 4), (4, 2048, 8)]


def make(N, C, V, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(N, C, device=device, generator=g).bfloat16()
    weight = (torch.randn(V, C, device=device, generator=g) * (2 / C**0.5)).bfloat16()  # logits ~ N(0, 4)
    targets = torch.randint(0, V, (N,), device=device, generator=g)
    targets[::7] = -100
    return hidden, weight, targets


def plain_loss(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)


def ours(backend):
    def loss(hidden, weight, targets):
        return linear_cross_entropy_sum(hidden, weight, targets, rows=1024, backend=backend) / (targets != -100).sum()

    return loss


IMPLS = {"plain": plain_loss, "ours_torch": ours("torch"), "ours": ours("auto")}


def step(fn, hidden, weight, targets, head_trained):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_(head_trained)
    loss = fn(h, w, targets)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def accuracy(device, N, C, V) -> dict:
    hidden, weight, targets = make(N, C, V, device)
    exact = step(plain_loss, hidden.double(), weight.double(), targets, True)  # float64 throughout
    out = {"bf16_rounding_floor": {"grad_hidden": rel(exact[1].bfloat16(), exact[1])}}
    out["bf16_rounding_floor"]["grad_weight"] = rel(exact[2].bfloat16(), exact[2])
    for name, fn in IMPLS.items():
        loss, gh, gw = step(fn, hidden, weight, targets, True)
        out[name] = {"loss": rel(loss, exact[0]), "grad_hidden": rel(gh, exact[1]), "grad_weight": rel(gw, exact[2])}
    return out


def timed(fn, device, rep_ms) -> float:
    """Median ms of `fn`: triton's do_bench (CUDA events, as bench_wkv4/7.py) on a GPU; on the CPU
    (--tiny) one call after a warm-up, to exercise the path."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")
    fn()
    t = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - t)


def timings(device, shapes, rep_ms) -> list[dict]:
    rows = []
    for N, C, V in shapes:
        hidden, weight, targets = make(N, C, V, device)
        for head_trained in (False, True):
            for name, fn in IMPLS.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if device == "cuda" else 0
                args = (fn, hidden, weight, targets, head_trained)
                ms = timed(lambda args=args: step(*args), device, rep_ms)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else None
                row = {"N": N, "C": C, "V": V, "head_trained": head_trained, "impl": name, "ms": ms, "peak_gib": peak}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def kernel_configs(device, rep_ms, N=1024, V=65536) -> dict:
    import rwkv_ft.kernels.cross_entropy.triton_cross_entropy as tce

    g = torch.Generator(device=device).manual_seed(1)
    logits = torch.randn(N, V, device=device, generator=g).bfloat16()
    targets = torch.randint(0, V, (N,), device=device, generator=g)
    rule, out = tce._config, {}
    try:
        for cfg in CONFIGS:
            tce._config = lambda *_, cfg=cfg: cfg
            for with_grad in (True, False):
                ms = timed(lambda wg=with_grad: tce.cross_entropy_rows_fwd(logits, targets, wg, V), device, rep_ms)
                out[f"{cfg} grad={with_grad}"] = ms
    finally:
        tce._config = rule
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", action="store_true", help="also time the row kernel under each config")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench's time per measurement")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    shapes, acc_shapes = SHAPES, [(2048, 2048, 65536), (2048, 2048, 50277)]
    if args.tiny:
        shapes, acc_shapes = [(64, 32, 300)], [(64, 32, 300)]
    results = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        pass
    path = os.path.join(args.out, "bench_loss.json")

    def dump():
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    results["accuracy"] = {f"N{N} C{C} V{V}": accuracy(device, N, C, V) for N, C, V in acc_shapes}
    print(json.dumps(results["accuracy"], indent=1), flush=True)
    dump()
    results["timings"] = timings(device, shapes, args.rep_ms)
    dump()
    if args.configs:
        results["kernel_configs_ms"] = kernel_configs(device, args.rep_ms, *((64, 300) if args.tiny else ()))
        print(json.dumps(results["kernel_configs_ms"], indent=1), flush=True)
        dump()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
