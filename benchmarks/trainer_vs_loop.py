"""What the HF Trainer path (rwkv_ft.train.run) runs per step that the bare loop of bench_step.py does
not, counted on a CPU: aten calls by kind for one training step of the same bf16 LoRA model; with
`--host-time`, the host time per step of the Trainer's bookkeeping calls and of Python's garbage
collector instead (the stock row: the Trainer's own calls and no frozen objects).

    python benchmarks/trainer_vs_loop.py
    python benchmarks/trainer_vs_loop.py --host-time

Counted with a dispatch mode (what reaches aten below autograd; the Trainer's step from
on_step_begin to on_step_end, so the data loading before it is not in it). Rows: the bare loop
(no autocast, bf16 LoRA compute); the Trainer as it was before issue 11 (bf16 autocast over bf16
weights, peft's fp32 LoRA compute, the shipped recipe's LoRA dropout 0.05); the Trainer now (no
autocast over bf16 weights, bf16 LoRA compute) with dropout 0.05 and with 0. Host syncs are the
calls that read a device value on the host (`_local_scalar_dense`, `is_nonzero`): each one drains
the GPU queue. Counts do not depend on the model's width, so a small one is used; the WKV kernel
runs under the Triton interpreter so that, as on a GPU, it is one op per direction.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the WKV kernel as on a GPU: one opaque op per direction

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import rwkv_ft.train as train  # noqa: E402
from rwkv_ft.adapters.fast_lora import enable_fast_lora  # noqa: E402
from rwkv_ft.recipe import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KINDS = {
    "host syncs": ("_local_scalar_dense", "is_nonzero"),
    "dtype casts": ("_to_copy",),
    "dropout": ("native_dropout", "bernoulli_", "bernoulli"),
    "grad clipping": ("_foreach_norm", "linalg_vector_norm", "_foreach_mul_", "clamp"),
    "matmuls": ("mm", "addmm", "bmm", "linear_plus_low_rank"),
    "fp32 outputs of half inputs": (),
}
CONFIG = "{vocab_size: 65536, hidden_size: 128, num_hidden_layers: 2}"


class CountOps(TorchDispatchMode):
    """aten calls below autograd, by name; and how many turn half-precision inputs into fp32 outputs
    (autocast's upcasts, peft's fp32 LoRA)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        half = (torch.bfloat16, torch.float16)
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if any(a.dtype in half for a in ins) and any(o.dtype == torch.float32 and o.numel() > 4096 for o in outs):
            self.ops["fp32 outputs of half inputs"] += 1
        return out


def summarize(ops: Counter) -> dict[str, int]:
    row = {kind: sum(ops[name] for name in names) for kind, names in KINDS.items()}
    row["fp32 outputs of half inputs"] = ops["fp32 outputs of half inputs"]
    row["all aten calls"] = sum(v for k, v in ops.items() if k != "fp32 outputs of half inputs")
    return row


class ProfileStep(TrainerCallback):
    """Profiles the Trainer's step `step` (training_step, clipping, optimizer, bookkeeping)."""

    def __init__(self, step: int):
        self.step, self.prof, self.ops = step, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.prof = CountOps()
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and self.ops is None:
            self.prof.__exit__(None, None, None)
            self.ops = self.prof.ops


def trainer_step(work: Path, name: str, *overrides: str, autocast_over_bf16: bool = False) -> Counter:
    recipe = load_recipe(
        ROOT / "recipes" / "rwkv4_alpaca_lora.yaml",
        [
            "model.path=null", "model.model_type=rwkv4", f"model.config={CONFIG}", "tokenizer=world",
            "data.path=data/alpaca_sample.jsonl", "data.max_length=64", "data.eval_fraction=null",
            f"training.output_dir={work / name}", "training.max_steps=3", "training.grad_accum=1",
            "training.save_steps=100000", "training.logging_steps=1", "merge.enabled=false",
            "generate.prompt=null", "training.gradient_checkpointing=false", "model.wkv_backend=triton",
            *overrides,
        ],
    )  # fmt: skip
    saved = train.needs_autocast
    if autocast_over_bf16:
        train.needs_autocast = lambda recipe: True  # what training.precision=bf16 did before issue 11
    try:
        probe = ProfileStep(2)
        train.run(recipe, callbacks=[probe])
    finally:
        train.needs_autocast = saved
    return probe.ops


def bare_loop_step() -> Counter:
    from rwkv_ft.models.rwkv4 import Rwkv4Config, Rwkv4ForCausalLM

    config = Rwkv4Config(vocab_size=65536, hidden_size=128, num_hidden_layers=2, wkv_backend="triton")
    model = Rwkv4ForCausalLM(config).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0))
    enable_fast_lora(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(1, 65536, (4, 64))

    def step():
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with CountOps() as counter:
        step()
    return counter.ops


# --host-time: the Trainer's bookkeeping between and around forward and backward, by what it calls.
# The model has the layer count of the 1.6B and 1.5B shapes (the walks visit every module) and a small
# width (the host time of these calls does not depend on it).
HOST_CONFIG = "{vocab_size: 65536, hidden_size: 64, num_hidden_layers: 24}"
BOOKKEEPING = {
    "FLOP count": ("floating_point_ops",),
    "model.train()": ("train",),
    "model.zero_grad()": ("zero_grad",),
    "gradient clipping": ("_clip_grad_norm", "clip_grad_norm_"),
}


def stock_bookkeeping(make_trainer_class):
    """RwkvTrainer with the Trainer's own FLOP count, mode switch, zeroing and clipping (before issue 11's
    host-time work)."""
    from transformers import Trainer

    cls = make_trainer_class()
    cls.floating_point_ops = Trainer.floating_point_ops
    if hasattr(Trainer, "_clip_grad_norm"):
        cls._clip_grad_norm = Trainer._clip_grad_norm
    cls._walk_trained_parameters_only = lambda self, model: None
    return cls


def host_time(work: Path, name: str, stock: bool, steps: int = 30) -> dict[str, float]:
    """ms per step spent in each BOOKKEEPING call (cumulative, cProfile) over `steps` steps."""
    import cProfile
    import pstats

    from transformers import Trainer

    recipe = load_recipe(
        ROOT / "recipes" / "rwkv4_alpaca_lora.yaml",
        [
            "model.path=null", "model.model_type=rwkv4", f"model.config={HOST_CONFIG}", "tokenizer=world",
            "data.path=data/alpaca_sample.jsonl", "data.max_length=32", "data.eval_fraction=null",
            f"training.output_dir={work / name}", f"training.max_steps={steps}", "training.grad_accum=1",
            "training.save_steps=100000", f"training.logging_steps={steps}", "merge.enabled=false",
            "generate.prompt=null", "training.gradient_checkpointing=false", "training.compile=false",
            "model.wkv_backend=torch", "model.dtype=bf16", "adapter.dropout=0.0",
        ],
    )  # fmt: skip
    profile = cProfile.Profile()
    loop, made, frozen = Trainer._inner_training_loop, train._make_trainer_class, train.objects_frozen_for_gc
    collecting = GcTime()

    def profiled_loop(self, *args, **kwargs):
        profile.enable()
        collecting.on = True
        try:
            return loop(self, *args, **kwargs)
        finally:
            collecting.on = False
            profile.disable()

    Trainer._inner_training_loop = profiled_loop
    train._make_trainer_class = functools.partial(stock_bookkeeping, made) if stock else made
    if stock:  # the garbage collector walking every object, as before
        train.objects_frozen_for_gc = contextlib.nullcontext
    gc.callbacks.append(collecting)
    try:
        train.run(recipe)
    finally:
        Trainer._inner_training_loop, train._make_trainer_class, train.objects_frozen_for_gc = loop, made, frozen
        gc.callbacks.remove(collecting)
    stats = pstats.Stats(profile).stats  # {(file, line, name): (calls, prim calls, tottime, cumtime, callers)}
    row = {}
    for kind, names in BOOKKEEPING.items():
        # cumulative time of the calls made from elsewhere (a recursive walk's inner calls not counted twice)
        seconds = sum(
            edge[3]
            for (_, _, fn), (*_, callers) in stats.items()
            if fn in names
            for caller, edge in callers.items()
            if caller[2] not in names
        )
        row[kind] = 1000 * seconds / steps
    row["garbage collection"] = 1000 * collecting.seconds / steps
    row["total"] = sum(row.values())
    return row


class GcTime:
    """A gc.callbacks entry: seconds spent in Python's garbage collector while `on`."""

    def __init__(self):
        self.on, self.seconds, self._start = False, 0.0, 0.0

    def __call__(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self.on:
            self.seconds += time.perf_counter() - self._start


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="trainer_vs_loop_"))
    if "--host-time" in sys.argv:
        rows = {"Trainer's own calls": host_time(work, "stock", True), "RwkvTrainer now": host_time(work, "now", False)}
        kinds = list(next(iter(rows.values())))
        print("| host ms per step (24 layers, LoRA r=16) | " + " | ".join(kinds) + " |")
        print("|---|" + "---|" * len(kinds))
        for name, row in rows.items():
            print(f"| {name} | " + " | ".join(f"{row[k]:.1f}" for k in kinds) + " |")
        return 0
    rows = {
        "bare loop (bench_step eager)": bare_loop_step(),
        "Trainer before: autocast, fp32 LoRA, dropout 0.05": trainer_step(
            work, "before", "model.dtype=bf16", "adapter.lora_compute=fp32", autocast_over_bf16=True
        ),
        "Trainer now, dropout 0.05": trainer_step(work, "now", "model.dtype=bf16"),
        "Trainer now, dropout 0": trainer_step(work, "now0", "model.dtype=bf16", "adapter.dropout=0.0"),
    }
    table = {name: summarize(ops) for name, ops in rows.items()}
    kinds = list(next(iter(table.values())))
    print("| per step | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(str(row[k]) for k in kinds) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
