"""No host synchronisation inside a step (issue 20): a whole step of a stage reads the device
once, at its end (the sampled ids, with the logprobs packed in), and builds nothing on the
device straight from host data (every per-row input goes through `step_inputs.to_device`).

On CPU the reads are counted: `.item()`, `bool()`, `int()` of a tensor dispatch
`aten._local_scalar_dense` (under inference mode `aten.item` / `aten.is_nonzero`), and
`nonzero`, `masked_select` and `repeat_interleave` without `output_size` wait for the device on
CUDA; `.tolist()` does not dispatch, so it is patched.
Tensors built by `torch.tensor(..., device=...)` (a synchronous copy from pageable memory on
CUDA) are counted apart. Not counted: the host's own arrays built before the step's one
transfer (`TritonAttentionMetadata.host_arrays`), and the attention kernel (on CPU its
reference stands in for the Triton kernel). On a GPU, `torch.cuda.set_sync_debug_mode("error")`
checks the same (skipped without one).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
from engine_core.executors import sampler as sampler_module
from engine_core.executors import step_inputs
from engine_core.executors.sampler import Sampler, SamplingRow
from engine_core.executors.stage_worker import StageWorker
from engine_core.models import triton_paged_attention
from engine_core.models.triton_attention import TritonAttentionMetadata
from torch.utils._python_dispatch import TorchDispatchMode

from engine_core.config import EngineArgs
from engine_core.messages import CachedRequest, NewRequest, StepBatch, StepOutput
from engine_core.sampling_params import SamplingParams

aten = torch.ops.aten
# (under inference mode `.item()` and `int()` reach a dispatch mode as aten.item and `bool()` as
# aten.is_nonzero; outside it, both as aten._local_scalar_dense)
_READ_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default,
             aten.nonzero.default, aten.masked_select.default}


@dataclass
class HostTraffic:
    """What a region made the host wait for, while `armed`."""

    reads: list[str] = field(default_factory=list)  # device-to-host reads and syncs
    device_builds: int = 0  # torch.tensor(host data, device=...)
    transfers: int = 0  # step_inputs.to_device calls that moved something
    armed: bool = True


class _ReadCounter(TorchDispatchMode):
    def __init__(self, traffic: HostTraffic) -> None:
        super().__init__()
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.traffic.armed and (
                func in _READ_OPS or (func is aten.repeat_interleave.Tensor
                                      and kwargs.get("output_size") is None)):
            self.traffic.reads.append(str(func))
        return func(*args, **kwargs)


@contextmanager
def counting() -> Iterator[HostTraffic]:
    """Count the host traffic of the region (see the module docstring)."""
    traffic = HostTraffic()
    tolist, tensor, to_device = torch.Tensor.tolist, torch.tensor, step_inputs.to_device

    def counted_tolist(self):
        if traffic.armed:
            traffic.reads.append("tolist")
        return tolist(self)

    def counted_tensor(*args, **kwargs):
        if traffic.armed and kwargs.get("device") is not None:
            traffic.device_builds += 1
        return tensor(*args, **kwargs)

    def counted_to_device(arrays, device):
        if traffic.armed and arrays:
            traffic.transfers += 1
        return to_device(arrays, device)

    def disarmed(fn):
        def run(*args, **kwargs):
            was, traffic.armed = traffic.armed, False
            try:
                return fn(*args, **kwargs)
            finally:
                traffic.armed = was
        return run

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "tolist", counted_tolist)
        patch.setattr(torch, "tensor", counted_tensor)
        patch.setattr(step_inputs, "to_device", counted_to_device)
        patch.setattr(sampler_module, "to_device", counted_to_device)
        patch.setattr(TritonAttentionMetadata, "host_arrays",
                      staticmethod(disarmed(TritonAttentionMetadata.host_arrays)))
        patch.setattr(triton_paged_attention, "triton_paged_attention",
                      disarmed(triton_paged_attention.triton_paged_attention))
        with _ReadCounter(traffic):
            yield traffic


# ---- a whole step of a stage -----------------------------------------------------------------
PROMPTS = [[1, 17, 42, 99, 7], [3, 5, 8, 13, 21, 34, 55], [2, 4]]
GREEDY = SamplingParams(temperature=0.0)
RANDOM = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05)
PENALTIES = SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4,
                           presence_penalty=0.2)
MIXED = [GREEDY, SamplingParams(temperature=0.7, seed=3, logprobs=2), PENALTIES]


@pytest.fixture(scope="module")
def worker(checkpoint_factory) -> StageWorker:
    """The Triton backend's path (on CPU under the interpreter, which conftest.py turns on)."""
    config = EngineArgs(model=checkpoint_factory("llama"), dtype="float32", max_model_len=64,
                        num_kv_blocks=32, attention_backend="triton").resolve()
    stage = StageWorker(config, 0)
    stage.init_kv_cache(config.cache.num_kv_blocks or 0)
    return stage


def _prefill(worker: StageWorker, params: list[SamplingParams], step_id: int) -> StepBatch:
    """A prefill of PROMPTS (one per params), on fresh blocks; their decode follows."""
    new, block = [], 1
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        blocks = list(range(block, block + 2))  # 2 blocks of 16: room for the prompt and more
        block += 2
        new.append(NewRequest(f"{step_id}-{i}", prompt, [], p, [0], blocks, 0, len(prompt)))
    return StepBatch(step_id, new, [], [])


def _decode(prefill: StepBatch, output: StepOutput,
            step_id: int) -> tuple[StepBatch, list[str]]:
    """The decode step after `prefill`, and the ids of its requests (to finish them)."""
    cached = [CachedRequest(rid, [token.token_id], [], len(new.prompt_token_ids), 1)
              for rid, token, new in zip(output.request_ids, output.sampled, prefill.new_requests)]
    done = [r.request_id for r in prefill.new_requests]
    return StepBatch(step_id, [], cached, []), done


def _run_two_steps(worker: StageWorker, params: list[SamplingParams],
                   step_id: int) -> tuple[HostTraffic, HostTraffic, StepOutput]:
    """A prefill and a decode step of PROMPTS, each counted; the decode's output."""
    prefill = _prefill(worker, params, step_id)
    with counting() as prefill_traffic:
        first = worker.execute(prefill)
    assert isinstance(first, StepOutput)
    assert all(t.error is None for t in first.sampled)
    decode, done = _decode(prefill, first, step_id + 1)
    with counting() as decode_traffic:
        second = worker.execute(decode)
    assert isinstance(second, StepOutput) and len(second.sampled) == len(params)
    assert all(0 <= t.token_id < 512 for t in second.sampled)
    worker.execute(StepBatch(step_id + 2, [], [], done))  # drop the requests
    return prefill_traffic, decode_traffic, second


@pytest.mark.parametrize("params, transfers, step_id", [
    ([GREEDY] * 3, 1, 100),  # the step's inputs only: plain greedy needs no per-row parameter
    ([RANDOM] * 3, 3, 200),  # + the filters' int64 (top_k) and float32 (temperature, p's) arrays
    ([PENALTIES] * 3, 3, 300),  # + rows and count keys, + the three penalties
    (MIXED, 3, 400),
], ids=["greedy", "random", "penalties", "mixed"])
def test_a_step_reads_the_device_once(worker, params, transfers, step_id):
    for traffic in _run_two_steps(worker, params, step_id)[:2]:
        assert traffic.reads == ["tolist"]
        assert traffic.device_builds == 0
        assert traffic.transfers == transfers


def test_the_counter_sees_a_planted_read(worker, monkeypatch):
    """The control: an `.item()` (and a `.tolist()`, and a tensor built on the device) slipped
    into the step is counted."""
    original = worker.model.compute_logits

    def compute_logits(hidden):
        logits = original(hidden)
        float(logits.sum())  # a sync
        bool((logits > 0).all())  # another, as the sampler's checks were
        logits[:, :1].tolist()  # and a third
        torch.tensor([0], device=logits.device)  # a pageable host-to-device copy
        return logits

    monkeypatch.setattr(worker.model, "compute_logits", compute_logits)
    prefill, decode, _ = _run_two_steps(worker, [GREEDY] * 3, 900)
    for traffic in (prefill, decode):
        assert traffic.reads == ["aten.item.default", "aten.is_nonzero.default", "tolist",
                                 "tolist"]
        assert traffic.device_builds == 1


def test_a_row_with_nan_logits_costs_reads_after_the_one_read_only():
    """The rare path: a NaN row is repaired after the step's read (its NaN-ignoring argmax,
    then its logprobs again), the other rows are untouched."""
    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    logits[1, 9] = 100.0
    rows = [SamplingRow(SamplingParams(temperature=0.0, logprobs=1), [], [], ())
            for _ in range(3)]
    with counting() as traffic:
        sampled = Sampler()(logits, rows)
    assert [t.token_id for t in sampled] == [int(logits[0].argmax()), 9, int(logits[2].argmax())]
    assert traffic.reads == ["tolist"] * 3
    with counting() as traffic:
        Sampler()(torch.randn(3, 50), rows)
    assert traffic.reads == ["tolist"]


# ---- on a GPU --------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextmanager
def sync_is_an_error(monkeypatch) -> Iterator[list[int]]:
    """torch.cuda.set_sync_debug_mode("error") for the region, except the sampler's one read
    (whose calls are counted in the list yielded)."""
    reads: list[int] = []
    read = sampler_module._read

    def allowed_read(t):
        reads.append(t.numel())
        torch.cuda.set_sync_debug_mode("default")
        try:
            return read(t)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(sampler_module, "_read", allowed_read)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield reads
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
@pytest.mark.parametrize("params", [[GREEDY] * 3, [RANDOM] * 3, [PENALTIES] * 3, MIXED],
                         ids=["greedy", "random", "penalties", "mixed"])
def test_the_sampler_does_not_sync_on_a_gpu(monkeypatch, params):
    logits = torch.randn(3, 512, device="cuda")
    rows = [SamplingRow(p, [1, 2, 3], [4, 5], (0,)) for p in params]
    Sampler()(logits, rows)  # warm up: generators, pinned memory
    with sync_is_an_error(monkeypatch) as reads:
        sampled = Sampler()(logits, rows)
    assert len(reads) == 1 and all(t.error is None for t in sampled)


@cuda
def test_a_gpu_step_does_not_sync(checkpoint_factory, monkeypatch):
    config = EngineArgs(model=checkpoint_factory("llama"), dtype="float32", max_model_len=64,
                        num_kv_blocks=32, device="cuda", attention_backend="triton",
                        enforce_eager=True).resolve()
    gpu_worker = StageWorker(config, 0)
    gpu_worker.init_kv_cache(32)
    for step_id, params in enumerate([[GREEDY] * 3, [RANDOM] * 3, [PENALTIES] * 3, MIXED]):
        prefill = _prefill(gpu_worker, params, 10 * step_id)
        first = gpu_worker.execute(prefill)  # warm up (RoPE tables, kernels)
        decode, done = _decode(prefill, first, 10 * step_id + 1)
        with sync_is_an_error(monkeypatch) as reads:
            out = gpu_worker.execute(decode)
        assert len(reads) == 1 and all(t.error is None for t in out.sampled)
        gpu_worker.execute(StepBatch(10 * step_id + 2, [], [], done))
