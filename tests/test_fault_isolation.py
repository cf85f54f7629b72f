"""One request's failure stays its own: planted faults in sampling and output processing,
requests invalid for the model, and interrupts (Ctrl-C) at every point of an engine step.

Each test checks that the other requests' greedy tokens equal a clean run's, that every KV block
is back in the pool, and that the engine serves again afterwards.
"""

from __future__ import annotations

import os
import signal

import pytest
from engine_core.executors.sampler import Sampler

from engine_core import LLM, SamplingParams
from engine_core.entrypoints.output_processor import OutputProcessor
from engine_core.messages import EngineCoreRequest
from tests.text_checkpoint import add_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = ["def hello(world):", "import json\n", "class Foo(object):"]
LONG_PROMPTS = [{"prompt_token_ids": [1 + (7 * i + 3 * j) % 200 for j in range(70)]}
                for i in range(3)]


@pytest.fixture(scope="module")
def text_model(checkpoint_factory, tmp_path_factory):
    return add_tokenizer(checkpoint_factory("llama"), str(tmp_path_factory.mktemp("fault-tok")))


@pytest.fixture(scope="module")
def reference(text_model):
    """Greedy tokens of a clean engine (prefix caching off) for PROMPTS and LONG_PROMPTS."""
    llm = LLM(text_model, dtype="float32", enable_prefix_caching=False)
    out = {key: [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
           for key, prompts in (("short", PROMPTS), ("long", LONG_PROMPTS))}
    llm.shutdown()
    return out


def assert_pool_free(llm: LLM) -> None:
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.requests and not engine.in_flight


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


# ---- per-request faults -----------------------------------------------------------------------
def test_sampling_fault_fails_only_its_request(text_model, reference, monkeypatch):
    real_call = Sampler.__call__

    def planted(self, logits, rows):
        if any(row.params.seed == 666 for row in rows):
            raise IndexError("planted sampling fault")
        return real_call(self, logits, rows)

    monkeypatch.setattr(Sampler, "__call__", planted)
    llm = LLM(text_model, dtype="float32")
    bad = SamplingParams(temperature=0.8, seed=666, max_tokens=12)
    outputs = llm.generate([*PROMPTS, "x = 1"], [GREEDY, GREEDY, GREEDY, bad], use_tqdm=False)
    assert tokens(outputs[:3]) == reference["short"]
    failed = outputs[3].outputs[0]
    assert failed.finish_reason == "error" and failed.token_ids == []
    assert "planted sampling fault" in failed.error
    assert_pool_free(llm)
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference["short"]
    llm.shutdown()


def test_output_processing_fault_fails_only_its_request(text_model, reference, monkeypatch):
    real_check = OutputProcessor._check_stop_strings

    def planted(self, seq):
        if seq.params.stop == ["BOOM"]:
            raise RuntimeError("planted detokenizer fault")
        return real_check(self, seq)

    monkeypatch.setattr(OutputProcessor, "_check_stop_strings", planted)
    llm = LLM(text_model, dtype="float32")
    bad = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True, stop=["BOOM"])
    outputs = llm.generate([*PROMPTS, "x = 1"], [GREEDY, GREEDY, GREEDY, bad], use_tqdm=False)
    assert tokens(outputs[:3]) == reference["short"]
    failed = outputs[3].outputs[0]
    assert failed.finish_reason == "error" and "planted detokenizer fault" in failed.error
    assert len(failed.token_ids) < 200  # aborted in the core, not run to its end
    assert_pool_free(llm)
    llm.shutdown()


def test_request_invalid_for_the_model_is_rejected_not_fatal(text_model, reference):
    """Defect 1 of issue 8: a stop token id outside the vocabulary with min_tokens used to crash
    the sampler (IndexError) and kill the engine for everyone."""
    llm = LLM(text_model, dtype="float32")
    vocab = llm.config.model.vocab_size
    with pytest.raises(ValueError, match="stop_token_ids must be token ids in"):
        llm.generate("x", SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[99999]))
    with pytest.raises(ValueError, match=r"sampling_params\[1\]: stop_token_ids"):
        llm.generate(["x", "y"], [GREEDY, SamplingParams(stop_token_ids=[vocab])])
    # The engine core re-checks what reaches it, whatever the front-end did.
    for bad in (EngineCoreRequest("r1", [1, 2], SamplingParams(stop_token_ids=[vocab])),
                EngineCoreRequest("r2", [1, vocab], SamplingParams()),
                EngineCoreRequest("r3", [1, 2], SamplingParams(), eos_token_ids=[-1]),
                EngineCoreRequest("", [1, 2], SamplingParams())):
        with pytest.raises(ValueError):
            llm.engine.add_request(bad)
    assert_pool_free(llm)
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference["short"]
    llm.shutdown()


def test_seeds_near_the_wire_limit_with_n(text_model):
    llm = LLM(text_model, dtype="float32")
    params = SamplingParams(n=3, temperature=0.9, seed=2**64 - 2, max_tokens=4)
    (out,) = llm.generate("x", params, use_tqdm=False)
    assert [len(c.token_ids) for c in out.outputs] == [4, 4, 4]
    llm.shutdown()


# ---- interrupts -------------------------------------------------------------------------------
class PlantedExecutor:
    """Wraps an executor; on submit number `at`, calls `action(inner, batch)` instead."""

    def __init__(self, inner, at: int, action) -> None:
        self.inner, self.at, self.action, self.calls = inner, at, action, 0
        self.num_kv_blocks = inner.num_kv_blocks

    def submit(self, batch):
        self.calls += 1
        if self.calls == self.at:
            return self.action(self.inner, batch)
        return self.inner.submit(batch)

    def shutdown(self) -> None:
        self.inner.shutdown()


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler, whatever the test runner installed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _sigint_then_submit(inner, batch):
    os.kill(os.getpid(), signal.SIGINT)  # delivered mid-step, as a Ctrl-C would be
    return inner.submit(batch)


def _interrupt_before_submit(inner, batch):
    raise KeyboardInterrupt  # a second Ctrl-C: the batch is scheduled but never runs


class _InterruptedFuture:
    def __init__(self, future) -> None:
        self.future, self.interrupted = future, False

    def result(self, timeout=None):
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        return self.future.result(timeout)


def _interrupt_while_waiting(inner, batch):
    return _InterruptedFuture(inner.submit(batch))


@pytest.mark.parametrize("pp", [1, 2])
def test_ctrl_c_mid_step_returns_every_block(text_model, reference, default_sigint, pp):
    """Defect 4 of issue 8: each Ctrl-C in generate used to leak blocks and in-flight records
    until the scheduler could make no progress."""
    llm = LLM(text_model, dtype="float32", pipeline_parallel_size=pp,
              distributed_executor_backend="inprocess", max_num_batched_tokens=32)
    engine = llm.engine
    for attempt in range(3):
        engine.executor = PlantedExecutor(engine.executor.inner if attempt else engine.executor,
                                          at=3 + attempt, action=_sigint_then_submit)
        with pytest.raises(KeyboardInterrupt):
            llm.generate(LONG_PROMPTS, GREEDY, use_tqdm=False)
        assert_pool_free(llm)
    engine.executor = engine.executor.inner
    assert tokens(llm.generate(LONG_PROMPTS, GREEDY, use_tqdm=False)) == reference["long"]
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference["short"]
    llm.shutdown()


@pytest.mark.parametrize("pp", [1, 2])
def test_interrupt_before_a_scheduled_batch_runs_leaves_no_stale_prefix_cache(
        text_model, reference, pp):
    """A batch allocated (and its full blocks hashed for the prefix cache) that never ran: its
    requests are aborted and its never-written blocks must not be hit by later requests."""
    llm = LLM(text_model, dtype="float32", pipeline_parallel_size=pp,
              distributed_executor_backend="inprocess", max_num_batched_tokens=32)
    engine = llm.engine
    inner = engine.executor
    engine.executor = PlantedExecutor(inner, at=2, action=_interrupt_before_submit)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(LONG_PROMPTS, GREEDY, use_tqdm=False)
    assert_pool_free(llm)
    engine.executor = inner
    assert tokens(llm.generate(LONG_PROMPTS, GREEDY, use_tqdm=False)) == reference["long"]
    llm.shutdown()


def test_interrupted_wait_keeps_the_step_in_flight(text_model, reference):
    """KeyboardInterrupt while waiting for a step's result: the step is finished by the next
    call, and requests that were not aborted complete exactly as in a clean run."""
    llm = LLM(text_model, dtype="float32", pipeline_parallel_size=2,
              distributed_executor_backend="inprocess", max_num_batched_tokens=32)
    engine = llm.engine
    inner = engine.executor
    engine.executor = PlantedExecutor(inner, at=4, action=_interrupt_while_waiting)
    requests = [EngineCoreRequest(f"r{i}", p["prompt_token_ids"], GREEDY)
                for i, p in enumerate(LONG_PROMPTS)]
    for request in requests:
        engine.add_request(request)
    got: dict[str, list[int]] = {r.request_id: [] for r in requests}
    interrupted = 0
    while engine.has_unfinished_requests():
        try:
            outputs = engine.step()
        except KeyboardInterrupt:
            interrupted += 1
            continue
        for out in outputs:
            got[out.request_id].extend(out.new_token_ids)
    assert interrupted == 1
    assert [got[r.request_id] for r in requests] == reference["long"]
    assert_pool_free(llm)
    llm.shutdown()


def test_ctrl_c_with_engine_process(text_model, reference, default_sigint):
    llm = LLM(text_model, dtype="float32", engine_process=True)
    real_step = llm.engine.step
    calls = []

    def step_with_sigint():
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step()

    llm.engine.step = step_with_sigint
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True),
                     use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference["short"]
    llm.shutdown()
