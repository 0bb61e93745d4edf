#!/usr/bin/env bash
# Issue 13's measurements on one machine with 2 GPUs (nvidia-h200-x2), each part one call:
#   bash benchmarks/bench_multi_gpu.sh ddp      # DDP 1 vs 2 GPUs, RWKV-7 1.5B and RWKV-4 1.6B LoRA, ctx 1024
#   bash benchmarks/bench_multi_gpu.sh fsdp2    # RWKV-7 13.3B shape LoRA, ctx 4096, FSDP2, + kill-and-resume
#   bash benchmarks/bench_multi_gpu.sh zero3    # the same under DeepSpeed ZeRO-3 (needs: pip install deepspeed)
#   bash benchmarks/bench_multi_gpu.sh all      # the three in turn
#   NPROC=1 bash benchmarks/bench_multi_gpu.sh resume  # one GPU, tiny shape: does a killed and resumed run end
#                                               # where a straight one does? (FSDP2 compiled and eager, no FSDP compiled)
# Random weights (benchmarks/bench_multi_gpu.py prepare builds each base once, bf16, in $WORK), Alpaca
# rows lengthened to fill the context. Writes $OUT/<run>/bench.json (tokens/s over both GPUs, versions),
# $OUT/<run>/rank<R>.json (each GPU's peak memory) and $OUT/compare-*.json (adapter difference, loss
# curves, speed-up); prints a summary last. Knobs: OUT, WORK, STEPS_DDP (30), STEPS_BIG (12),
# SHAPE_BIG (rwkv7-13.3b: the shape of fsdp2/zero3), NPROC (the configs' count; NPROC=1 runs the sharded
# parts on one GPU, which checks their code paths on CUDA where no 2-GPU machine is lent).
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
export OUT=${OUT:-benchmarks/results/multi_gpu_$(date +%F)}
WORK=${WORK:-/tmp/rwkv_ft_multi_gpu}
STEPS_DDP=${STEPS_DDP:-30}
STEPS_BIG=${STEPS_BIG:-12}
SHAPE_BIG=${SHAPE_BIG:-rwkv7-13.3b}
mkdir -p "$OUT" "$WORK"
bench() { python benchmarks/bench_multi_gpu.py "$@"; }
launch() {  # launch CONFIG SHAPE NAME RECIPE [args]: one training run (a killed one returns non-zero)
    local config=$1 shape=$2 name=$3 recipe=$4
    shift 4
    BENCH_CONFIG=$config accelerate launch --config_file "recipes/accelerate/$config" ${NPROC:+--num_processes "$NPROC"} \
        benchmarks/bench_multi_gpu.py train "$shape" "$WORK" "$name" "$recipe" "$@"
}

ddp() {
    # The same global batch (8 rows of 1024 tokens) on 1 GPU and on 2: same adapter (bf16), >= 1.85x tokens/s.
    for shape in rwkv7-1.5b rwkv4-1.6b; do
        recipe=recipes/${shape%%-*}_alpaca_lora.yaml
        bench prepare "$shape" "$WORK"
        common=(--steps "$STEPS_DDP" --skip 5 data.max_length=1024 training.schedule=constant training.warmup_ratio=0)
        rm -rf "$WORK/ddp1-$shape" "$WORK/ddp2-$shape"
        launch single_gpu.yaml "$shape" "ddp1-$shape" "$recipe" "${common[@]}" training.batch_size=8
        launch multi_gpu.yaml "$shape" "ddp2-$shape" "$recipe" "${common[@]}" training.batch_size=4
        bench compare "$WORK/ddp1-$shape" "$WORK/ddp2-$shape"
    done
}

sharded() {  # sharded CONFIG TAG [overrides]: SHAPE_BIG, LoRA, ctx 4096, batch 1 per GPU; straight, killed, resumed
    local config=$1 tag=$2
    shift 2
    local shape=$SHAPE_BIG recipe=recipes/rwkv7_alpaca_lora.yaml
    bench prepare "$shape" "$WORK"
    local common=(--steps "$STEPS_BIG" --skip 3 --save-steps 4 data.max_length=4096 training.batch_size=1 "$@")
    rm -rf "$WORK/$tag" "$WORK/$tag-killed"
    launch "$config" "$shape" "$tag" "$recipe" "${common[@]}"
    launch "$config" "$shape" "$tag-killed" "$recipe" "${common[@]}" --kill-at 7 || echo "killed at step 7, as meant"
    launch "$config" "$shape" "$tag-killed" "$recipe" "${common[@]}" --resume
    bench compare "$WORK/$tag" "$WORK/$tag-killed"  # kill-and-resume: the same loss curve and adapter
}

resume() {  # tiny shape, ctx 1024, 12 steps: straight, killed at 7, resumed from 4, compared; three setups
    local shape=tiny recipe=recipes/rwkv7_alpaca_lora.yaml setup config tag extra
    bench prepare "$shape" "$WORK"
    for setup in fsdp.yaml:fsdp-compiled: fsdp.yaml:fsdp-eager:training.compile=false single_gpu.yaml:single-compiled:; do
        IFS=: read -r config tag extra <<< "$setup"
        local common=(--steps 12 --skip 3 --save-steps 4 data.max_length=1024 training.batch_size=1 ${extra:+"$extra"})
        rm -rf "$WORK/$tag" "$WORK/$tag-killed"
        launch "$config" "$shape" "$tag" "$recipe" "${common[@]}"
        launch "$config" "$shape" "$tag-killed" "$recipe" "${common[@]}" --kill-at 7 || echo "killed at step 7, as meant"
        launch "$config" "$shape" "$tag-killed" "$recipe" "${common[@]}" --resume
        bench compare "$WORK/$tag" "$WORK/$tag-killed"
    done
}

case "$part" in
    ddp) ddp ;;
    fsdp2) sharded fsdp.yaml "fsdp2-$SHAPE_BIG" ;;
    zero3) sharded deepspeed_zero3.yaml "zero3-$SHAPE_BIG" training.compile=false ;;  # ZeRO-3 refuses compiled blocks
    resume) resume ;;
    all) ddp; sharded fsdp.yaml "fsdp2-$SHAPE_BIG"; sharded deepspeed_zero3.yaml "zero3-$SHAPE_BIG" training.compile=false ;;
    *) echo "usage: $0 ddp|fsdp2|zero3|resume|all" >&2; exit 2 ;;
esac
echo "== results in $OUT"
for f in "$OUT"/*/bench.json; do
    python - "$f" <<'EOF'
import json, pathlib, sys
run = pathlib.Path(sys.argv[1]).parent
b = json.loads((run / "bench.json").read_text())
peaks = [json.loads(p.read_text())["peak_allocated_gib"] for p in sorted(run.glob("rank*.json"))]
tps = b.get("tokens_per_s")
print(f"{b['name']}: {b['world_size']} GPU(s), {b['shape']}, ctx {b['max_length']}, batch {b['batch_per_gpu']}/GPU: "
      f"{tps and round(tps)} tok/s, peak GiB per GPU {[round(p, 2) for p in peaks if p is not None]}, loss {b['train_loss']:.4f}")
EOF
done
for f in "$OUT"/compare-*.json; do [ -e "$f" ] && echo "$(basename "$f"): $(tr -d '\n ' < "$f")"; done
