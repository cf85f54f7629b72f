"""Model side of pp-engine: configs, the Llama-family stage model, paged attention,
weight loading and tokenization.

The names below load on first use: reading a model's config (`ModelConfig`) does not load
torch, so the CLI and the proxy start without it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine_core.models.attention import AttentionMetadata
    from engine_core.models.config import ModelConfig, load_model_config, supported_architectures
    from engine_core.models.default_model import default_model_dir
    from engine_core.models.llama import LlamaModel
    from engine_core.models.loader import load_model, resolve_dtype
    from engine_core.models.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

__all__ = [
    "AttentionMetadata",
    "IncrementalDetokenizer",
    "LlamaModel",
    "ModelConfig",
    "Tokenizer",
    "default_model_dir",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "resolve_dtype",
    "supported_architectures",
]

_HOME = {
    "AttentionMetadata": "attention",
    "IncrementalDetokenizer": "tokenizer",
    "LlamaModel": "llama",
    "ModelConfig": "config",
    "Tokenizer": "tokenizer",
    "default_model_dir": "default_model",
    "load_model": "loader",
    "load_model_config": "config",
    "load_tokenizer": "tokenizer",
    "resolve_dtype": "loader",
    "supported_architectures": "config",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
