#!/usr/bin/env bash
# Create .venv and install pp-engine with its test tools. Pins the CPU torch wheel first so no
# CUDA build is ever pulled. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,dev]"
