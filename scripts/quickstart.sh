#!/usr/bin/env bash
# Sets up ./.venv (see setup.sh) and runs the quickstart recipe: a tiny RWKV-4 built from a config,
# LoRA on the bundled Alpaca sample, merge, and a short generation from the merged model. CPU is fine.
# Each run writes a new folder outputs/quickstart-<time>; extra arguments are recipe overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rwkv-ft train recipes/quickstart.yaml "training.output_dir=outputs/quickstart-$(date +%Y%m%d-%H%M%S)" "$@"
