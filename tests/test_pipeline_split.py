"""Pipeline splits without Ray: every stage in-process, several microbatches in flight.

The in-process executor runs the same stage workers, layer ranges and incremental messages as the
Ray executor, so these tests pin the split and the scheduler's in-flight logic cheaply.
"""

from __future__ import annotations

import itertools

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


def test_balanced_layer_partition_weighs_the_lm_head():
    from engine_core.config import balanced_layer_partition

    assert balanced_layer_partition(8, 2, 0.0) == (4, 4)  # no head cost: the even split
    assert balanced_layer_partition(5, 2, 0.0) == (3, 2)  # leftover to the first stage
    assert balanced_layer_partition(8, 2, 1.9) == (5, 3)  # the benchmark model's head
    assert balanced_layer_partition(16, 2, 4.3) == (10, 6)  # Llama-3.2-1B's
    assert balanced_layer_partition(4, 4, 9.0) == (1, 1, 1, 1)  # every stage keeps a layer
    for layers, stages, extra in [(7, 3, 0.5), (32, 4, 4.3), (9, 9, 1.0), (24, 6, 2.5)]:
        part = balanced_layer_partition(layers, stages, extra)
        assert len(part) == stages and sum(part) == layers and min(part) >= 1
        # the busiest stage is as light as in the best of every possible split
        splits = [tuple(b - a for a, b in zip((0, *cuts), (*cuts, layers)))
                  for cuts in itertools.combinations(range(1, layers), stages - 1)]
        best = min(max(*c[:-1], c[-1] + extra) for c in splits)
        assert max(*part[:-1], part[-1] + extra) == best
        with pytest.raises(ValueError):
            balanced_layer_partition(stages - 1, stages, extra)


def test_default_partition_is_cost_balanced(checkpoint_factory):
    from engine_core.config import EngineArgs

    # vocab 32000 x hidden 64 is ~14 layers of this tiny model: the last stage keeps one layer
    model_dir = checkpoint_factory("llama", num_hidden_layers=6, vocab_size=32000)
    config = EngineArgs(model_dir, pipeline_parallel_size=2).resolve()
    assert config.parallel.layer_ranges(6) == [(0, 5), (5, 6)]
    explicit = EngineArgs(model_dir, pipeline_parallel_size=2, pp_layer_partition="3,3").resolve()
    assert explicit.parallel.layer_ranges(6) == [(0, 3), (3, 6)]
