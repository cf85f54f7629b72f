"""The KV cache's size on a GPU: vLLM's `gpu_memory_utilization`, per device.

When neither `num_kv_blocks` nor `kv_cache_memory` is set, a GPU gives the engine
`requested = gpu_memory_utilization * total memory`. The stages on the device take a reading
before any weight is loaded (`StartupMemory.take`), load their weights, run one forward (and the
sampler) at the largest batch the scheduler can build, and `measure` what that cost:

    weights          torch memory allocated by the loaded stages
    peak_activations torch's peak during the profile, above the weights
    non_torch        device memory this process gained outside torch's allocator since the
                     reading (cuBLAS/Triton modules, NCCL, ...)

The KV cache gets `requested - weights - peak_activations - non_torch` (`plan_kv_cache`, a
pure function of those numbers). As in vLLM, the memory other processes hold is not part of
the arithmetic: the start is refused when less than `requested` is free at the reading, and the
reading is taken once this process has its CUDA context, so the context counts with the memory
already in use there, not against the share.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine_core.config import EngineConfig

__all__ = ["GpuMemoryMeasurements", "KVCachePlan", "StartupMemory", "log_plan", "measure",
           "plan_kv_cache", "sized_by_gpu_budget"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartupMemory:
    """A GPU's memory before this process's stages load their weights (bytes)."""

    total: int
    free: int
    torch_allocated: int  # by this process's torch allocator (0 unless something ran before)
    torch_reserved: int

    @classmethod
    def take(cls, device: torch.device) -> StartupMemory:
        """Read `device` now (creating this process's CUDA context if it has none yet)."""
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        return cls(total=int(total), free=int(free),
                   torch_allocated=int(torch.cuda.memory_allocated(device)),
                   torch_reserved=int(torch.cuda.memory_reserved(device)))


@dataclass(frozen=True)
class GpuMemoryMeasurements:
    """What the stages on one GPU use before their KV cache exists (bytes); see the module
    docstring. `free_at_start` is what was free at the startup reading."""

    total: int
    free_at_start: int
    weights: int
    peak_activations: int
    non_torch: int


@dataclass(frozen=True)
class KVCachePlan:
    """The KV cache that `plan_kv_cache` gives the stages on one GPU."""

    requested: int  # gpu_memory_utilization * total: all the engine may use on the device
    kv_bytes: int  # what the KV cache may take of it
    num_blocks: int  # blocks each stage allocates (the null block 0 included)


def sized_by_gpu_budget(config: EngineConfig) -> bool:
    """True when gpu_memory_utilization sizes the KV cache: on CUDA, with neither
    num_kv_blocks nor kv_cache_memory set."""
    cache = config.cache
    return (torch.device(config.device).type == "cuda" and cache.num_kv_blocks is None
            and cache.kv_cache_memory is None)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def plan_kv_cache(m: GpuMemoryMeasurements, gpu_memory_utilization: float,
                  bytes_per_block: int, block_size: int, max_model_len: int,
                  max_num_seqs: int) -> KVCachePlan:
    """How many KV blocks the stages on one GPU get, from the measured numbers.

    `bytes_per_block`: one block over every stage on the device (each stage allocates
    `num_blocks` blocks of its own layers). The count is capped at what the scheduler could
    ever use (`max_num_seqs` requests of `max_model_len` tokens, plus the null block).
    ValueError naming gpu_memory_utilization (and what else to change) when: less than the
    requested share is free at startup (vLLM's rule: memory of other processes); the weights
    alone exceed the share; weights, peak activations and non-torch memory leave nothing; or
    the blocks left cannot hold one request of max_model_len tokens.
    """
    if bytes_per_block <= 0:
        raise ValueError(f"bytes_per_block must be > 0, got {bytes_per_block}")
    u = gpu_memory_utilization
    requested = math.ceil(m.total * u)
    if m.free_at_start < requested:
        raise ValueError(
            f"free memory on the GPU at startup ({_gib(m.free_at_start)} of {_gib(m.total)}) "
            f"is less than gpu_memory_utilization={u} asks for ({_gib(requested)}); lower "
            f"gpu_memory_utilization (--gpu-memory-utilization) or free the GPU memory other "
            f"processes use ({_gib(m.total - m.free_at_start)} is in use)")
    if m.weights >= requested:
        raise ValueError(
            f"the model's weights take {_gib(m.weights)} on this GPU, not less than the "
            f"{_gib(requested)} that gpu_memory_utilization={u} allows of its {_gib(m.total)}; "
            f"raise gpu_memory_utilization (--gpu-memory-utilization), split the model over "
            f"more GPUs (pipeline_parallel_size) or load it in a smaller dtype")
    non_kv = m.weights + m.peak_activations + m.non_torch
    kv_bytes = requested - non_kv
    if kv_bytes <= 0:
        raise ValueError(
            f"no GPU memory is left for the KV cache: the weights ({_gib(m.weights)}), the "
            f"activations of the largest step ({_gib(m.peak_activations)}) and "
            f"{_gib(m.non_torch)} outside torch take {_gib(non_kv)} of the "
            f"{_gib(requested)} that gpu_memory_utilization={u} allows; raise "
            f"gpu_memory_utilization (--gpu-memory-utilization) or lower max_num_batched_tokens "
            f"/ max_num_seqs (the largest step)")
    blocks_per_request = math.ceil(max_model_len / block_size)
    max_blocks = max_num_seqs * blocks_per_request + 1
    num_blocks = min(max_blocks, kv_bytes // bytes_per_block)
    if num_blocks - 1 < blocks_per_request:
        raise ValueError(
            f"the KV cache gets {_gib(kv_bytes)} under gpu_memory_utilization={u}: "
            f"{max(num_blocks - 1, 0)} blocks of {block_size} tokens, fewer than one request of "
            f"max_model_len={max_model_len} tokens needs ({blocks_per_request} blocks, "
            f"{_gib((blocks_per_request + 1) * bytes_per_block)}); raise "
            f"gpu_memory_utilization (--gpu-memory-utilization) or lower max_model_len "
            f"(--max-model-len)")
    return KVCachePlan(requested=requested, kv_bytes=kv_bytes, num_blocks=num_blocks)


def measure(device: torch.device, start: StartupMemory,
            profile: Callable[[], None]) -> GpuMemoryMeasurements:
    """Measure the stages on `device` (CUDA), their weights loaded since `start` was read:
    the weights now, then the peak while `profile()` runs (one forward and the sampler at the
    largest batch), then what the process holds outside torch."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    allocated = torch.cuda.memory_allocated(device)
    weights = allocated - start.torch_allocated
    torch.cuda.reset_peak_memory_stats(device)
    profile()
    torch.cuda.synchronize(device)
    peak_activations = torch.cuda.max_memory_allocated(device) - allocated
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    # used by something other than torch's allocator, now and at the reading; the difference
    # is this process's (other processes assumed still), e.g. kernels loaded by the profile
    outside_torch = (total - free) - torch.cuda.memory_reserved(device)
    outside_torch_at_start = (start.total - start.free) - start.torch_reserved
    return GpuMemoryMeasurements(
        total=int(total), free_at_start=start.free, weights=int(weights),
        peak_activations=max(0, int(peak_activations)),
        non_torch=max(0, int(outside_torch - outside_torch_at_start)))


def log_plan(device: torch.device, stages: str, m: GpuMemoryMeasurements,
             gpu_memory_utilization: float, plan: KVCachePlan, bytes_per_block: int) -> None:
    """One line at startup with the figures behind the KV cache's size."""
    logger.info(
        "GPU memory on %s (%s): %s of %s under gpu_memory_utilization=%s; weights %s, peak "
        "activations %s, non-torch %s; KV cache %s of %s left: %d blocks", device, stages,
        _gib(plan.requested), _gib(m.total), gpu_memory_utilization, _gib(m.weights),
        _gib(m.peak_activations), _gib(m.non_torch), _gib(plan.num_blocks * bytes_per_block),
        _gib(plan.kv_bytes), plan.num_blocks)
