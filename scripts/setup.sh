#!/usr/bin/env bash
# Creates ./.venv (once) and installs rwkv_ft into it, editable, with the dev extras (pytest, ruff,
# BlinkDL's rwkv package). torch is pinned first so that pip does not pick a different build.
# Override the interpreter with PYTHON=python3.12, the torch pin with TORCH_SPEC="torch==2.x".
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" 2> >(grep -v "is ignored" >&2)
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" 2> >(grep -v "is ignored" >&2)
