"""The Triton attention backend inside the engine: greedy generation matches transformers token
for token (float32) at PP = 1 and 2, plain, under chunked prefill, prefix caching and
preemption. Without a GPU the kernels run under Triton's interpreter (tests/conftest.py), so the
models and prompts are small."""

from __future__ import annotations

import random

import pytest

from engine_core import LLM, SamplingParams
from engine_core.config import EngineArgs, default_capture_sizes
from tests.test_generate_parity import hf_greedy, make_prompts

MAX_TOKENS = 10
LENGTHS = [1, 6, 19, 45]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def case(request, checkpoint_factory):
    """(model dir, prompts, transformers' greedy continuations): llama (GQA 2:1, head_dim 16),
    qwen3 (q/k norms, head_dim 32)."""
    model_dir = checkpoint_factory(request.param)
    prompts = make_prompts(512, LENGTHS, seed=5)
    return model_dir, prompts, hf_greedy(model_dir, prompts, MAX_TOKENS)


def _generate(model_dir: str, prompts: list[list[int]], **kwargs) -> tuple[list[list[int]], LLM]:
    llm = LLM(model_dir, dtype="float32", attention_backend="triton", **kwargs)
    assert llm.config.execution.attention_backend == "triton"
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs], llm


@pytest.mark.parametrize("pp", [1, 2])
def test_greedy_matches_transformers(case, pp):
    model_dir, prompts, expected = case
    got, llm = _generate(model_dir, prompts, pipeline_parallel_size=pp,
                         distributed_executor_backend="inprocess")
    llm.shutdown()
    assert got == expected


@pytest.mark.parametrize("pp", [1, 2])
def test_chunked_prefill_matches(case, pp):
    model_dir, prompts, expected = case
    # 16 tokens a step: the 45-token prompt takes three chunks, each over a cached prefix
    got, llm = _generate(model_dir, prompts, max_num_batched_tokens=16, pipeline_parallel_size=pp,
                         distributed_executor_backend="inprocess")
    llm.shutdown()
    assert got == expected


def test_preemption_matches(case):
    model_dir, prompts, expected = case
    # 64 tokens (8 blocks of 8) per request at most; the four need 15 blocks, there are 8
    got, llm = _generate(model_dir, prompts, max_model_len=64, block_size=8, num_kv_blocks=9,
                         max_num_batched_tokens=32)
    preemptions = llm.engine.scheduler.num_preemptions
    free_after = llm.engine.block_manager.num_free_blocks
    llm.shutdown()
    assert preemptions > 0
    assert free_after == 8
    assert got == expected


def test_prefix_caching_matches(checkpoint_factory):
    model_dir = checkpoint_factory("llama")
    rng = random.Random(2)
    shared = [rng.randrange(3, 512) for _ in range(35)]
    prompts = [shared + [rng.randrange(3, 512) for _ in range(n)] for n in (1, 7)]
    prompts.append(list(shared))  # a full hit up to the last token
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    llm = LLM(model_dir, dtype="float32", attention_backend="triton", block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    requests = [{"prompt_token_ids": p} for p in prompts]
    first = llm.generate(requests, params, use_tqdm=False)
    second = llm.generate(requests, params, use_tqdm=False)  # hits the first round's blocks
    llm.shutdown()
    assert [o.outputs[0].token_ids for o in first] == expected
    assert [o.outputs[0].token_ids for o in second] == expected
    assert all(o.num_cached_tokens >= 32 for o in second)


def test_backend_resolution(checkpoint_factory):
    model_dir = checkpoint_factory("llama")
    resolved = EngineArgs(model=model_dir).resolve().execution
    assert resolved.attention_backend == "torch"  # auto on a CPU
    assert resolved.cudagraph_capture_sizes == ()  # graphs need CUDA
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EngineArgs(model=model_dir, attention_backend="flash").resolve()
    with pytest.raises(ValueError, match="cudagraph_capture_sizes"):
        EngineArgs(model=model_dir, cudagraph_capture_sizes=(0, 4)).resolve()
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineArgs(model=model_dir, gpu_memory_utilization=1.5).resolve()


def test_triton_on_cpu_needs_the_interpreter(checkpoint_factory, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        EngineArgs(model=checkpoint_factory("llama"), attention_backend="triton").resolve()


def test_default_capture_sizes():
    assert default_capture_sizes(1) == (1,)
    assert default_capture_sizes(6) == (1, 2, 4, 6)
    assert default_capture_sizes(20) == (1, 2, 4, 8, 16, 20)
    sizes = default_capture_sizes(4096)
    assert sizes[:5] == (1, 2, 4, 8, 16) and sizes[-1] == 512 and len(sizes) == 3 + 64
