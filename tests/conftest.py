"""Shared fixtures: tiny random HF checkpoints built locally with transformers (the oracle)."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import make_checkpoint

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
