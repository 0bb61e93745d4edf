#!/usr/bin/env bash
# Sets up ./.venv (see setup.sh) and runs the quickstart recipe: a tiny model built from a config,
# LoRA on the bundled Alpaca sample, merge, and a short generation from the merged model. CPU is fine.
#   bash scripts/quickstart.sh          # RWKV-4
#   bash scripts/quickstart.sh rwkv7    # RWKV-7
# Each run writes a new folder outputs/quickstart-<time>; further arguments are recipe overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=recipes/quickstart.yaml
if [ "${1:-}" = "rwkv7" ]; then recipe=recipes/quickstart_rwkv7.yaml; shift; fi
bash scripts/setup.sh  # VENV and CONSTRAINTS go to setup.sh too (e.g. the lower bounds: DEVELOPERS.md)
exec "${VENV:-.venv}/bin/rwkv-ft" train "$recipe" "training.output_dir=outputs/quickstart-$(date +%Y%m%d-%H%M%S)" "$@"
