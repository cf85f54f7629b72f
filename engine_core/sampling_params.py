"""Per-request sampling parameters, with vLLM's names, defaults and validation rules.

`SamplingParams` crosses process boundaries as msgpack, so it is a msgspec Struct of plain typed
fields. `__post_init__` runs both on construction and on msgpack decode: it rejects bad values
with a `ValueError` naming the field and its allowed range (msgspec reports it as a
`msgspec.ValidationError`, itself a `ValueError`, when decoding), and normalises the accepted
spellings (`top_k=-1` -> 0, a single stop string -> a list, ints in float fields -> floats,
-0.0 -> 0.0).

Numeric edges, decided per field (the sampler computes in float32, see `executors/sampler.py`):

- temperature: finite, >= 0. Below 1e-5 (0, -0.0, denormals) greedy. Above float32's max
  (3.4e38, e.g. 1e308) sampled as 3.4e38: uniform over the tokens the filters keep.
- top_p: (0, 1]. The most likely token is always kept, so a denormal (1e-320, 0 in float32)
  is top-1.
- min_p: [0, 1]. The most likely token is always kept; 1 keeps the tokens tied with it.
- presence_penalty, frequency_penalty: [-2, 2], exact (count x 2 cannot overflow).
- repetition_penalty: finite, > 0, taken within float32's normal range [1.2e-38, 3.4e38].
  Where a division overflows (a positive logit / 1e-300 is +inf) the row takes its argmax
  over the penalised logits: greedy among the seen tokens.

Not finite (NaN, inf, a JSON 1e400, an int too large for a float) is refused, naming the field.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from engine_core.structured_outputs import StructuredOutputsParams

__all__ = ["GREEDY_TEMPERATURE", "MAX_LOGPROBS", "WIRE_INT_MAX", "WIRE_INT_MIN", "SamplingParams"]

# The most logprobs a request may ask for unless the engine says otherwise (vLLM's default
# --max-logprobs); the engine's own limit is EngineConfig.max_logprobs, checked by validation.py.
MAX_LOGPROBS = 20
GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily (argmax)
# Every int field must fit a msgpack integer (int64 or uint64), the wire's range.
WIRE_INT_MIN, WIRE_INT_MAX = -(1 << 63), (1 << 64) - 1


_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
_INT_FIELDS = ("n", "top_k", "min_tokens")
_OPTIONAL_INT_FIELDS = ("seed", "max_tokens", "logprobs")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How to pick each generated token of one request, and when to stop.

    `top_k` 0 (or -1) and `top_p` 1 turn those filters off; `min_p` 0 likewise. `max_tokens`
    None generates until the model's context is full. `logprobs` N returns the sampled token's
    logprob plus the top N (0: the sampled token's only); the engine takes N up to its
    `max_logprobs` (default MAX_LOGPROBS). `stop_token_ids` and the model's EOS
    ids cannot end a request before `min_tokens` tokens exist.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # A constraint every sampled token obeys (JSON schema, regex, choice, grammar); the request
    # finishes when it is complete. See structured_outputs.py.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        # Types first (so the range rules below compare numbers), then ranges, then normalising.
        for name in _FLOAT_FIELDS:
            setattr(self, name, _float(name, getattr(self, name)))
        for name in _INT_FIELDS:
            _int(name, getattr(self, name))
        for name in _OPTIONAL_INT_FIELDS:
            if getattr(self, name) is not None:
                _int(name, getattr(self, name))
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.stop is not None:
            self.stop = _stop_strings(self.stop)
        if self.stop_token_ids is not None:
            self.stop_token_ids = _token_ids("stop_token_ids", self.stop_token_ids)

        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if not isinstance(self.structured_outputs, (StructuredOutputsParams, type(None))):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got "
                             f"{type(self.structured_outputs).__name__}")

        max_tokens, logprobs = self.max_tokens, self.logprobs
        rules = (
            ("n", self.n >= 1, ">= 1"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= -1, "-1 (off) or >= 0"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("max_tokens", max_tokens is None or max_tokens >= 1, ">= 1 or None"),
            ("min_tokens", self.min_tokens >= 0, ">= 0"),
            (
                "min_tokens",
                max_tokens is None or self.min_tokens <= max_tokens,
                f"<= max_tokens ({max_tokens})",
            ),
            ("logprobs", logprobs is None or logprobs >= 0, ">= 0 or None"),
        )
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        self.top_k = max(self.top_k, 0)

    @property
    def greedy(self) -> bool:
        """True when the sampler takes the argmax instead of drawing a token."""
        return self.temperature < GREEDY_TEMPERATURE


def _int(name: str, value: Any) -> int:
    """`value` if it is an int in the wire's range; bools are not ints here."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not WIRE_INT_MIN <= value <= WIRE_INT_MAX:
        raise ValueError(f"{name} must be a 64-bit int (in [-2**63, 2**64 - 1]), got {value!r}")
    return int(value)


def _float(name: str, value: Any) -> float:
    """`value` as a finite float (-0.0 as 0.0); ints are accepted, bools are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond a double's range (a float always converts)
        raise ValueError(f"{name} must be finite, got an int of {int(value).bit_length()} "
                         "bits") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    # the same object when it is one (msgspec omits a default by identity); -0.0 as 0.0
    return 0.0 if number == 0 and math.copysign(1.0, number) < 0 else number


def _stop_strings(value: Any) -> list[str]:
    stop = [value] if isinstance(value, str) else value
    if not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {value!r}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop must hold non-empty strings, got {s!r}")
    return list(stop)


def _token_ids(name: str, value: Any) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of ints, got {value!r}")
    for token_id in value:
        if (isinstance(token_id, bool) or not isinstance(token_id, int)
                or not 0 <= token_id <= WIRE_INT_MAX):
            raise ValueError(f"{name} must hold token ids (non-negative ints below 2**64), "
                             f"got {token_id!r}")
    return list(value)
