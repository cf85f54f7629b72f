"""Model side of pp-engine: configs, the Llama-family stage model, paged attention,
weight loading and tokenization."""

from models.attention import AttentionMetadata
from models.config import ModelConfig, load_model_config, supported_architectures
from models.default_model import default_model_dir
from models.llama import LlamaModel
from models.loader import load_model, resolve_dtype
from models.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

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
