"""Shared fixtures: tiny random HF checkpoints built locally with transformers (the oracle), and
`pp-engine` processes that are stopped after each test (`tests/servers.py`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels run on CPU tensors under Triton's interpreter (set before triton loads).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.checkpoints import make_checkpoint
from tests.servers import Processes

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3"]


def pytest_configure(config):
    torch.set_num_threads(1)  # parity runs with a fixed thread count; xdist runs 2 workers


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """checkpoint_factory(family, **config_overrides) -> model dir, built once per session."""
    cache: dict[tuple, str] = {}

    def build(family: str, **overrides) -> str:
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"ckpt-{family}")
            cache[key] = make_checkpoint(str(path), family, **overrides)
        return cache[key]

    return build


@pytest.fixture
def cli_processes(tmp_path) -> Iterator[Processes]:
    """`cli_processes.server(model_dir, *flags)` / `.start(args, name)`: `pp-engine` processes
    logging under tmp_path, all stopped after the test, which then fails if any process of
    theirs is left. Their log tails are printed at teardown (pytest shows them on failure)."""
    processes = Processes(str(tmp_path))
    try:
        yield processes
    finally:
        if processes.procs:
            print(processes.logs())
        processes.stop()
