#!/usr/bin/env bash
# The layers contracts (import-linter) and the type checker (mypy), both configured in
# pyproject.toml, over the package as it installs (scripts/stage_package.py).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
"$root/.venv/bin/python" "$root/scripts/stage_package.py" "$stage"
cd "$stage"
"$root/.venv/bin/lint-imports" --no-cache "$root/pyproject.toml"
"$root/.venv/bin/mypy" --config-file "$root/pyproject.toml" --cache-dir "$root/.mypy_cache"
