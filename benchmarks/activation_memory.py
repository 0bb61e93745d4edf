"""Activation memory of a LoRA training step by category, per variant, at the published shapes,
computed on a CPU: the model runs on meta tensors (the WKV kernels' custom ops answer with their
fake implementations), and every tensor storage created during the step is tracked from its
creation (which op made it) to its release.

    python benchmarks/activation_memory.py [--shapes rwkv4-1.6b,rwkv7-1.5b,rwkv4-7.6b] [--variants ...]

For each (shape, variant): the bytes still alive when the forward returns (what the backward will
read: the activation memory), by the op that produced them, and the peak of everything alive
during forward + backward (activations + temporaries + gradients; weights and optimizer state
excluded; add them for a device's peak). Compiled variants run AOTAutograd with inductor's
partitioner (`aot_eager_decomp_partition`: the same saved set as inductor, without generating
code). Per-layer figures are the whole model's divided by the layer count. Prints a table per
shape; --out DIR writes activation_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import weakref
from collections import defaultdict

import torch
from bench_step import SHAPES, VARIANTS, bare_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 2**30
MIN_INNER = 128  # as rwkv_ft.models.modeling_utils.SELECTIVE_MIN_INNER_DIM


def category(func, args) -> str:
    aten = torch.ops.aten
    name = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
    if "wkv" in name.lower():
        return "WKV kernel (outputs, saved for its backward)"
    if func == torch.ops.rwkv_ft.linear_plus_low_rank.default:  # an adapted Linear: x @ W.T + LoRA term
        return "matmul (large)"
    if func in (aten.mm.default, aten.addmm.default, aten.bmm.default):
        mat1 = args[0] if func != aten.addmm.default else args[1]
        return "matmul (large)" if mat1.shape[-1] >= MIN_INNER else "matmul (low-rank: LoRA outputs, RWKV-7 maps)"
    if func in (aten._to_copy.default, aten.to.dtype, aten.copy_.default, aten.clone.default):
        return "dtype copies"
    if "norm" in name:
        return "layer/group norm"
    if name in ("embedding",):
        return "embedding"
    if name in ("cat", "stack"):
        return "cat/stack (states)"
    return "elementwise / other"


class LiveStorages(TorchDispatchMode):
    """Tracks every storage created under it: bytes alive now, their producers, and the peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, str]] = {}
        self.current = self.peak = 0
        self.skip = lambda: False  # a predicate: ignore what is made while it holds

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_args = tree_flatten((args, kwargs))[0]
        if self.skip():
            return out
        known = {a.untyped_storage()._cdata for a in flat_args if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.live or key in known:
                continue
            self.live[key] = (storage.nbytes(), category(func, args))
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)
        return out

    def _release(self, key: int) -> None:
        size, _ = self.live.pop(key, (0, None))
        self.current -= size

    def by_category(self) -> dict[str, int]:
        totals = defaultdict(int)
        for size, cat in self.live.values():
            totals[cat] += size
        return dict(totals)


class SavedByGraphs:
    """A torch.compile backend: inductor's decompositions and partitioner, graphs run as they are,
    and each call of a compiled forward adds what its partition saves for the backward."""

    def __init__(self, rows: int, batch: int):
        self.rows, self.batch = rows, batch  # activations lead with B or B*T; weights do not
        self.alive = defaultdict(int)

    def partition(self, joint, inputs, **kwargs):
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        fw, bw = min_cut_rematerialization_partition(joint, inputs, compiler="inductor", **kwargs)
        producers = {n.name: n for n in fw.graph.nodes}
        saved = defaultdict(int)
        for node in bw.graph.nodes:
            val = node.meta.get("val")
            if node.op != "placeholder" or node.name.startswith("tangents") or not isinstance(val, torch.Tensor):
                continue
            if val.dim() == 0 or val.shape[0] not in (self.batch, self.rows):
                continue  # a weight the backward reads
            source = producers.get(node.name)
            if source is None or source.op == "placeholder":
                cat = "block inputs"
            else:
                cat = category(source.target, [a.meta.get("val") for a in source.args if hasattr(a, "meta")])
            saved[cat] += val.numel() * val.element_size()
        self.pending = dict(saved)  # for the forward compiler, called next
        return fw, bw

    def forward_compiler(self, gm, _example_inputs):
        saved = self.pending

        def counted(args):
            for cat, size in saved.items():
                self.alive[cat] += size
            return gm(*args)

        counted._boxed_call = True
        return counted

    def backend(self):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd
        from torch._inductor.compile_fx import select_decomp_table

        nop = lambda gm, _: make_boxed_func(gm.forward)  # noqa: E731
        return aot_autograd(
            fw_compiler=self.forward_compiler,
            bw_compiler=nop,
            decompositions=select_decomp_table(),
            partition_fn=self.partition,
        )


def measure(shape: str, variant: str, batch: int | None, ctx: int) -> dict:
    torch._dynamo.reset()  # the WKV kernels' custom ops answer meta tensors with their fake implementations
    batch = batch or SHAPES[shape][4]
    compiled = VARIANTS[variant][1]
    recorder = SavedByGraphs(batch * ctx, batch)
    model = bare_model(shape, variant, "meta", {"backend": recorder.backend()})
    ids = torch.randint(1, 1000, (batch, ctx)).to("meta")
    layers = SHAPES[shape][1]
    if compiled:
        # dynamo does not run under a Python dispatch mode: the blocks' saved tensors come from the
        # partitions, what runs outside the blocks (embedding, head, loss) from the eager model.
        model(ids, labels=ids).loss.backward()
        recorder.alive.clear()
        model(ids, labels=ids)
        blocks = dict(recorder.alive)
        eager = measure(shape, "eager", batch, ctx)
        outside = eager["outside_blocks_gib"] * GIB
        by_cat = {**blocks, "outside the blocks (embedding, head, loss)": outside}
        total, peak = sum(blocks.values()) + outside, None
    else:
        tracker = LiveStorages()
        with tracker:
            loss = model(ids, labels=ids).loss
            by_cat, total = tracker.by_category(), tracker.current
            loss.backward()
        peak = tracker.peak / GIB
    result = {
        "shape": shape,
        "variant": variant,
        "batch": batch,
        "ctx": ctx,
        "saved_gib": total / GIB,
        "saved_per_layer_mib": total / layers / 2**20,
        "peak_fwd_bwd_gib": peak,
        "by_category_gib": {k: v / GIB for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / GIB,
        "trainable_fp32_gib": sum(p.numel() * 4 for p in model.parameters() if p.requires_grad) / GIB,
    }
    if not compiled:
        result["outside_blocks_gib"] = outside_blocks(model, ids) / GIB
    return result


def outside_blocks(model, ids) -> int:
    """Bytes alive after the forward that were made outside the blocks (embedding output, ln_out, the
    head's saved inputs and the loss), measured with the blocks' own storages excluded."""
    from rwkv_ft.models.modeling_utils import rwkv_blocks

    tracker = LiveStorages()
    depth = [0]
    hooks = []
    for block in rwkv_blocks(model):
        hooks.append(block.register_forward_pre_hook(lambda *a: depth.__setitem__(0, depth[0] + 1)))
        hooks.append(block.register_forward_hook(lambda *a: depth.__setitem__(0, depth[0] - 1)))
    tracker.skip = lambda: depth[0] > 0
    with tracker:
        model(ids, labels=ids)
        total = tracker.current
    for h in hooks:
        h.remove()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="rwkv4-1.6b,rwkv7-1.5b,rwkv4-7.6b")
    ap.add_argument("--variants", default="baseline,eager,eager_selective,compile,compile_selective,compile_ckpt")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        print(f"\n### {shape}, batch {SHAPES[shape][4]}, ctx {args.ctx}")
        print("| variant | alive after forward GiB | per layer MiB | peak fwd+bwd GiB (eager) | by producer (GiB) |")
        print("|---|---|---|---|---|")
        for variant in args.variants.split(","):
            r = measure(shape, variant, None, args.ctx)
            rows.append(r)
            cats = ", ".join(f"{k} {v:.2f}" for k, v in r["by_category_gib"].items() if v >= 0.005)
            peak = f"{r['peak_fwd_bwd_gib']:.2f}" if r["peak_fwd_bwd_gib"] is not None else "-"
            print(f"| {variant} | {r['saved_gib']:.2f} | {r['saved_per_layer_mib']:.0f} | {peak} | {cats} |",
                  flush=True)  # fmt: skip
        print(f"weights {r['weights_gib']:.2f} GiB; trainable {r['trainable_fp32_gib']:.3f} GiB fp32 "
              "(+ grads, + 2x AdamW state)")  # fmt: skip
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "activation_memory.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
