"""Fair share end to end on a real tiny model: a small request sent while a giant one (several
prompts x n sequences, one user request) holds every seat gets its first token within a few
engine steps, by preempting the giant's sequences, and every sequence of both still matches
transformers' greedy output token for token (float32)."""

from __future__ import annotations

import random

import pytest

from engine_core import LLM, SamplingParams
from tests.test_generate_parity import hf_greedy

MAX_TOKENS = 24
GIANT_N = 4


@pytest.fixture(scope="module")
def case(checkpoint_factory):
    model_dir = checkpoint_factory("llama")
    rng = random.Random(7)
    giant = [[rng.randrange(3, 512) for _ in range(n)] for n in (20, 37, 9)]
    small = [rng.randrange(3, 512) for _ in range(13)]
    return model_dir, giant, small, hf_greedy(model_dir, [*giant, small], MAX_TOKENS)


def run_giant_then_small(llm: LLM, giant: list[list[int]], small: list[int]
                         ) -> tuple[dict[str, list[list[int]]], int]:
    """Drive the engine by hand: the giant's prompts (one owner), steps until it holds every
    seat, then the small request. Returns each request's sequences' token ids and how many
    steps the small one waited for its first token."""
    engine, processor = llm.engine, llm.processor
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)

    def submit(request_id: str, prompt: list[int], params: SamplingParams,
               owner_id: str = "") -> None:
        request = llm.input_processor.process(prompt, params)
        core = llm.input_processor.make_requests(request_id, request, arrival_time=0.0,
                                                 owner_id=owner_id)
        processor.add_request(request_id, None, core)
        engine.add_requests(core)

    for i, prompt in enumerate(giant):
        submit(f"giant-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                    n=GIANT_N), owner_id="giant")
    finished: dict[str, list[list[int]]] = {}

    def step() -> set[str]:
        changed, to_abort = processor.process(engine.step())
        assert not to_abort
        for output in changed:
            if output.finished:
                finished[output.request_id] = [c.token_ids for c in output.outputs]
        return {o.request_id for o in changed}

    for _ in range(3):
        step()
    scheduler = engine.scheduler
    assert scheduler.num_running == llm.config.scheduler.max_num_seqs
    submit("small", small, params)
    wait = 0
    while "small" not in step():
        wait += 1
    while engine.has_unfinished_requests():
        step()
    return finished, wait


@pytest.mark.parametrize("engine_kwargs", [
    {},
    {"pipeline_parallel_size": 2, "distributed_executor_backend": "inprocess"},  # 2 in flight
    {"num_kv_blocks": 12},  # blocks run short too: the running ones preempt as well
], ids=["one-batch", "two-in-flight", "few-blocks"])
def test_small_request_behind_a_giant_is_fast_and_every_sequence_exact(case, engine_kwargs):
    model_dir, giant, small, expected = case
    waits = {}
    for fair_share in (True, False):
        llm = LLM(model_dir, dtype="float32", max_model_len=128, max_num_seqs=6,
                  fair_share=fair_share, **engine_kwargs)
        try:
            finished, waits[fair_share] = run_giant_then_small(llm, giant, small)
            for i, reference in enumerate(expected[:-1]):
                assert finished[f"giant-{i}"] == [reference] * GIANT_N
            assert finished["small"] == [expected[-1]]
            if fair_share:
                assert llm.engine.scheduler.num_preemptions >= 1
            bm = llm.engine.block_manager
            assert bm.num_free_blocks == bm.num_usable_blocks
        finally:
            llm.shutdown()
    assert waits[True] <= 2  # its first token within a couple of engine steps
    assert waits[False] >= MAX_TOKENS  # FCFS: behind the giant's sequences

