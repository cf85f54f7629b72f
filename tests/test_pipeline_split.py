"""Pipeline splits without Ray: every stage in-process, several microbatches in flight.

The in-process executor runs the same stage workers, layer ranges and incremental messages as the
Ray executor, so these tests pin the split and the scheduler's in-flight logic cheaply.
"""

from __future__ import annotations

import pytest

from tests.test_generate_parity import MAX_TOKENS, engine_greedy, hf_greedy, make_prompts


@pytest.fixture(scope="module")
def llama_case(checkpoint_factory):
    model_dir = checkpoint_factory("llama", num_hidden_layers=5)
    prompts = make_prompts(512)
    return model_dir, prompts, hf_greedy(model_dir, prompts, MAX_TOKENS)


@pytest.mark.parametrize("pp, partition", [(2, None), (3, None), (3, "1,3,1"), (5, None)])
def test_split_matches_transformers(llama_case, pp, partition):
    model_dir, prompts, expected = llama_case
    got, llm = engine_greedy(model_dir, prompts, MAX_TOKENS, pipeline_parallel_size=pp,
                             pp_layer_partition=partition, distributed_executor_backend="inprocess")
    ranges = [s.layer_range for s in llm.engine.executor.stages]
    llm.shutdown()
    assert len(ranges) == pp and ranges[0][0] == 0 and ranges[-1][1] == 5
    assert got == expected


@pytest.mark.parametrize("pipelined", [False, True])
def test_split_chunked_prefill_preemption(llama_case, pipelined):
    model_dir, prompts, expected = llama_case
    got, llm = engine_greedy(model_dir, prompts, MAX_TOKENS, pipeline_parallel_size=2,
                             distributed_executor_backend="inprocess", max_num_batched_tokens=64,
                             max_model_len=400, num_kv_blocks=26,
                             pipelined_chunked_prefill=pipelined)
    preemptions = llm.engine.scheduler.num_preemptions
    llm.shutdown()
    assert preemptions > 0
    assert got == expected


def test_default_split_keeps_leftovers_off_last_stage(checkpoint_factory):
    from engine_core.config import ParallelConfig

    assert ParallelConfig(3).layer_ranges(8) == [(0, 3), (3, 6), (6, 8)]
    assert ParallelConfig(2, (3, 2)).layer_ranges(5) == [(0, 3), (3, 5)]
    assert ParallelConfig(4).layer_ranges(4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
