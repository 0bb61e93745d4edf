#!/usr/bin/env bash
# Creates a virtual environment (once) and installs rwkv_ft into it, editable, with the dev extras
# (pytest, ruff, BlinkDL's rwkv package). torch is pinned first so that pip does not pick a
# different build; everything else resolves to the newest releases pip finds today.
# Knobs: PYTHON=python3.12 (interpreter), TORCH_SPEC="torch==2.x" (torch pin), VENV=.venv (where),
# CONSTRAINTS=ci/lower-bounds.txt (a pip constraints file: CI uses it to test the declared lower bounds),
# EXTRAS=dev,deepspeed (the extras installed; scripts/test.sh adds deepspeed for the ZeRO tests).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=${VENV:-.venv}
pip_args=(-q --disable-pip-version-check)
if [ -n "${CONSTRAINTS:-}" ]; then pip_args+=(-c "$CONSTRAINTS"); fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install "${pip_args[@]}" "${TORCH_SPEC:-torch==2.13.0}" 2> >(grep -v "is ignored" >&2)
"$venv/bin/python" -m pip install "${pip_args[@]}" -e ".[${EXTRAS:-dev}]" 2> >(grep -v "is ignored" >&2)
