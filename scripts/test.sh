#!/usr/bin/env bash
# Sets up the virtual environment (see setup.sh) and runs the test suite. Extra arguments go to pytest.
# VENV and CONSTRAINTS are passed on to setup.sh (CI runs this twice: newest releases, lower bounds).
# The tests run in PYTEST_WORKERS processes (pytest-xdist; default 2, CI's cores), one test file per
# process at a time; PYTEST_WORKERS=0 runs them in this process (e.g. for a debugger).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-dev,deepspeed} bash scripts/setup.sh  # DeepSpeed: the ZeRO-2/3 tests run on the CPU
venv=${VENV:-.venv}
"$venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(torch|transformers|peft|accelerate|deepspeed|datasets|bitsandbytes|safetensors|tokenizers|triton) ' \
    | tr -s ' ' | paste -sd ',' | sed 's/^/testing with: /'
workers=${PYTEST_WORKERS:-2}
parallel=()
if [ "$workers" != 0 ]; then
    parallel=(-n "$workers" --dist loadfile)
    # One core's share of threads per worker: torch's default (a thread per core in each worker)
    # oversubscribes the cores, and the tests' own subprocesses then wait on each other.
    cores=$(nproc 2>/dev/null || echo 2)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / workers > 1 ? cores / workers : 1 ))}
fi
exec "$venv/bin/python" -m pytest "${parallel[@]}" "$@"
