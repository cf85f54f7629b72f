"""`speculative_config`: how the engine proposes draft tokens for the target model to verify.

vLLM's keys and meanings:

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    {"method": "draft_model", "model": "/path/to/small-model", "num_speculative_tokens": 4}

`method` may be left out when `model` is given (a draft model) or when `model` is "[ngram]"
(vLLM's older spelling). `disable_by_batch_size`: no drafts are proposed for a step while at
least that many requests are running (a batch that large is compute bound: verifying drafts
costs more than it saves); `None` takes `DEFAULT_DISABLE_BY_BATCH_SIZE`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["DEFAULT_DISABLE_BY_BATCH_SIZE", "MAX_SPECULATIVE_TOKENS", "SPECULATIVE_METHODS",
           "SpeculativeConfig"]

SPECULATIVE_METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 32  # drafts per step and request; more is never worth a verification
# Running requests from which speculation stops paying on a CPU (bench/spec_decode.py
# --batch-sizes: n-gram drafts still gain 1.1-1.3x at 16 running requests and about break even
# at 32, on the default model and on the 150M benchmark model): a larger batch keeps the
# matmuls busy on its own.
DEFAULT_DISABLE_BY_BATCH_SIZE = 32


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, validated on construction (ValueError naming the key)."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int | None = None  # n-gram: the longest suffix matched
    prompt_lookup_min: int | None = None  # n-gram: the shortest suffix matched
    model: str | None = None  # draft_model: an HF model directory with the target's vocabulary
    disable_by_batch_size: int | None = None
    draft_tensor_parallel_size: int = 1  # accepted for vLLM's configs; only 1 exists here

    def __post_init__(self) -> None:
        method = self.method
        if method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config: method must be one of "
                             f"{', '.join(SPECULATIVE_METHODS)}, got {method!r}")
        _check_int("num_speculative_tokens", self.num_speculative_tokens, 1,
                   MAX_SPECULATIVE_TOKENS)
        if self.disable_by_batch_size is not None:
            _check_int("disable_by_batch_size", self.disable_by_batch_size, 1)
        if self.draft_tensor_parallel_size != 1:
            raise ValueError(f"speculative_config: draft_tensor_parallel_size must be 1, "
                             f"got {self.draft_tensor_parallel_size!r}")
        if method == "ngram":
            if self.model is not None:
                raise ValueError("speculative_config: model is for method 'draft_model'; "
                                 "'ngram' proposes from the request's own tokens")
            low, high = self.prompt_lookup_min, self.prompt_lookup_max
            # checked as given, before one fills in for the other: the error names the key set
            if low is not None:
                _check_int("prompt_lookup_min", low, 1)
            if high is not None:
                _check_int("prompt_lookup_max", high, 1)
            if low is None and high is None:
                low = high = 5  # vLLM's default
            low = high if low is None else low
            high = low if high is None else high
            if low > high:  # type: ignore[operator]
                raise ValueError(f"speculative_config: prompt_lookup_min ({low}) must be <= "
                                 f"prompt_lookup_max ({high})")
            object.__setattr__(self, "prompt_lookup_min", low)
            object.__setattr__(self, "prompt_lookup_max", high)
        else:
            for key in ("prompt_lookup_min", "prompt_lookup_max"):
                if getattr(self, key) is not None:
                    raise ValueError(f"speculative_config: {key} is for method 'ngram'")
            model = self.model
            if not isinstance(model, str) or not model:
                raise ValueError("speculative_config: method 'draft_model' needs 'model', the "
                                 "draft model's directory")
            if not os.path.isfile(os.path.join(model, "config.json")):
                raise ValueError(f"speculative_config: model {model!r} is not a model "
                                 f"directory (no config.json)")
            object.__setattr__(self, "model", os.path.abspath(model))

    @property
    def batch_size_limit(self) -> int:
        """Running requests at and above which no drafts are proposed."""
        limit = self.disable_by_batch_size
        return DEFAULT_DISABLE_BY_BATCH_SIZE if limit is None else limit

    @classmethod
    def from_value(cls, value: object) -> SpeculativeConfig | None:
        """A config from what a user passes: a dict, its JSON text, a `SpeculativeConfig`, or
        None/{} (off). ValueError naming the key at fault."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        data: Any = value
        if isinstance(value, (str, bytes)):
            try:
                data = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"speculative_config must be a JSON object (a dict), "
                             f"got {type(data).__name__}")
        if not data:
            return None
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key) for key in set(data) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key {unknown[0]!r} "
                             f"(known: {', '.join(sorted(known))})")
        if data.get("model") == "[ngram]":  # vLLM's older spelling
            data.pop("model")
            data.setdefault("method", "ngram")
        if "method" not in data:
            if data.get("model") is None:
                raise ValueError("speculative_config: missing key 'method' ('ngram' or "
                                 "'draft_model')")
            data["method"] = "draft_model"
        if "num_speculative_tokens" not in data:
            raise ValueError("speculative_config: missing key 'num_speculative_tokens'")
        return cls(**data)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if (not isinstance(value, int) or isinstance(value, bool) or value < low
            or (high is not None and value > high)):
        bound = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"speculative_config: {name} must be {bound}, got {value!r}")
