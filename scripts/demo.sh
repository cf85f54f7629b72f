#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo generation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/demo.py
