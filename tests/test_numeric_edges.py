"""No valid request can kill the engine (issue 18), offline: property tests over every numeric
field of SamplingParams (and stop_token_ids) with edge-heavy values, in process and at PP=2.

Property: `SamplingParams(**kwargs)` and `generate` either raise ValueError or return
well-formed results (token ids in the vocabulary, finite logprobs <= 0, finish_reason stop or
length, never "error"); afterwards every KV block is free and a greedy request gives what it
gave before. An engine that died is rebuilt so the next example is judged on its own.
The served paths are in tests/test_numeric_edges_served.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings

from engine_core import LLM, SamplingParams
from engine_core.validation import MAX_N
from tests.numeric_edges import (
    EXTREME_PENALTIES,
    TINY_TOP_P,
    VOCAB,
    check_logprob,
    sampling_kwargs,
)

PROMPT = {"prompt_token_ids": [1, 17, 42, 99, 7]}
MAX_MODEL_LEN = 24  # bounds every request: max_tokens None runs to the end of the context
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
RUN_N = 3  # larger n are validated but not run (time)

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


class Engine:
    """One LLM for a module, rebuilt when an example killed it."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.llm = self._build()
        self.greedy = self.llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids

    def _build(self) -> LLM:
        return LLM(**self.kwargs, dtype="float32", max_model_len=MAX_MODEL_LEN)

    def rebuild(self) -> None:
        self.llm.shutdown()
        self.llm = self._build()

    def close(self) -> None:
        self.llm.shutdown()


def _check_output(llm: LLM, params: SamplingParams, outputs) -> None:
    (output,) = outputs
    assert len(output.outputs) == params.n
    for completion in output.outputs:
        assert completion.finish_reason in ("stop", "length"), (
            completion.finish_reason, completion.error)
        assert all(0 <= t < VOCAB for t in completion.token_ids), completion.token_ids
        assert len(completion.token_ids) <= MAX_MODEL_LEN - len(PROMPT["prompt_token_ids"])
        if params.max_tokens is not None:
            assert len(completion.token_ids) <= params.max_tokens
        if params.logprobs is None:
            continue
        assert completion.logprobs is not None
        assert len(completion.logprobs) == len(completion.token_ids)
        for i, entry in enumerate(completion.logprobs):
            assert completion.token_ids[i] in entry
            assert len(entry) <= params.logprobs + 1
            for token_id, logprob in entry.items():
                assert 0 <= token_id < VOCAB
                check_logprob(logprob.logprob, f"token {i}")


def _sound(engine: Engine) -> None:
    """Every KV block free, and greedy output as before."""
    manager = engine.llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_usable_blocks
    again = engine.llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert again == engine.greedy


def run_property(engine: Engine, kwargs: dict[str, Any]) -> None:
    try:
        params = SamplingParams(**kwargs)
    except ValueError:
        return
    if params.n > MAX_N:  # refused before any request starts
        with pytest.raises(ValueError, match=r"^n must be <= "):
            engine.llm.generate(PROMPT, params, use_tqdm=False)
        return
    if params.n > RUN_N:
        return  # valid, but too slow to run here
    try:
        outputs = engine.llm.generate(PROMPT, params, use_tqdm=False)
    except ValueError:
        _sound(engine)
        return
    except BaseException:
        engine.rebuild()  # judge the next example on a live engine
        raise
    _check_output(engine.llm, params, outputs)
    _sound(engine)


@pytest.fixture(scope="module")
def engine(checkpoint_factory):
    e = Engine(model=checkpoint_factory("llama"))
    yield e
    e.close()


@settings(max_examples=60, **SETTINGS)
@given(kwargs=sampling_kwargs())
@example(kwargs={**TINY_TOP_P, "max_tokens": 4})
@example(kwargs={**EXTREME_PENALTIES, "max_tokens": 4})
@example(kwargs={**TINY_TOP_P, **EXTREME_PENALTIES, "temperature": 5e-324, "top_k": 2**63,
                 "min_p": 1.0, "seed": 2**64 - 1, "logprobs": 20, "n": 2, "max_tokens": 3})
@example(kwargs={"temperature": 3.5e38, "seed": -(2**63), "logprobs": 0, "max_tokens": 3})
@example(kwargs={"top_k": 2**31, "min_p": 5e-324, "repetition_penalty": 3.4028235e38,
                 "max_tokens": 3, "min_tokens": 3})
def test_offline_any_sampling_params_leave_the_engine_sound(engine, kwargs):
    run_property(engine, kwargs)


@pytest.fixture(scope="module")
def pp_engine(checkpoint_factory):
    e = Engine(model=checkpoint_factory("llama"), pipeline_parallel_size=2,
               distributed_executor_backend="inprocess")
    yield e
    e.close()


@settings(max_examples=20, **SETTINGS)
@given(kwargs=sampling_kwargs())
@example(kwargs={**TINY_TOP_P, "max_tokens": 4})
@example(kwargs={**EXTREME_PENALTIES, "max_tokens": 4})
def test_pp2_any_sampling_params_leave_the_engine_sound(pp_engine, kwargs):
    run_property(pp_engine, kwargs)


def test_huge_n_is_refused_before_anything_starts(engine):
    for n in (MAX_N + 1, 2**31, 2**63):
        with pytest.raises(ValueError, match=r"^n must be <= "):
            engine.llm.generate(PROMPT, SamplingParams(n=n), use_tqdm=False)
    _sound(engine)


# ---- the response encoder ---------------------------------------------------------------------
def test_responses_never_hold_nan_or_infinity():
    """Whatever logprobs reach the server (the sampler promises finite ones), its bodies are
    JSON: NaN and -inf as -9999.0 (vLLM's convention), +inf as 0.0."""
    from engine_core.entrypoints.openai.responses import chat_logprobs, completion_logprobs
    from engine_core.entrypoints.openai.serving import _sse
    from engine_core.outputs import Logprob
    from tests.numeric_edges import strict_json

    values = [float("nan"), float("-inf"), float("inf"), -1e308, -0.0, 1e-9, -0.5]
    entries = [{7: Logprob(v, rank=1, decoded_token="a"), 8: Logprob(v, rank=2)}
               for v in values]
    ids = [7] * len(values)
    completion, _ = completion_logprobs(ids, entries, 0)
    chat = chat_logprobs(ids, entries, 2)
    for body in (completion, chat):
        decoded = strict_json(_sse(body).removeprefix("data: "))
        assert decoded == body
    assert completion["token_logprobs"] == [-9999.0, -9999.0, 0.0, -9999.0, -0.0, 0.0, -0.5]
    assert [c["logprob"] for c in chat["content"]] == completion["token_logprobs"]
    with pytest.raises(ValueError):
        _sse({"x": float("nan")})
