"""`executors/kv_memory.py`: the KV cache is resident once the engine has started, and a cache
the host cannot hold fails the start with an error naming the setting (issue 18)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from engine_core.executors import kv_memory
from engine_core.models import default_model_dir

from engine_core import LLM
from tests.servers import free_port

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _host_total() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux")


_RESIDENT_PROBE = """
import sys
from engine_core import LLM
from engine_core.models import default_model_dir
from tests.test_kv_memory import _rss
cache_bytes = 256 << 20
before = _rss()
llm = LLM(default_model_dir(), kv_cache_memory=cache_bytes)
grown = _rss() - before
stage = llm.engine.executor.stages[0]
allocated = sum(t.numel() * t.element_size() for kv in stage.kv_caches for t in kv)
zeroed = all(not t.any() for kv in stage.kv_caches for t in kv)
llm.shutdown()
print(grown, allocated, cache_bytes, zeroed)
"""


def test_the_kv_cache_is_resident_after_start():
    """In a fresh process: a test worker's earlier tests leave freed memory resident (see
    executors/host_memory.py), which a new cache may reuse without RSS growing."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _RESIDENT_PROBE], cwd=root, timeout=300,
                            capture_output=True, text=True, check=True)
    grown, allocated, cache_bytes, zeroed = result.stdout.split()[-4:]
    grown, allocated, cache_bytes = int(grown), int(allocated), int(cache_bytes)
    assert allocated > 0.99 * cache_bytes
    assert grown >= 0.95 * allocated, f"RSS grew {grown >> 20} MiB for a cache of " \
        f"{allocated >> 20} MiB: its pages are not resident"
    assert zeroed == "True"


def test_a_kv_cache_memory_the_host_cannot_hold_fails_at_start():
    too_much = 4 * _host_total()
    with pytest.raises(ValueError, match="kv_cache_memory") as info:
        # max_num_seqs so high that it does not cap the cache below kv_cache_memory
        LLM(default_model_dir(), kv_cache_memory=too_much, max_num_seqs=10**7)
    assert "available" in str(info.value)


def test_num_kv_blocks_the_host_cannot_hold_fails_at_start():
    with pytest.raises(ValueError, match=r"num_kv_blocks=100000000\b"):
        LLM(default_model_dir(), num_kv_blocks=10**8)


def test_memory_taken_meanwhile_stops_the_touch_with_an_error(monkeypatch):
    calls = []

    def shrinking(device):
        calls.append(device)
        return 4 << 30 if len(calls) <= 3 else 300 << 20  # plenty at first, then gone

    monkeypatch.setattr(kv_memory, "available_bytes", shrinking)
    monkeypatch.setattr(kv_memory, "TOUCH_SLICE_BYTES", 1 << 20)
    with pytest.raises(kv_memory.KVMemoryError, match=r"ran short.*num_kv_blocks=7"):
        kv_memory.allocate_resident([(64, 1024, 1024)] * 2, torch.float32, torch.device("cpu"),
                                    "num_kv_blocks=7")
    assert len(calls) == 4  # the check before, two slices zeroed, the third refused


def test_the_cache_fits_with_its_margin(monkeypatch):
    monkeypatch.setattr(kv_memory, "available_bytes", lambda device: 1 << 30)
    cpu = torch.device("cpu")
    kv_memory.check_fits((1 << 30) - (256 << 20) - 1, cpu, "x")
    with pytest.raises(kv_memory.KVMemoryError, match=r"needs 0\.75 GiB \(x\)"):
        kv_memory.check_fits((1 << 30) - (255 << 20), cpu, "x")


def test_the_host_reports_what_is_available():
    available = kv_memory.available_bytes(torch.device("cpu"))
    assert available is not None and 0 < available <= _host_total()


def test_serve_exits_with_a_clear_message_when_the_cache_does_not_fit():
    result = subprocess.run(
        [sys.executable, "-m", "engine_core", "serve", "--port", str(free_port()),
         "--num-kv-blocks", str(10**8)],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error:" in result.stderr and "num_kv_blocks=100000000" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
