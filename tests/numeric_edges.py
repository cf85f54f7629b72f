"""Edge-heavy hypothesis strategies for every numeric sampling field (issue 18), and the checks
every answer must pass: shared by tests/test_numeric_edges.py (offline, PP=2) and
tests/test_numeric_edges_served.py (served, data parallel, behind the P/D proxy).

Offline values are Python numbers for `SamplingParams(**kwargs)`; served values are raw JSON
text, so that bodies can hold what `json.dumps` never writes (1e400, -0.0, ints beyond 64 bits).
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import strategies as st

VOCAB = 512  # tests/checkpoints.py

# the two reproductions of issue 18 (NaN probabilities -> an out-of-range token id)
TINY_TOP_P = {"top_p": 1e-320}
EXTREME_PENALTIES = {"repetition_penalty": 1e-300, "presence_penalty": -2,
                     "frequency_penalty": -2}

EDGE_FLOATS = [
    5e-324, 1e-320, 1e-310, 1.4e-45, 1.17549435e-38, 3.4028235e38, 3.5e38, 1.7976931348623157e308,
    0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, 1e-5, 0.99999, 1.00001, -1e-320, -5e-324,
    *[10.0 ** e for e in range(-308, 309, 22)], *[-(10.0 ** e) for e in range(-300, 301, 60)],
]
EDGE_INTS = [
    -1, 0, 1, 2, 3, -2, 20, 21, 511, 512, 2**31 - 1, 2**31, -(2**31), 2**53, 2**53 + 1,
    2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, 2**100, -(2**100),
]
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty")
INT_FIELDS = ("top_k", "seed", "max_tokens", "min_tokens", "logprobs", "n")


def edge_floats() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(allow_nan=True,
                                                             allow_infinity=True))


def edge_ints() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(EDGE_INTS), st.integers(-5, 40),
                     st.integers(-(2**70), 2**70))


def edge_numbers() -> st.SearchStrategy[float | int]:
    """Either kind, for any numeric field: an int where a float goes is fine, a float where an
    int goes must be refused."""
    return st.one_of(edge_floats(), edge_ints())


def stop_token_ids() -> st.SearchStrategy[list[int]]:
    return st.lists(st.one_of(st.sampled_from(EDGE_INTS), st.integers(0, VOCAB - 1)),
                    max_size=4)


# Where each field's valid values lie (SamplingParams' rules, roughly): most drawn values are
# edges inside the range, so that most examples pass validation and run, several extremes at
# once; the rest are edges of any kind, to check that they are refused.
IN_RANGE = {
    "temperature": lambda x: x >= 0,
    "top_p": lambda x: 0 < x <= 1,
    "min_p": lambda x: 0 <= x <= 1,
    "presence_penalty": lambda x: -2 <= x <= 2,
    "frequency_penalty": lambda x: -2 <= x <= 2,
    "repetition_penalty": lambda x: x > 0,
    "top_k": lambda x: x >= -1,
    "seed": lambda x: -(2**63) <= x < 2**64,
    "max_tokens": lambda x: x >= 1,
    "min_tokens": lambda x: 0 <= x <= 3,
    "logprobs": lambda x: 0 <= x <= 20,
    "n": lambda x: 1 <= x <= 3,
}


def field_values(name: str) -> st.SearchStrategy[Any]:
    """Values for one SamplingParams field: in-range edges mostly, any edge sometimes."""
    edges = EDGE_FLOATS if name in FLOAT_FIELDS else EDGE_INTS + list(range(-1, 22))
    inside = sorted({x for x in edges if IN_RANGE[name](x)}, key=lambda x: (abs(x), x))
    anything = edge_numbers()
    return st.one_of(st.sampled_from(inside), st.sampled_from(inside), st.sampled_from(inside),
                     anything)


def sampling_kwargs() -> st.SearchStrategy[dict[str, Any]]:
    """SamplingParams keyword arguments: any subset of the numeric fields and stop_token_ids."""
    optional = {name: field_values(name) for name in FLOAT_FIELDS + INT_FIELDS}
    optional["stop_token_ids"] = stop_token_ids()
    return st.fixed_dictionaries({}, optional=optional)


# ---- raw JSON ---------------------------------------------------------------------------------
RAW_EDGES = ["1e400", "-1e400", "-0.0", "-0", "0.0", "1E-400", "4.9e-324", "1e-320",
             "18446744073709551615", "18446744073709551616", "-9223372036854775809",
             "1" + "0" * 400, "NaN", "Infinity", "-Infinity", "1.0", "2", "-2", "16", "17",
             "20", "21", "true", "null", '"1"']


def raw_number() -> st.SearchStrategy[str]:
    """JSON text for one numeric field."""
    return st.one_of(st.sampled_from(RAW_EDGES), edge_numbers().map(json.dumps))


def raw_body(fields: dict[str, str]) -> str:
    """A JSON object from already-encoded values."""
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in fields.items()) + "}"


def _no_constants(name: str) -> None:
    raise ValueError(f"the response holds {name}, which is not JSON")


def strict_json(text: str) -> Any:
    """json.loads that refuses NaN, Infinity and -Infinity (Python writes them, JSON has none)."""
    return json.loads(text, parse_constant=_no_constants)


def check_logprob(value: float, where: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value) and value <= 0, \
        f"{where}: logprob {value!r}"
