"""`LLM(engine_process=True)`: the engine core in its own process behind the ZMQ client."""

from __future__ import annotations

import os
import signal
import time

import pytest

from engine_core import LLM, SamplingParams
from tests.text_checkpoint import add_tokenizer


@pytest.fixture(scope="module")
def text_model(checkpoint_factory, tmp_path_factory):
    return add_tokenizer(checkpoint_factory("llama"), str(tmp_path_factory.mktemp("proc-tok")))


def test_same_outputs_as_in_process(text_model):
    prompts = ["def hello(world):", "import json\n", {"prompt_token_ids": [1, 9, 8, 7]}]
    params = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=10, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=12, stop=["e"])]
    local = LLM(text_model, dtype="float32")
    expected = local.generate(prompts, params, use_tqdm=False)
    local.shutdown()
    for transport in ("ipc", "tcp"):
        remote = LLM(text_model, dtype="float32", engine_process=True, engine_transport=transport,
                     insecure_tcp=True)
        got = remote.generate(prompts, params, use_tqdm=False)
        again = remote.generate(prompts, params, use_tqdm=False)  # engine state stays sound
        remote.shutdown()
        for a, b, c in zip(expected, got, again):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
            assert a.outputs[0].text == b.outputs[0].text
            assert a.outputs[0].finish_reason == b.outputs[0].finish_reason


def test_startup_error_is_a_value_error(text_model):
    with pytest.raises(ValueError, match="KV cache"):
        LLM(text_model, dtype="float32", engine_process=True, num_kv_blocks=3)


def test_dead_engine_process_raises_quickly(text_model):
    llm = LLM(text_model, dtype="float32", engine_process=True)
    pid = llm.engine.engine_states()[0].pid
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="engine-core process died"):
        llm.generate("def f(x):", SamplingParams(max_tokens=200, ignore_eos=True),
                     use_tqdm=False)
    assert time.monotonic() - start < 10
    llm.shutdown()


def test_step_waits_at_most_the_step_timeout(text_model):
    llm = LLM(text_model, dtype="float32", engine_process=True)
    try:
        llm.engine.step_timeout_s = 0.5
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="no output"):
            llm.engine.step()  # an idle engine sends nothing: the wait ends, it does not hang
        assert time.monotonic() - start < 5
        out = llm.generate("def f(x):", SamplingParams(max_tokens=4, ignore_eos=True),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4  # the client goes on working
    finally:
        llm.shutdown()
