"""Every paged-attention configuration the engine can launch compiles for an A100 (sm80) and an
H100 (sm90), with no GPU present: `kernel_configs` of a representative set of model shapes,
each launched through the launcher's own argument plan and specialised as Triton's JIT would
(tests/models/triton_aot.py, run in a process without the interpreter, with a fresh cache so
every compile is real: ~0.5-5 s each, identical ones once; ~1.5 min in all on a 2-core
machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

# (num_heads, num_kv_heads, head_dim, block_size, dtype) of models the engine serves: head dims
# 64/80/128/256, GQA ratios 1/4/7/8, block sizes 1/16/32, every dtype.
SHAPES = [
    [32, 4, 64, 16, "bfloat16"],  # TinyLlama 1.1B
    [28, 4, 128, 32, "float16"],  # Qwen2 7B
    [32, 32, 80, 16, "float16"],  # Phi-2 (MHA, head_dim 80)
    [16, 4, 256, 16, "bfloat16"],  # Gemma-like head_dim 256
    [32, 8, 128, 1, "bfloat16"],  # Llama 3 8B, blocks of one token
    [32, 4, 64, 16, "float32"],  # float32 parity runs
    [14, 2, 256, 1, "float32"],
]
KINDS = ["decode", "decode_split", "combine", "prefill"]
CAPABILITIES = [80, 90]
# Shared memory one block may use: A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=str(tmp_path_factory.mktemp("tc")),
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    request = {"shapes": SHAPES, "capabilities": CAPABILITIES, "negative": True}
    proc = subprocess.run([sys.executable, "-m", "tests.models.triton_aot"], cwd=ROOT, env=env,
                          input=json.dumps(request), capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for r in lines:  # shown with -s, and in the log of a failure
        print(r["shape"], r["kind"], r["capability"], r.get("seconds"), "s shared",
              r.get("shared"), "regs", r.get("registers"), "spills", r.get("spill_bytes"),
              r.get("uses"), r.get("error", "")[:80])
    return lines


def test_shapes_cover_what_the_engine_allows():
    assert {s[2] for s in SHAPES} == {64, 80, 128, 256}
    assert {s[0] // s[1] for s in SHAPES} == {1, 4, 7, 8}
    assert {s[3] for s in SHAPES} == {1, 16, 32}
    assert {s[4] for s in SHAPES} == {"float32", "float16", "bfloat16"}


def test_every_launch_configuration_compiles(results):
    compiled = [r for r in results if r["shape"] in SHAPES]
    # kernel_configs lists the four kinds for each shape
    assert sorted((str(r["shape"]), r["kind"], r["capability"]) for r in compiled) == sorted(
        (str(s), k, c) for s in SHAPES for k in KINDS for c in CAPABILITIES)
    for r in compiled:
        where = f"{r['shape']} {r['kind']} sm{r['capability']}"
        assert r["ok"], f"{where}: {r.get('error')}"
        assert r["entry"] and r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0, where
        assert r["shared"] <= SHARED_LIMIT[r["capability"]], where
        if r["kind"] == "combine":  # no dot
            pass
        elif r["shape"][4] == "float32":  # no TF32 anywhere: float32 parity needs exact dots
            assert not {"tf32", "mma.sync", "wgmma"} & set(r["uses"]), where
        else:  # 16-bit dots on tensor cores
            assert {"mma.sync", "wgmma"} & set(r["uses"]), where
        if r["capability"] == 90:  # the GPUs we measure on: no register spills
            assert r["spill_bytes"] == 0, where


def test_prefill_uses_hopper_tensor_core_instructions(results):
    for r in results:
        if r["shape"] in SHAPES and r["capability"] == 90 and r["kind"] == "prefill" \
                and r["shape"][4] != "float32":
            assert "wgmma" in r["uses"], r


def test_the_compiler_rejects_what_a_gpu_cannot_run(results):
    # BLOCK_N = 8 makes P @ V reduce over 8 keys: the interpreter runs it, a GPU cannot.
    (negative,) = [r for r in results if r["shape"] == "negative: BLOCK_N=8"]
    assert not negative["ok"]
    assert "K >= 16" in negative["error"]
