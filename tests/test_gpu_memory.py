"""KV cache sizing by gpu_memory_utilization (`executors/gpu_memory.py`): the arithmetic with
made-up measurements, every error; the profile run and the stages' shared budget on CPU (the
measuring replaced); the real measurement on a GPU (skipped without one)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from engine_core.executors import stage_worker as stage_worker_module
from engine_core.executors.gpu_memory import (
    GpuMemoryMeasurements,
    StartupMemory,
    plan_kv_cache,
    sized_by_gpu_budget,
)
from engine_core.executors.stage_worker import StageWorker, kv_blocks_that_fit

from engine_core.config import EngineArgs

GIB = 1 << 30
MIB = 1 << 20
# An 80 GiB GPU, nothing else on it but this process's context: 79.5 GiB free at startup.
GPU = GpuMemoryMeasurements(total=80 * GIB, free_at_start=79 * GIB + 512 * MIB,
                            weights=2 * GIB, peak_activations=3 * GIB, non_torch=512 * MIB)
BLOCK = 16
BYTES_PER_BLOCK = 22 * 16 * 2 * 4 * 64 * 2  # 22 layers x 16 tokens x K,V x 4 heads x 64 x bf16


def plan(m: GpuMemoryMeasurements = GPU, utilization: float = 0.9,
         bytes_per_block: int = BYTES_PER_BLOCK, max_model_len: int = 2048,
         max_num_seqs: int = 10**6):
    return plan_kv_cache(m, utilization, bytes_per_block, BLOCK, max_model_len, max_num_seqs)


# ---- the arithmetic -------------------------------------------------------------------------
def test_the_kv_cache_gets_what_is_left_of_the_share():
    result = plan()
    requested = math.ceil(0.9 * 80 * GIB)
    assert result.requested == requested
    assert result.kv_bytes == requested - (2 * GIB + 3 * GIB + 512 * MIB)
    assert result.num_blocks == result.kv_bytes // BYTES_PER_BLOCK
    # the share is all the engine uses: weights, peak activations, non-torch memory and KV
    used = 2 * GIB + 3 * GIB + 512 * MIB + result.num_blocks * BYTES_PER_BLOCK
    assert requested - BYTES_PER_BLOCK < used <= requested


def test_a_lower_utilization_gives_the_kv_cache_less():
    assert plan(utilization=0.5).num_blocks < plan(utilization=0.9).num_blocks
    half = plan(utilization=0.5)
    assert half.kv_bytes == math.ceil(0.5 * 80 * GIB) - (5 * GIB + 512 * MIB)


def test_stages_sharing_a_gpu_split_its_budget():
    """Two stages on one device: each block costs both stages' bytes, so each gets half the
    blocks one stage would get."""
    alone = plan(bytes_per_block=BYTES_PER_BLOCK)
    shared = plan(bytes_per_block=2 * BYTES_PER_BLOCK)
    assert shared.kv_bytes == alone.kv_bytes
    assert shared.num_blocks == alone.kv_bytes // (2 * BYTES_PER_BLOCK)


def test_blocks_are_capped_at_what_the_scheduler_can_use():
    result = plan(max_num_seqs=4, max_model_len=100)
    assert result.num_blocks == 4 * math.ceil(100 / BLOCK) + 1


# ---- the errors -----------------------------------------------------------------------------
def test_less_free_than_the_share_at_startup_is_refused():
    """vLLM's rule: other processes hold memory, so the share cannot be had."""
    busy = dataclasses.replace(GPU, free_at_start=60 * GIB)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0\.9") as info:
        plan(busy)
    message = str(info.value)
    assert "free memory on the GPU at startup (60.00 GiB of 80.00 GiB)" in message
    assert "--gpu-memory-utilization" in message and "other processes" in message
    assert plan(busy, utilization=0.7).num_blocks > 0  # 56 GiB asked, 60 GiB free: fine


def test_utilization_one_is_refused_when_anything_holds_memory():
    with pytest.raises(ValueError, match="at startup"):
        plan(utilization=1.0)


def test_weights_beyond_the_share_are_refused():
    heavy = dataclasses.replace(GPU, weights=75 * GIB)
    with pytest.raises(ValueError, match=r"weights take 75\.00 GiB") as info:
        plan(heavy)
    message = str(info.value)
    assert "gpu_memory_utilization=0.9" in message and "pipeline_parallel_size" in message
    assert "--gpu-memory-utilization" in message


def test_activations_that_leave_nothing_are_refused():
    hungry = dataclasses.replace(GPU, peak_activations=70 * GIB)
    with pytest.raises(ValueError, match="no GPU memory is left for the KV cache") as info:
        plan(hungry)
    message = str(info.value)
    assert "gpu_memory_utilization=0.9" in message and "max_num_batched_tokens" in message
    assert "70.00 GiB" in message


def test_non_torch_memory_counts_as_used():
    requested = math.ceil(0.9 * 80 * GIB)
    exact = dataclasses.replace(GPU, non_torch=requested - 5 * GIB)  # leaves 0 bytes
    with pytest.raises(ValueError, match="no GPU memory is left"):
        plan(exact)
    one_block_less = dataclasses.replace(GPU, non_torch=GPU.non_torch + BYTES_PER_BLOCK)
    assert plan(one_block_less).num_blocks == plan().num_blocks - 1


def test_too_little_kv_for_one_request_of_max_model_len_is_refused():
    requested = math.ceil(0.9 * 80 * GIB)
    blocks_per_request = math.ceil(2048 / BLOCK)
    # room for exactly one request (its blocks plus the null block), then one block short
    tight = dataclasses.replace(
        GPU, peak_activations=requested - 2 * GIB - GPU.non_torch
        - (blocks_per_request + 1) * BYTES_PER_BLOCK)
    assert plan(tight).num_blocks == blocks_per_request + 1
    short = dataclasses.replace(tight, peak_activations=tight.peak_activations + 1)
    with pytest.raises(ValueError, match="max_model_len=2048") as info:
        plan(short)
    message = str(info.value)
    assert "--max-model-len" in message and "gpu_memory_utilization=0.9" in message
    assert f"{blocks_per_request - 1} blocks of 16 tokens" in message
    assert plan(short, max_model_len=1024).num_blocks > 0  # a shorter context fits


# ---- the stages' side, on CPU ---------------------------------------------------------------
@pytest.fixture(scope="module")
def config(checkpoint_factory):
    """Two stages of a 4-layer model, a step of at most 40 tokens over at most 3 sequences."""
    return EngineArgs(model=checkpoint_factory("llama", num_hidden_layers=4), dtype="float32",
                      max_model_len=64, max_num_batched_tokens=40, max_num_seqs=3,
                      pipeline_parallel_size=2, distributed_executor_backend="inprocess",
                      num_kv_blocks=8).resolve()


def test_the_budget_applies_on_cuda_without_an_explicit_size_only(config):
    def on(device: str, **cache):
        return dataclasses.replace(config, device=device, cache=dataclasses.replace(
            config.cache, **{"num_kv_blocks": None, **cache}))

    assert sized_by_gpu_budget(on("cuda")) and sized_by_gpu_budget(on("cuda:1"))
    assert not sized_by_gpu_budget(on("cpu"))
    assert not sized_by_gpu_budget(on("cuda", num_kv_blocks=100))
    assert not sized_by_gpu_budget(on("cuda", kv_cache_memory=GIB))


def test_the_profile_runs_the_largest_step_through_the_stages_and_keeps_nothing(config):
    stages = [StageWorker(config, 0), StageWorker(config, 1)]
    last = stages[1]
    generator_state = last.sampler._generator(last.device).get_state()
    hidden = stages[0].profile_run()
    assert hidden is not None and hidden.shape == (40, config.model.hidden_size)
    assert last.profile_run(hidden) is None
    assert last.profile_run() is None  # zeros when no stage before it ran
    for stage in stages:
        assert stage.kv_caches == [] and stage.requests == {} and stage.num_kv_blocks == 0
    assert torch.equal(last.sampler._generator(last.device).get_state(), generator_state)


def test_stages_on_one_gpu_are_profiled_together_and_share_its_budget(config, monkeypatch):
    """The GPU path of `kv_blocks_that_fit` with the measuring replaced: the profile chains the
    stages as a step does, and the blocks come from the shared budget."""
    gpu_config = dataclasses.replace(config, device="cuda", cache=dataclasses.replace(
        config.cache, num_kv_blocks=None, gpu_memory_utilization=0.5))
    stages = [StageWorker(config, 0), StageWorker(config, 1)]
    for stage in stages:  # sized as on a GPU, computed on the CPU
        stage.config = gpu_config
    profiled = []
    original = StageWorker.profile_run

    def recording(self, hidden_states=None):
        profiled.append((self.stage_index, None if hidden_states is None
                         else tuple(hidden_states.shape)))
        return original(self, hidden_states)

    monkeypatch.setattr(StageWorker, "profile_run", recording)
    start = StartupMemory(total=GIB, free=GIB, torch_allocated=0, torch_reserved=0)
    measured = GpuMemoryMeasurements(total=GIB, free_at_start=GIB, weights=100 * MIB,
                                     peak_activations=50 * MIB, non_torch=10 * MIB)

    def fake_measure(device, at_start, profile):
        assert at_start is start
        profile()
        return measured

    monkeypatch.setattr(stage_worker_module, "measure", fake_measure)
    blocks = kv_blocks_that_fit(stages, start)
    assert profiled == [(0, None), (1, (40, config.model.hidden_size))]
    per_block = stages[0].kv_bytes_per_block() + stages[1].kv_bytes_per_block()
    cap = 3 * math.ceil(64 / config.cache.block_size) + 1
    expected = plan_kv_cache(measured, 0.5, per_block, config.cache.block_size, 64, 3)
    assert blocks == expected.num_blocks == min(cap, (GIB // 2 - 160 * MIB) // per_block)
    with pytest.raises(RuntimeError, match="before the weights were loaded"):
        kv_blocks_that_fit(stages, None)


def test_explicit_sizes_keep_the_settings_path(config):
    stages = [StageWorker(config, 0), StageWorker(config, 1)]
    assert kv_blocks_that_fit(stages, None) == 8
    two_gib = dataclasses.replace(config, cache=dataclasses.replace(config.cache,
                                                                   num_kv_blocks=None))
    stage = StageWorker(two_gib, 1)
    cap = 3 * math.ceil(64 / config.cache.block_size) + 1
    assert stage.num_kv_blocks_that_fit() == min(cap, (2 << 30) // stage.kv_bytes_per_block())


# ---- on a GPU -------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_a_gpu_engine_fills_its_share_and_stays_within_it(checkpoint_factory):
    """max_num_seqs so large that the scheduler's cap does not bind: the KV cache takes what the
    share leaves, so torch's peak (weights, KV cache, a step's activations) ends just under it."""
    from engine_core import LLM, SamplingParams

    torch.cuda.reset_peak_memory_stats()
    total = torch.cuda.mem_get_info()[1]
    llm = LLM(checkpoint_factory("llama"), device="cuda", dtype="float32",
              gpu_memory_utilization=0.3, max_model_len=256, max_num_seqs=10**6,
              max_num_batched_tokens=512, enforce_eager=True)
    try:
        out = llm.generate([{"prompt_token_ids": [1, 2, 3 + i]} for i in range(8)],
                           SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 4 for o in out)
        peak = torch.cuda.max_memory_allocated()
        assert 0.2 * total < peak <= 0.3 * total, (peak / total)
    finally:
        llm.shutdown()


@cuda
def test_a_gpu_engine_refuses_shares_it_cannot_have(checkpoint_factory):
    from engine_core import LLM

    model = checkpoint_factory("llama")
    with pytest.raises(ValueError, match="at startup"):  # the CUDA context alone is in use
        LLM(model, device="cuda", dtype="float32", gpu_memory_utilization=1.0,
            max_model_len=256)
    with pytest.raises(ValueError, match="weights take"):  # a few bytes: less than the weights
        LLM(model, device="cuda", dtype="float32", gpu_memory_utilization=1e-9,
            max_model_len=256)
