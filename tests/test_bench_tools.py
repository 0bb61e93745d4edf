"""The readings of the benchmark scripts that benchmarks/NOTES.md quotes, on synthetic input."""

import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def launch(ts: float, correlation: int) -> dict:
    return {
        "ph": "X",
        "cat": "cuda_runtime",
        "ts": ts,
        "dur": 5,
        "name": "cudaLaunchKernel",
        "args": {"correlation": correlation},
    }


def test_gap_causes_tells_a_late_host_from_a_stream_waiting():
    """A kernel launched after the compute stream went idle is the host's lateness, and what the
    host ran meanwhile is named; one launched before, that starts late, waited on the device."""
    from long_context_host import gap_causes

    events = [
        launch(0, 1),
        launch(10, 2),
        {"ph": "X", "cat": "user_annotation", "ts": 160, "dur": 200, "name": "offload.unpack"},
        launch(400, 3),  # after kernel 2 ended at 150: the host was late
        launch(420, 4),  # before kernel 3 ended: kernel 4 waited on the device
    ]
    compute = [(10, 100, "kernel", "k1", 1), (100, 150, "kernel", "k2", 2), (410, 500, "kernel", "k3", 3)]
    compute.append((700, 800, "kernel", "k4", 4))
    causes = gap_causes(events, compute)
    assert causes["host_late"] == {"n": 1, "ms": 0.3}  # 150 to 410 us
    assert causes["device_wait"] == {"n": 1, "ms": 0.2}
    assert causes["host_ms_inside_late_gaps"]["offload.unpack"] == 0.2


def test_step_trace_names_the_kernels_around_each_copy(tmp_path, capsys):
    """A copy inside a CUDA graph has no host op of its own: step_trace.py names the kernels before
    and after it (the matmul that made the copied tensor, the one that reads it)."""
    import gzip
    import json

    from step_trace import analyze

    def kernel(ts, name, correlation):
        return {"ph": "X", "cat": "kernel", "ts": ts, "dur": 10, "name": name, "args": {"correlation": correlation}}

    events = [launch(0, 1), launch(1, 2), launch(2, 3), launch(3, 4), launch(4, 5)]
    events += [kernel(10, "gemm_term", 1), kernel(20, "memcpy128", 2), kernel(30, "gemm_badd", 3)]
    events += [kernel(40, "gemm_term", 4), kernel(50, "memcpy128", 5)]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    analyze(path)
    out = capsys.readouterr().out
    assert "memcpy128: 2 calls, 0.02 ms" in out
    assert "1 x after gemm_term | before gemm_badd" in out and "1 x after gemm_term | before -" in out


def test_selective_blocks_reach_only_the_recipe_variants_that_checkpoint_whole_blocks():
    from bench_step import recipe_variant

    from rwkv_ft.recipe import load_recipe

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "rwkv4_alpaca_lora.yaml"
    overrides, compared_with = recipe_variant("recipe_ckpt_graphs", selective_blocks=5)
    loaded = load_recipe(recipe, overrides).training
    assert (loaded.gradient_checkpointing, loaded.selective_blocks, loaded.compile) == (True, 5, "reduce-overhead")
    assert compared_with == "compile_ckpt"
    selective, _ = recipe_variant("recipe_graphs", selective_blocks=5)  # already selective everywhere
    assert load_recipe(recipe, selective).training.selective_blocks == 0
    assert recipe_variant("recipe_ckpt_graphs")[0] == overrides[:-1]


def test_the_accelerate_clip_baseline_is_patched_in_for_its_variant_only():
    """recipe_ckpt_graphs_accelerate_clip runs the Trainer with accelerate's clip (the baseline of
    rwkv_ft's own); the patch is undone after the run, and other variants never see it."""
    import bench_step

    import rwkv_ft.train as train_module

    stock = train_module._make_trainer_class
    with bench_step.trainer_clipping_with_accelerate(False):
        assert train_module._make_trainer_class is stock
    with bench_step.trainer_clipping_with_accelerate(True):
        patched = train_module._make_trainer_class()
        assert patched._clip_grad_norm is not stock()._clip_grad_norm
        assert "accelerator.clip_grad_norm_" in inspect.getsource(patched._clip_grad_norm)
    assert train_module._make_trainer_class is stock
    assert bench_step.ACCELERATE_CLIP <= set(bench_step.RECIPE_VARIANTS)


def test_recipe_throughput_stops_at_the_last_step_not_after_the_save(monkeypatch):
    """bench_recipe's meter times steps skip+1..max_steps; what runs after the last step (the final
    save) is not in it."""
    from types import SimpleNamespace

    import bench_recipe

    clock = iter([10.0, 14.0, 99.0])  # start of step 3, end of step 6, a read after the save
    monkeypatch.setattr(bench_recipe.time, "perf_counter", lambda: next(clock))
    meter = bench_recipe.Throughput(skip=2)
    for step in range(6):  # global_step before a step's begin is the count of finished steps
        state = SimpleNamespace(global_step=step, max_steps=6, num_input_tokens_seen=100 * step)
        meter.on_step_begin(None, state, None)
        state.global_step, state.num_input_tokens_seen = step + 1, 100 * (step + 1)
        meter.on_step_end(None, state, None)
    assert meter.result() == {"timed_steps": 4, "tokens": 400, "seconds": 4.0, "tokens_per_s": 100.0}


def test_multi_gpu_bench_trains_resumes_and_compares_in_one_process(tmp_path, monkeypatch):
    """benchmarks/bench_multi_gpu.py end to end on the tiny shape (one CPU process, fp32, eager):
    `train` writes its tokens/s and memory, a run resumed from its step-2 checkpoint ends on the
    straight run's adapter, and `compare` reads both. The GPU machine is the first to run this
    script otherwise, where a bug costs device time."""
    import json

    import bench_multi_gpu

    monkeypatch.delenv("OUT", raising=False)
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "rwkv7_alpaca_lora.yaml")
    tiny = ["data.max_length=32", "training.precision=fp32", "training.compile=false", "training.batch_size=2"]
    # A constant rate: the 2-step run's learning rates are then the 4-step run's.
    tiny += ["training.schedule=constant", "training.warmup_ratio=0"]
    assert bench_multi_gpu.main(["prepare", "tiny", str(tmp_path), "--rows", "16"]) == 0
    for name, extra in (("straight", []), ("resumed", ["--steps", "2"]), ("resumed", ["--resume"])):
        args = ["train", "tiny", str(tmp_path), name, recipe, "--steps", "4", "--skip", "1", "--save-steps", "2"]
        assert bench_multi_gpu.main([*args, *extra, *tiny]) == 0
    bench = json.loads((tmp_path / "straight" / "bench.json").read_text())
    assert bench["steps"] == 4 and bench["timed_steps"] == 3 and bench["tokens_per_s"] > 0
    assert json.loads((tmp_path / "resumed" / "bench.json").read_text())["resumed_from_step"] == 2
    assert (tmp_path / "straight" / "rank0.json").exists()
    assert bench_multi_gpu.main(["compare", str(tmp_path / "straight"), str(tmp_path / "resumed")]) == 0
    result = json.loads((tmp_path / "compare-straight-resumed.json").read_text())
    assert result["adapter_max_relative_difference"] < 1e-6 and result["loss_steps_compared"] == 4
