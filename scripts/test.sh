#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite: lint, the layers contracts, the type
# checker, then pytest on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
bash scripts/check_structure.sh
.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
