"""Model side of pp-engine: configs, the Llama-family stage model, paged attention,
weight loading and tokenization."""

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
