"""Tiny random Hugging Face checkpoints for tests (saved with transformers' save_pretrained)."""

from __future__ import annotations

import os
from typing import Any

import torch

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3")

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_FAMILY: dict[str, dict[str, Any]] = {
    "llama": {"rope_theta": 10000.0},
    "llama3": {
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            # small, so that the test positions reach the interpolated frequencies
            "original_max_position_embeddings": 64,
        },
    },
    "mistral": {"sliding_window": 4096, "head_dim": 16},
    "qwen2": {"tie_word_embeddings": True, "rope_theta": 1000000.0},
    "qwen3": {"head_dim": 32, "rope_theta": 1000000.0},
}


def _config_class(family: str) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "llama": LlamaConfig,
        "llama3": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
    }[family]


def make_hf_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A tiny random float32 transformers model of `family` (see FAMILIES)."""
    from transformers import AutoModelForCausalLM

    if family not in _FAMILY:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    config = _config_class(family)(**{**_COMMON, **_FAMILY[family], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():  # make norms non-trivial so their weights are tested too
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def make_checkpoint(
    tmp_dir: str | os.PathLike[str],
    family: str,
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> str:
    """Save a tiny random checkpoint of `family` under `tmp_dir`/`family` and return its path.

    `overrides` change config fields (e.g. num_hidden_layers=2); `max_shard_size` (e.g.
    "100KB") saves a sharded checkpoint with a model.safetensors.index.json.
    """
    path = os.path.join(os.fspath(tmp_dir), family)
    model = make_hf_model(family, seed=seed, **overrides)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


def make_sharded_checkpoint(
    tmp_dir: str | os.PathLike[str], family: str = "llama", **overrides: Any
) -> str:
    """Like make_checkpoint, split into several safetensors shards with an index."""
    return make_checkpoint(tmp_dir, family, max_shard_size="100KB", **overrides)
