"""SamplingParams: vLLM defaults, every validation rule, normalisation, msgpack round trips."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine_core.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, 0, 0.0, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.stop, p.stop_token_ids, p.max_tokens, p.min_tokens) == (None, None, 16, 0)
    assert (p.ignore_eos, p.logprobs) == (False, None)
    assert (p.skip_special_tokens, p.include_stop_str_in_output) == (True, False)
    assert not p.greedy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be >= 1, got 0"),
        ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
        ({"temperature": math.nan}, "temperature must be finite"),
        ({"temperature": math.inf}, "temperature must be finite"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.01}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be -1 .* or >= 0, got -2"),
        ({"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
        ({"presence_penalty": -2.5}, r"presence_penalty must be in \[-2, 2\]"),
        ({"presence_penalty": 2.01}, r"presence_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": -2.01}, r"frequency_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": 3}, r"frequency_penalty must be in \[-2, 2\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"repetition_penalty": -1.0}, "repetition_penalty must be > 0"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"min_tokens": -1}, "min_tokens must be >= 0"),
        ({"min_tokens": 5, "max_tokens": 4}, r"min_tokens must be <= max_tokens \(4\), got 5"),
        ({"logprobs": -1}, "logprobs must be >= 0"),
        ({"seed": True}, "seed must be an int"),
        ({"seed": 1.5}, "seed must be an int"),
        ({"stop_token_ids": [1, -1]}, r"stop_token_ids must hold token ids .*, got -1"),
        ({"stop_token_ids": [True]}, "stop_token_ids must hold token ids"),
        ({"stop_token_ids": 3}, "stop_token_ids must be a list of ints"),
        ({"stop": ""}, "stop must hold non-empty strings"),
        ({"stop": ["a", ""]}, "stop must hold non-empty strings"),
        ({"stop": ["a", 1]}, "stop must hold non-empty strings"),
        ({"stop": 7}, "stop must be a string or a list of strings"),
        # Wrong types: bools are not numbers, strings are not numbers, floats are not ints.
        ({"temperature": "hot"}, "temperature must be a number, got 'hot'"),
        ({"top_p": True}, "top_p must be a number"),
        ({"min_p": None}, "min_p must be a number"),
        ({"repetition_penalty": "1"}, "repetition_penalty must be a number"),
        ({"presence_penalty": False}, "presence_penalty must be a number"),
        ({"frequency_penalty": [0.1]}, "frequency_penalty must be a number"),
        ({"n": 2.0}, "n must be an int"),
        ({"n": True}, "n must be an int"),
        ({"top_k": 1.0}, "top_k must be an int"),
        ({"max_tokens": "16"}, "max_tokens must be an int"),
        ({"min_tokens": None}, "min_tokens must be an int"),
        ({"logprobs": True}, "logprobs must be an int"),
        ({"ignore_eos": 1}, "ignore_eos must be a bool"),
        ({"skip_special_tokens": None}, "skip_special_tokens must be a bool"),
        ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output must be a bool"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"temperature": 0},  # ints are fine in float fields
        {"top_p": 1},
        {"top_p": 1e-6},
        {"top_k": 1},
        {"min_p": 0},
        {"min_p": 1.0},
        {"presence_penalty": -2, "frequency_penalty": 2},
        {"repetition_penalty": 1e-3},
        {"max_tokens": 1, "min_tokens": 1},
        {"max_tokens": None, "min_tokens": 10_000},
        {"logprobs": 0},
        {"logprobs": MAX_LOGPROBS},
        {"logprobs": MAX_LOGPROBS + 1},  # the engine's max_logprobs limits it (validation.py)
        {"seed": 0},
        {"seed": -(2**63)},
        {"seed": 2**64 - 1},
        {"stop_token_ids": []},
        {"stop": []},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict) -> None:
    SamplingParams(**kwargs)


def test_normalisation() -> None:
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    p = SamplingParams(temperature=0, top_p=1, repetition_penalty=2)
    assert isinstance(p.temperature, float) and p.temperature == 0.0
    assert isinstance(p.top_p, float) and isinstance(p.repetition_penalty, float)


def test_greedy() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=9e-6).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    assert not SamplingParams(temperature=0.7).greedy


def test_msgpack_round_trip_and_omitted_defaults() -> None:
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(SamplingParams())) == {}
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(SamplingParams(n=2))) == {"n": 2}
    p = SamplingParams(temperature=0.7, top_k=-1, stop="x", seed=5, logprobs=2, max_tokens=None)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams)
    assert decoded == p
    assert decoded.top_k == 0 and decoded.stop == ["x"] and decoded.max_tokens is None


def test_decoding_runs_validation() -> None:
    payload = msgspec.msgpack.encode({"temperature": -1.0})
    with pytest.raises(msgspec.ValidationError, match="temperature must be >= 0"):
        msgspec.msgpack.decode(payload, type=SamplingParams)
    payload = msgspec.msgpack.encode({"temperature": "hot"})
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(payload, type=SamplingParams)


valid_params = st.builds(
    SamplingParams,
    n=st.integers(1, 8),
    temperature=st.floats(0, 5),
    top_p=st.floats(1e-3, 1),
    top_k=st.integers(-1, 100),
    min_p=st.floats(0, 1),
    seed=st.none() | st.integers(-(2**63), 2**64 - 1),
    presence_penalty=st.floats(-2, 2),
    frequency_penalty=st.floats(-2, 2),
    repetition_penalty=st.floats(0.01, 5),
    stop=st.none() | st.text(min_size=1) | st.lists(st.text(min_size=1), max_size=3),
    stop_token_ids=st.none() | st.lists(st.integers(0, 200_000), max_size=4),
    max_tokens=st.none() | st.integers(50, 4096),
    min_tokens=st.integers(0, 50),
    logprobs=st.none() | st.integers(0, MAX_LOGPROBS),
    ignore_eos=st.booleans(),
)


@given(valid_params)
def test_valid_params_round_trip(p: SamplingParams) -> None:
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams)
    assert decoded == p
    assert decoded.top_k >= 0
    assert decoded.stop is None or isinstance(decoded.stop, list)
