"""Default sampling parameters from a checkpoint's generation_config.json (vLLM's
`--generation-config`).

    "auto"  the model directory's generation_config.json (the default)
    "vllm"  none: the engine's own defaults (SamplingParams')
    DIR     DIR/generation_config.json

The defaults are the fields vLLM takes from the file, where present and not null:
temperature, top_p, top_k, min_p, repetition_penalty, and max_new_tokens (as `max_tokens`).
A front-end applies them to each request that leaves a field out; a value in the request wins.
A missing file means no defaults; a file that cannot be parsed, or a value SamplingParams
refuses, is a ValueError naming `generation_config` (at startup, not on every request).
"""

from __future__ import annotations

import os
from typing import Any

from engine_core.models.config import read_json_object
from engine_core.sampling_params import SamplingParams

__all__ = ["GENERATION_CONFIG_FIELDS", "read_generation_defaults", "resolve_generation_config"]

# generation_config.json key -> SamplingParams field
GENERATION_CONFIG_FIELDS = {
    "repetition_penalty": "repetition_penalty",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "max_new_tokens": "max_tokens",
}


def resolve_generation_config(value: str, model_dir: str) -> str:
    """What `EngineConfig.generation_config` holds for `value`: "vllm", or the absolute
    directory to read generation_config.json from ("auto": the model's)."""
    if value == "vllm":
        return value
    if value == "auto":
        return os.path.abspath(model_dir)
    if not isinstance(value, str) or not os.path.isdir(value):
        raise ValueError(f"generation_config must be 'auto', 'vllm' or a directory holding "
                         f"generation_config.json, got {value!r}")
    return os.path.abspath(value)


def read_generation_defaults(source: str) -> dict[str, Any]:
    """The default sampling fields (SamplingParams names) that `source` (a resolved
    `generation_config`) gives; {} for "vllm" or a directory without generation_config.json."""
    if source == "vllm":
        return {}
    path = os.path.join(source, "generation_config.json")
    try:
        raw = read_json_object(path, missing_ok=True)
    except ValueError as exc:
        raise ValueError(f"generation_config: {exc}") from None
    defaults = {field: raw[key] for key, field in GENERATION_CONFIG_FIELDS.items()
                if raw.get(key) is not None}
    try:
        SamplingParams(**defaults)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"generation_config: {path}: {exc}") from None
    return defaults
