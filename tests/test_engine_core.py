"""The engine loop (`EngineCore`) over a fake executor whose steps the test controls: no model,
no device, no threads.

The fake stage samples one token for every request of a step that reached the end of its known
tokens, as a last pipeline stage does, and each of its futures can be told to resolve, to raise,
or never to resolve (then `result(timeout)` raises TimeoutError once `timeout` has passed: only
tests with a tiny `step_timeout_s` use that). Each test checks what the loop promises: how many
steps it keeps in flight, that outputs are applied in submission order, that an abort waits for
the request's step in flight and ignores its late output, that a failed or timed-out step kills
the engine, that a stall is named, and that every KV block comes back.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import pytest
from engine_core.models import ModelConfig

from engine_core.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from engine_core.engine import EngineCore
from engine_core.executor import Executor
from engine_core.messages import (
    EngineCoreOutput,
    EngineCoreRequest,
    SampledToken,
    StepBatch,
    StepOutput,
)
from engine_core.sampling_params import SamplingParams

BLOCK = 4
VOCAB = 32
TOKEN = 7  # what the fake stage samples (no EOS is configured: requests end by max_tokens)


def make_config(num_kv_blocks: int = 33, max_model_len: int = 32, concurrent: int = 1,
                max_num_seqs: int = 8) -> EngineConfig:
    model = ModelConfig(
        architecture="LlamaForCausalLM", model_type="llama", vocab_size=VOCAB, hidden_size=8,
        num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=16,
        rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
        max_position_embeddings=max_model_len, tie_word_embeddings=False, qkv_bias=False,
        o_bias=False, mlp_bias=False, qk_norm=False, sliding_window=None, eos_token_ids=(),
        bos_token_id=None, torch_dtype=None)
    return EngineConfig(
        model_dir="fake", model=model, dtype="float32", device="cpu", seed=0,
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64,
                                  max_model_len=max_model_len,
                                  max_concurrent_batches=concurrent),
        cache=CacheConfig(block_size=BLOCK, num_kv_blocks=num_kv_blocks),
        parallel=ParallelConfig())


# ---- the fake executor ------------------------------------------------------------------------
@dataclass
class FakeStep:
    """A `StepFuture` whose outcome was fixed when its batch was submitted: its output, an
    exception to raise, or nothing ever (`hang`)."""

    batch: StepBatch
    output: StepOutput
    stage: FakeStage
    error: BaseException | None = None
    hang: bool = False
    interrupt: bool = False  # the first wait is interrupted (KeyboardInterrupt), then resolves
    waits: list[float | None] = field(default_factory=list)  # the timeout of each result()

    def result(self, timeout: float | None = None) -> StepOutput:
        self.waits.append(timeout)
        self.stage.waited.append((self.batch.step_id, len(self.stage.unfinished())))
        if self.hang:
            assert timeout is not None, "the engine waited on a step without a timeout"
            threading.Event().wait(timeout)  # never set: as long as the engine allows
            raise TimeoutError(f"step {self.batch.step_id} gave no output in {timeout} s")
        if self.error is not None:
            raise self.error
        if self.interrupt:
            self.interrupt = False
            raise KeyboardInterrupt
        self.stage.finished.add(self.batch.step_id)
        return self.output


class FakeStage(Executor):
    """Runs nothing: samples TOKEN for every request of a step that reached the end of the
    tokens the stage knows of it, as the last pipeline stage does. `plan` holds what the next
    submitted steps do ("ok", "hang", "interrupt" or an exception); an empty plan means "ok"."""

    def __init__(self, num_kv_blocks: int) -> None:
        self.num_kv_blocks = num_kv_blocks
        self.plan: deque[str | BaseException] = deque()
        self.steps: list[FakeStep] = []
        self.finished: set[int] = set()  # step ids whose output the engine took
        self.waited: list[tuple[int, int]] = []  # (step id, steps unfinished) at each wait
        self.known_tokens: dict[str, int] = {}  # request id -> tokens the stage has seen
        self.num_shutdowns = 0

    def submit(self, batch: StepBatch) -> FakeStep:
        for request_id in batch.finished_request_ids:
            self.known_tokens.pop(request_id, None)
        request_ids = []
        for new in batch.new_requests:
            self.known_tokens[new.request_id] = len(new.prompt_token_ids) + len(
                new.output_token_ids)
            if new.num_computed_tokens + new.num_new_tokens == self.known_tokens[new.request_id]:
                request_ids.append(new.request_id)
        for cached in batch.cached_requests:
            self.known_tokens[cached.request_id] += len(cached.new_token_ids)
            if (cached.num_computed_tokens + cached.num_new_tokens
                    == self.known_tokens[cached.request_id]):
                request_ids.append(cached.request_id)
        output = StepOutput(batch.step_id, request_ids, [SampledToken(TOKEN) for _ in request_ids])
        step = FakeStep(batch, output, self)
        behaviour = self.plan.popleft() if self.plan else "ok"
        if behaviour == "hang":
            step.hang = True
        elif behaviour == "interrupt":
            step.interrupt = True
        elif isinstance(behaviour, BaseException):
            step.error = behaviour
        self.steps.append(step)
        return step

    def unfinished(self) -> list[int]:
        """Step ids submitted and not yet returned to the engine."""
        return [s.batch.step_id for s in self.steps if s.batch.step_id not in self.finished]

    def shutdown(self) -> None:
        self.num_shutdowns += 1


def request_ids_of(batch: StepBatch) -> list[str]:
    return ([r.request_id for r in batch.new_requests]
            + [r.request_id for r in batch.cached_requests])


def make_engine(step_timeout_s: float = 30.0, **config) -> tuple[EngineCore, FakeStage]:
    engine_config = make_config(**config)
    num_kv_blocks = engine_config.cache.num_kv_blocks
    assert num_kv_blocks is not None
    stage = FakeStage(num_kv_blocks)
    return EngineCore(engine_config, stage, step_timeout_s=step_timeout_s), stage


def add(engine: EngineCore, request_id: str, prompt_len: int = 6, max_tokens: int = 4,
        first_token: int = 1) -> None:
    prompt = [(first_token + i) % VOCAB for i in range(prompt_len)]
    engine.add_request(EngineCoreRequest(request_id, prompt, SamplingParams(
        temperature=0.0, max_tokens=max_tokens)))


def all_blocks_free(engine: EngineCore) -> bool:
    blocks = engine.block_manager
    return blocks.num_free_blocks == blocks.num_usable_blocks


def run_to_end(engine: EngineCore, max_steps: int = 200) -> list[list[EngineCoreOutput]]:
    """Step until nothing is left; the outputs of each step."""
    per_step: list[list[EngineCoreOutput]] = []
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return per_step
        per_step.append(engine.step())
    raise AssertionError(f"still unfinished after {max_steps} steps")


# ---- several microbatches in flight -----------------------------------------------------------
def test_the_loop_fills_the_pipeline_before_waiting_and_applies_outputs_in_order():
    engine, stage = make_engine(concurrent=3)
    for request_id in "abc":
        add(engine, request_id, max_tokens=3)

    first = engine.step()
    # three steps submitted (one request each: the 1/3 share) before the first wait
    assert [request_ids_of(s.batch) for s in stage.steps] == [["a"], ["b"], ["c"]]
    assert stage.waited == [(0, 3)]
    assert [o.request_id for o in first] == ["a"]

    per_step = [first, *run_to_end(engine)]
    # waits follow submission order, and never with more than three steps outstanding
    assert [step_id for step_id, _ in stage.waited] == [s.batch.step_id for s in stage.steps]
    assert max(unfinished for _, unfinished in stage.waited) == 3
    # each call returns the outputs of exactly the oldest step, that is a, b, c in turn
    for outputs, step in zip(per_step, stage.steps):
        assert [o.request_id for o in outputs] == request_ids_of(step.batch)
    tokens: dict[str, list[int]] = {}
    for outputs in per_step:
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert tokens == {r: [TOKEN] * 3 for r in "abc"}
    finals = [o for outputs in per_step for o in outputs if o.finish_reason is not None]
    assert sorted((o.request_id, o.finish_reason) for o in finals) == \
        [("a", "length"), ("b", "length"), ("c", "length")]
    assert all(step.waits == [engine.step_timeout_s] for step in stage.steps)
    assert all_blocks_free(engine)
    assert stage.unfinished() == []


def test_one_batch_in_flight_waits_after_each_submit():
    engine, stage = make_engine(concurrent=1)
    for request_id in "ab":
        add(engine, request_id, max_tokens=2)
    run_to_end(engine)
    assert all(unfinished == 1 for _, unfinished in stage.waited)
    assert all_blocks_free(engine)


# ---- abort --------------------------------------------------------------------------------------
def test_an_abort_during_its_step_ends_the_request_ignores_its_late_output_and_frees_blocks():
    engine, stage = make_engine(concurrent=2)
    add(engine, "keep", max_tokens=4)
    add(engine, "gone", max_tokens=4)
    assert [o.request_id for o in engine.step()] == ["keep"]
    assert request_ids_of(stage.steps[1].batch) == ["gone"]
    assert stage.unfinished() == [1]  # "gone"'s step is in flight: its output has a token

    engine.abort_requests(["gone"])
    # the stages may still write its blocks: they stay allocated until its step is back
    assert engine.block_manager.block_ids("gone")
    assert "gone" in engine.scheduler.requests

    outputs = engine.step()  # finishes step 1, "gone"'s
    assert stage.waited[-1][0] == 1 and stage.steps[1].output.request_ids == ["gone"]
    assert all(o.request_id != "gone" for o in outputs)  # its late token is dropped
    assert "gone" not in engine.scheduler.requests
    assert engine.block_manager.block_ids("gone") == []
    assert engine.scheduler.num_running == 1

    rest = [o for outputs in run_to_end(engine) for o in outputs]
    assert all(o.request_id == "keep" for o in rest)
    assert rest[-1].finish_reason == "length"
    # the stages were told the aborted request is finished, and no later step carries it
    later = stage.steps[2:]
    assert any("gone" in s.batch.finished_request_ids for s in later)
    assert all("gone" not in request_ids_of(s.batch) for s in later)
    assert all_blocks_free(engine)


def test_aborting_a_waiting_request_frees_nothing_it_never_had():
    engine, stage = make_engine(concurrent=1, max_num_seqs=1)
    add(engine, "first", max_tokens=2)
    add(engine, "queued", max_tokens=2)
    engine.step()
    assert engine.scheduler.num_waiting == 1
    engine.abort_requests(["queued"])
    assert engine.scheduler.num_waiting == 0
    run_to_end(engine)
    assert all("queued" not in request_ids_of(s.batch) for s in stage.steps)
    assert all_blocks_free(engine)


# ---- a failed step kills the engine -----------------------------------------------------------
def test_a_step_that_times_out_kills_the_engine_and_returns_every_block():
    engine, stage = make_engine(step_timeout_s=0.01, concurrent=2)
    add(engine, "a")
    add(engine, "b")
    stage.plan.extend(["hang"])
    with pytest.raises(RuntimeError, match=r"no output in 0\.01 s"):
        engine.step()
    assert stage.steps[0].waits == [0.01]
    assert len(stage.steps) == 2  # the second step was in flight too: its blocks come back
    assert isinstance(engine.error, TimeoutError)
    assert all_blocks_free(engine)
    assert not engine.has_unfinished_requests()
    with pytest.raises(RuntimeError, match="the engine has failed"):
        engine.step()
    assert len(stage.steps) == 2  # a dead engine submits nothing more
    engine.shutdown()
    assert stage.num_shutdowns == 1


def test_a_step_whose_future_raises_kills_the_engine_with_its_message():
    engine, stage = make_engine(concurrent=2)
    add(engine, "a", max_tokens=8)
    add(engine, "b", max_tokens=8)
    stage.plan.extend(["ok", RuntimeError("pipeline stage 1 (rank 1) died")])
    assert [o.request_id for o in engine.step()] == ["a"]  # step 0 is fine
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_usable_blocks
    with pytest.raises(RuntimeError, match=r"pipeline stage 1 \(rank 1\) died"):
        engine.step()  # submits step 2 ("a" again), then waits on step 1, which raises
    assert len(stage.steps) == 3
    assert all_blocks_free(engine)  # step 2's blocks too, though it never came back
    assert engine.scheduler.requests == {}
    with pytest.raises(RuntimeError, match="pipeline stage 1"):
        engine.step()
    assert len(stage.steps) == 3


def test_a_malformed_step_output_kills_the_engine():
    engine, _ = make_engine()
    add(engine, "a")
    step = engine.executor.submit  # wrap: the stage answers for another step

    def wrong_step(batch: StepBatch) -> FakeStep:
        future = step(batch)
        future.output = StepOutput(batch.step_id + 5, [], [])
        return future

    engine.executor.submit = wrong_step
    with pytest.raises(RuntimeError, match=r"returned step 5 .* for step 0"):
        engine.step()
    assert all_blocks_free(engine)


def test_an_interrupted_wait_leaves_the_step_in_flight_and_the_engine_alive():
    engine, stage = make_engine()
    add(engine, "a", max_tokens=2)
    stage.plan.append("interrupt")
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    assert engine.error is None and len(engine.in_flight) == 1
    assert [o.new_token_ids for o in engine.step()] == [[TOKEN]]  # the same step, finished
    assert [w for w, _ in stage.waited] == [0, 0]
    run_to_end(engine)
    assert all_blocks_free(engine)


# ---- stall ------------------------------------------------------------------------------------
def test_a_stall_raises_naming_it():
    # 8 usable blocks of 4 tokens; 6 of them leak outside the scheduler (as a bug would): a
    # 12-token prompt needs 3, and nothing in flight will ever free one
    engine, stage = make_engine(num_kv_blocks=9, max_model_len=16)
    assert engine.block_manager.allocate("leak", [VOCAB - 1] * 24, 24, 0) is not None
    add(engine, "starved", prompt_len=12)
    with pytest.raises(RuntimeError, match="the scheduler can make no progress") as info:
        engine.step()
    assert "1 waiting" in str(info.value) and "2 free KV blocks" in str(info.value)
    assert stage.steps == []
    assert "starved" not in engine.scheduler.requests
    with pytest.raises(RuntimeError, match="the engine has failed"):
        engine.step()


def test_an_idle_engine_is_not_a_stall():
    engine, stage = make_engine()
    assert engine.step() == []
    assert engine.error is None and stage.steps == []


# ---- stats ------------------------------------------------------------------------------------
def test_stats_report_the_blocks_and_the_load():
    engine, _ = make_engine(num_kv_blocks=33, concurrent=1, max_num_seqs=1)
    idle = engine.stats()
    assert (idle.num_total_blocks, idle.num_free_blocks, idle.kv_usage) == (32, 32, 0.0)

    add(engine, "a", prompt_len=6, max_tokens=3)
    add(engine, "b", prompt_len=9, max_tokens=3, first_token=20)  # no prefix shared with "a"
    engine.step()  # "a" runs (one seat): 6 prompt tokens in 2 blocks
    busy = engine.stats()
    assert (busy.num_running, busy.num_waiting) == (1, 1)
    assert busy.num_free_blocks == 30 == engine.block_manager.num_free_blocks
    assert busy.kv_usage == pytest.approx(2 / 32)
    assert busy.num_prompt_tokens_computed == 6

    run_to_end(engine)
    done = engine.stats()
    assert (done.num_running, done.num_waiting) == (0, 0)
    assert (done.num_free_blocks, done.num_total_blocks, done.kv_usage) == (32, 32, 0.0)
    assert done.num_prompt_tokens_computed == 6 + 9


# ---- construction -----------------------------------------------------------------------------
def test_a_cache_too_small_for_one_request_is_refused_and_the_executor_shut_down():
    config = make_config(num_kv_blocks=4, max_model_len=32)  # 3 usable blocks, 8 needed
    stage = FakeStage(4)
    with pytest.raises(ValueError, match="max_model_len=32"):
        EngineCore(config, stage)
    assert stage.num_shutdowns == 1
