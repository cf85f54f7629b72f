"""Model configuration read from a Hugging Face checkpoint directory (config.json)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

# Architecture name -> its model_type and family switches not spelled out in config.json.
_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_PARAMETER_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ),
}
_DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class ModelConfig:
    """The subset of a checkpoint's config that the engine's Llama-family model needs."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    # Frozen form of the RoPE scaling dict (with its "rope_type"); None for plain RoPE.
    rope_scaling: tuple[tuple[str, object], ...] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    torch_dtype: str | None

    def rope_scaling_dict(self) -> dict[str, object] | None:
        """The RoPE scaling parameters as a dict (keys: rope_type, factor, ...), or None."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)


def supported_architectures() -> list[str]:
    """Architecture names (config.json "architectures") that load_model_config accepts."""
    return sorted(_ARCHITECTURES)


def load_model_config(model_dir: str) -> ModelConfig:
    """Read `model_dir`/config.json (and generation_config.json when present).

    Raises ValueError, saying what to change, when the directory or config is missing or
    unreadable, or the architecture or RoPE type is not supported.
    """
    if not os.path.isdir(model_dir):
        raise ValueError(
            f"model directory {model_dir!r} does not exist; pass the path of a local "
            "Hugging Face checkpoint directory (with config.json and *.safetensors)"
        )
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(
            f"{model_dir!r} has no config.json; pass a Hugging Face checkpoint directory"
        )
    raw = read_json_object(config_path)
    generation = read_json_object(os.path.join(model_dir, "generation_config.json"),
                                  missing_ok=True)
    return _parse_config(raw, generation)


def read_json_object(path: str, missing_ok: bool = False) -> dict[str, Any]:
    """The JSON object in `path` ({} if `missing_ok` and there is no file); ValueError naming
    the file if it does not parse or holds something else."""
    if missing_ok and not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot parse {path}: {e}; fix or re-download the file") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _architecture(raw: dict[str, Any]) -> str:
    architectures = raw.get("architectures") or []
    if not architectures:
        # Fall back on model_type for configs saved without "architectures".
        by_type = {t: a for a, t in _ARCHITECTURES.items()}
        if raw.get("model_type") in by_type:
            return by_type[raw["model_type"]]
    arch = architectures[0] if architectures else raw.get("model_type")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r} in config.json; "
            f"supported architectures: {', '.join(supported_architectures())}"
        )
    return arch


def _require(raw: dict[str, Any], key: str) -> Any:
    value = raw.get(key)
    if value is None:
        raise ValueError(f"config.json is missing {key!r}; add it to the checkpoint's config")
    return value


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _rope(raw: dict[str, Any]) -> tuple[float, tuple[tuple[str, object], ...] | None]:
    """(rope_theta, frozen scaling) from either the transformers 5 `rope_parameters` format
    or the older `rope_theta` + `rope_scaling` keys."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", raw.get("rope_theta", _DEFAULT_ROPE_THETA))
        scaling = params
    else:
        theta = raw.get("rope_theta", _DEFAULT_ROPE_THETA)
        scaling = raw.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or "default"
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_type {rope_type!r} in config.json; "
            f"supported: {', '.join(_SUPPORTED_ROPE_TYPES)}"
        )
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported; rotate the full head_dim")
    if rope_type == "default":
        return float(theta), None
    frozen: dict[str, object] = {"rope_type": rope_type}
    for key in _ROPE_PARAMETER_KEYS[rope_type]:
        if key not in scaling:
            if key == "original_max_position_embeddings":
                frozen[key] = int(_require(raw, "max_position_embeddings"))
                continue
            raise ValueError(f"rope_type {rope_type!r} needs {key!r} in the RoPE parameters")
        frozen[key] = scaling[key]
    return float(theta), tuple(sorted(frozen.items()))


def _parse_config(raw: dict[str, Any], generation: dict[str, Any]) -> ModelConfig:
    arch = _architecture(raw)
    model_type = _ARCHITECTURES[arch]
    hidden_size = int(_require(raw, "hidden_size"))
    num_heads = int(_require(raw, "num_attention_heads"))
    num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_attention_heads ({num_heads}) must be a multiple of "
            f"num_key_value_heads ({num_kv_heads})"
        )
    head_dim = int(raw.get("head_dim") or hidden_size // num_heads)
    rope_theta, rope_scaling = _rope(raw)

    attention_bias = bool(raw.get("attention_bias", False))
    if model_type == "llama":
        qkv_bias, o_bias, mlp_bias = attention_bias, attention_bias, bool(raw.get("mlp_bias"))
    elif model_type == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
    elif model_type == "qwen3":
        qkv_bias, o_bias, mlp_bias = attention_bias, attention_bias, False
    else:  # mistral
        qkv_bias, o_bias, mlp_bias = False, False, False

    # Qwen configs carry a sliding_window that only applies with use_sliding_window.
    uses_window = model_type == "mistral" or bool(raw.get("use_sliding_window"))
    sliding_window = raw.get("sliding_window") if uses_window else None

    eos_ids = dict.fromkeys(
        _token_ids(raw.get("eos_token_id")) + _token_ids(generation.get("eos_token_id"))
    )
    bos = raw.get("bos_token_id")
    if bos is None:
        bos = generation.get("bos_token_id")
    dtype = raw.get("torch_dtype") or raw.get("dtype")
    return ModelConfig(
        architecture=arch,
        model_type=model_type,
        vocab_size=int(_require(raw, "vocab_size")),
        hidden_size=hidden_size,
        num_layers=int(_require(raw, "num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=int(_require(raw, "intermediate_size")),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(_require(raw, "max_position_embeddings")),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=model_type == "qwen3",
        sliding_window=None if sliding_window is None else int(sliding_window),
        eos_token_ids=tuple(eos_ids),
        bos_token_id=None if bos is None else int(bos),
        torch_dtype=None if dtype is None else str(dtype),
    )
