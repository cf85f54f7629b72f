"""Per-request state is let go when a request ends (issue 18): after many requests, finished,
stopped by a stop string, n > 1 or abandoned mid-stream, every per-request table of the
front-end, the client and the engine core is empty (or bounded) and Python object counts do
not grow from one round to the next."""

from __future__ import annotations

import asyncio
import gc
import random

import pytest
from engine_core.models import default_model_dir

from engine_core import LLM, SamplingParams
from engine_core.config import EngineArgs
from engine_core.entrypoints.async_llm import AsyncLLM

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:", "for i in range(10):"]


def _params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        max_tokens=rng.randint(4, 24), temperature=rng.choice([0.0, 0.8]),
        n=rng.choice([1, 1, 2]), stop=rng.choice([None, ["\n"], [":", "("]]),
        repetition_penalty=rng.choice([1.0, 1.2]), logprobs=rng.choice([None, 2]))


def _num_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


def test_offline_requests_leave_no_state_behind():
    llm = LLM(default_model_dir(), num_kv_blocks=600, max_model_len=256, max_num_seqs=16)
    rng = random.Random(0)
    try:
        counts = []
        for _ in range(4):
            prompts = [rng.choice(PROMPTS) for _ in range(24)]
            llm.generate(prompts, [_params(rng) for _ in prompts], use_tqdm=False)
            engine = llm.engine
            assert not llm.processor._requests and not llm.processor._sequence_owner
            assert not engine.scheduler.requests and not engine.has_unfinished_requests()
            assert not engine.block_manager._requests
            assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
            # the stages forget finished requests with the next batch: bounded by one round
            assert len(engine.executor.stages[0].requests) <= 16 * 2
            counts.append(_num_objects())
        assert counts[-1] - counts[1] < 500, counts  # round 0 warms caches up
    finally:
        llm.shutdown()


async def _one(llm: AsyncLLM, rng: random.Random, index: int) -> None:
    leave_after = rng.randint(1, 3) if index % 3 == 0 else None
    stream = llm.generate(rng.choice(PROMPTS), _params(rng), f"r{index}")
    seen = 0
    async for _ in stream:
        seen += 1
        if leave_after is not None and seen >= leave_after:
            break  # a client that went away mid-stream
    await stream.aclose()


async def _rounds(num_rounds: int) -> tuple[list[int], list[int]]:
    llm = await AsyncLLM.create(EngineArgs(model=default_model_dir(), num_kv_blocks=600,
                                           max_model_len=256, max_num_seqs=16))
    rng = random.Random(1)
    counts, tasks = [], []
    try:
        for round_index in range(num_rounds):
            await asyncio.gather(*(_one(llm, rng, round_index * 100 + i) for i in range(30)))
            # the aborts reach the engine core; its next stats say it is idle
            await asyncio.wait_for(_idle(llm), 60)
            assert not llm._streams
            assert not llm.processor._requests and not llm.processor._sequence_owner
            assert not llm.client.has_unfinished_requests()
            counts.append(_num_objects())
            tasks.append(len(asyncio.all_tasks()))
    finally:
        llm.shutdown()
    return counts, tasks


async def _idle(llm: AsyncLLM) -> None:
    # one more request: stats come with outputs, so its finish shows the core's state after it
    while True:
        async for _ in llm.generate("x", SamplingParams(max_tokens=1)):
            pass
        s = llm.stats
        if s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks:
            return
        await asyncio.sleep(0.1)


@pytest.mark.timeout(300)
def test_served_requests_leave_no_state_behind():
    counts, tasks = asyncio.run(_rounds(4))
    assert counts[-1] - counts[1] < 500, counts
    assert tasks[-1] <= tasks[0] + 1, tasks  # no task left per request
