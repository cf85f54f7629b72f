"""Data parallelism: N engine cores behind one front-end (issue 9), offline and served, local
and headless over tcp with CurveZMQ keys."""

from __future__ import annotations

import os
import time

import pytest

from engine_core import LLM, SamplingParams
from engine_core.messages import EngineCoreRequest
from tests.text_checkpoint import add_tokenizer


@pytest.fixture(scope="module")
def text_model(checkpoint_factory, tmp_path_factory):
    return add_tokenizer(checkpoint_factory("llama"), str(tmp_path_factory.mktemp("dp-tok")))


def _gone(pid: int, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie of ours counts as gone
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


PROMPTS = [f"def f{i}(x):" + " return x" * (i % 3) for i in range(16)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_offline_dp2_matches_dp1_and_balances(text_model):
    single = LLM(text_model, dtype="float32")
    expected = single.generate(PROMPTS, GREEDY, use_tqdm=False)
    single.shutdown()
    llm = LLM(text_model, dtype="float32", data_parallel_size=2)
    pids = [s.pid for s in llm.engine.engine_states()]
    try:
        got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        for a, b in zip(expected, got):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            assert a.outputs[0].text == b.outputs[0].text
        routed = [s.num_routed for s in llm.engine.engine_states()]
        assert sum(routed) == len(PROMPTS)
        assert min(routed) >= 0.8 * max(routed), routed  # within ~20 %
        # n > 1: every sequence of one request goes to one engine
        before = [s.num_routed for s in llm.engine.engine_states()]
        out = llm.generate("def g(y):", SamplingParams(n=3, temperature=0.8, seed=1,
                                                        max_tokens=4), use_tqdm=False)
        assert len(out[0].outputs) == 3
        grown = [s.num_routed - b for s, b in zip(llm.engine.engine_states(), before)]
        assert sorted(grown) == [0, 3]
    finally:
        llm.shutdown()
    assert all(_gone(pid) for pid in pids)


def _step_until(client, condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition(client.engine_states()):
        assert time.monotonic() < deadline, client.engine_states()
        client.step()


def test_offline_abort_reaches_the_owning_engine(text_model):
    llm = LLM(text_model, dtype="float32", data_parallel_size=2)
    client = llm.engine
    try:
        params = SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True)
        for i in range(2):
            client.add_requests([EngineCoreRequest(f"r{i}", [1, 5, 9, 7] * 8, params)])
        owners = [client.client.owner_of(f"r{i}") for i in range(2)]
        assert sorted(owners) == [0, 1]
        _step_until(client, lambda states: all(s.stats.num_running == 1 for s in states))
        client.abort_requests(["r0"])
        # r0's engine frees every block; the other keeps running r1
        _step_until(client, lambda states: states[owners[0]].stats.num_running == 0
                    and states[owners[0]].stats.num_free_blocks
                    == states[owners[0]].stats.num_total_blocks)
        assert client.engine_states()[owners[1]].stats.num_running == 1
        client.abort_requests(["r1"])
        _step_until(client, lambda states: all(
            s.stats.num_running == 0 and s.stats.num_free_blocks == s.stats.num_total_blocks
            for s in states))
        assert not client.has_unfinished_requests()
    finally:
        llm.shutdown()
