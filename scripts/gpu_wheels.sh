#!/usr/bin/env bash
# Download the wheels that bench/gpu_check.py needs on the GPU machine and its image lacks, into
# .gpu/whl/ (git-ignored): what the engine imports when an `LLM` starts, beyond torch,
# transformers, tokenizers, safetensors, jinja2, tqdm and numpy (the image has them), i.e.
# msgspec and pyzmq. Ray is not needed: the script runs the in-process executor, and nothing on
# that path imports ray. CPython 3.12, manylinux x86_64 (torch 2.11's own wheels need glibc >= 2.28).
#
# Then, on the GPU machine, from the project root (the working tree plus .gpu/whl, ~15 MiB):
#   PYTHONUNBUFFERED=1 timeout 330 python3 bench/gpu_check.py --wheels .gpu/whl OUTDIR
# (with the session's `run` tool: OUTDIR=$OUT, carry [".gpu/whl"], timeout_s 360).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.gpu/whl
rm -rf "$dest"
mkdir -p "$dest"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dest" "msgspec>=0.18" "pyzmq>=25"
ls -l "$dest"
echo "run on the GPU machine: PYTHONUNBUFFERED=1 timeout 330 python3 bench/gpu_check.py --wheels $dest OUTDIR"
