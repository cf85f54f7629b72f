"""Pipeline stages as Ray actors, one per stage, several microbatches in flight.

`submit(batch)` returns at once. Hidden states go from stage to stage without the driver:
- default (chained ObjectRefs): `ref = stage_k.execute.remote(batch, ref)` for each stage; Ray
  hands each stage's output straight to the next and runs every actor's calls in submission order;
- `ray_compiled_graph=True`: the same chain compiled once into a Ray Compiled Graph (shared-memory
  channels, lower latency; its idle actors busy-poll, so it suits many-core or GPU nodes).

On CUDA each stage actor holds one GPU of its own (`num_gpus=1` in its placement-group bundle)
and sizes its KV cache by gpu_memory_utilization on it; the engine takes the least block count.

Only the last stage returns to the driver: the sampled tokens as msgspec bytes. What crosses Ray is
msgspec bytes (the config, every `StepBatch`, every `StepOutput`) and hidden states as numpy arrays;
no object of ours is pickled.

A stage that dies or fails makes `StepFuture.result` raise `RuntimeError` naming the stage; every
wait has a timeout.

`kv_stages()` gives the KV connector (disaggregated prefill/decode) one `RayKVStage` per actor:
KV blocks cross Ray as numpy arrays (16-bit floats as their raw bits), each call bounded by
`KV_CALL_TIMEOUT_S`. Not with `ray_compiled_graph`: its actors are busy in the compiled graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import msgspec
import numpy as np
import torch

from engine_core.config import EngineConfig
from engine_core.executor import Executor, KVStage
from engine_core.messages import StepBatch, StepOutput

if TYPE_CHECKING:
    import ray

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 300.0  # model load + KV allocation on every stage
TEARDOWN_TIMEOUT_S = 10.0
KV_CALL_TIMEOUT_S = 60.0  # one KV read or write (queued behind the steps already submitted)


class StageActor:
    """Ray actor body around a `StageWorker`. Inputs and outputs are bytes and numpy arrays."""

    def __init__(self, config_bytes: bytes, stage_index: int) -> None:
        from engine_core.executors.gpu_memory import StartupMemory, sized_by_gpu_budget
        from engine_core.executors.stage_worker import StageWorker

        config = msgspec.msgpack.decode(config_bytes, type=EngineConfig)
        # on a GPU (the one Ray gave this actor), its memory before the weights are loaded
        self._memory_at_start = (StartupMemory.take(torch.device(config.device))
                                 if sized_by_gpu_budget(config) else None)
        self.worker = StageWorker(config, stage_index)
        self._batch_decoder = msgspec.msgpack.Decoder(StepBatch)
        self._encoder = msgspec.msgpack.Encoder()

    def num_kv_blocks_that_fit(self) -> int:
        """On a GPU sized by gpu_memory_utilization: this stage's share of its own GPU."""
        return self.worker.num_kv_blocks_that_fit(self._memory_at_start)

    def init_kv_cache(self, num_blocks: int) -> bool:
        self.worker.init_kv_cache(num_blocks)
        return True

    def execute(self, batch_bytes: bytes, hidden: np.ndarray | None) -> np.ndarray | bytes:
        batch = self._batch_decoder.decode(batch_bytes)
        hidden_states = None if hidden is None else _from_numpy(hidden, self.worker.dtype)
        result = self.worker.execute(batch, hidden_states)
        if isinstance(result, StepOutput):
            return self._encoder.encode(result)
        return _to_numpy(result)

    # ---- KV blocks for disaggregated prefill/decode (numpy in, numpy out) ----------------------
    def read_kv_blocks(self, block_ids: list[int]) -> list[tuple[int, np.ndarray, np.ndarray]]:
        return [(layer, _to_numpy(k), _to_numpy(v))
                for layer, k, v in self.worker.read_kv_blocks(block_ids)]

    def write_kv_blocks(self, block_ids: list[int], layer: int, k: np.ndarray,
                        v: np.ndarray) -> bool:
        return self.write_kv_layers(block_ids, [(layer, k, v)])

    def write_kv_layers(self, block_ids: list[int],
                        layers: list[tuple[int, np.ndarray, np.ndarray]]) -> bool:
        dtype = self.worker.dtype
        self.worker.write_kv_layers(
            block_ids, [(layer, _from_numpy(k, dtype), _from_numpy(v, dtype))
                        for layer, k, v in layers])
        return True


_R = TypeVar("_R")


class _ActorMethod(Protocol[_R]):
    """A method of a Ray actor handle: `remote(...)` queues a call and returns the ObjectRef of
    its result; `bind(...)` makes a node of a Ray graph."""

    def remote(self, *args: Any) -> ray.ObjectRef[_R]: ...

    def bind(self, *args: Any) -> Any: ...


class StageHandle(Protocol):
    """The driver's view of a `StageActor` handle. Ray builds these callables at run time; its
    stubs type an actor handle's methods as the plain methods (without `.remote`)."""

    _actor_id: ray.ActorID
    num_kv_blocks_that_fit: _ActorMethod[int]
    init_kv_cache: _ActorMethod[bool]
    execute: _ActorMethod[np.ndarray | bytes]
    read_kv_blocks: _ActorMethod[list[tuple[int, np.ndarray, np.ndarray]]]
    write_kv_layers: _ActorMethod[bool]


class RayKVStage:
    """One stage actor's KV cache as a `KVStage`. `holds_layer` is answered here; reads and
    writes are remote calls, each waited for at most `timeout_s` (a timeout or a dead actor raises
    `RuntimeError` naming the stage). Ray runs them in order with the actor's steps."""

    def __init__(self, actor: StageHandle, stage_index: int, layer_range: tuple[int, int],
                 dtype: torch.dtype, timeout_s: float = KV_CALL_TIMEOUT_S) -> None:
        self.actor = actor
        self.stage_index = stage_index
        self.layer_range = layer_range
        self.dtype = dtype
        self.timeout_s = timeout_s
        start, end = layer_range
        self.name = f"pipeline stage {stage_index} (layers {start}-{end - 1})"

    def holds_layer(self, layer: int) -> bool:
        return self.layer_range[0] <= layer < self.layer_range[1]

    def read_kv_blocks(self, block_ids: list[int]) -> list[tuple[int, torch.Tensor,
                                                                 torch.Tensor]]:
        layers = self._get(self.actor.read_kv_blocks.remote(list(block_ids)), "KV read")
        return [(layer, _from_numpy(k, self.dtype), _from_numpy(v, self.dtype))
                for layer, k, v in layers]

    def write_kv_blocks(self, block_ids: list[int], layer: int, k: torch.Tensor,
                        v: torch.Tensor) -> None:
        self.write_kv_layers(block_ids, [(layer, k, v)])

    def write_kv_layers(self, block_ids: list[int],
                        layers: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        for layer, _, _ in layers:
            if not self.holds_layer(layer):
                raise ValueError(f"{self.name} does not hold layer {layer}")
        arrays = [(layer, _to_numpy(k.to(self.dtype)), _to_numpy(v.to(self.dtype)))
                  for layer, k, v in layers]
        self._get(self.actor.write_kv_layers.remote(list(block_ids), arrays), "KV write")

    def _get(self, ref: Any, what: str) -> Any:
        import ray

        try:
            return ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            with contextlib.suppress(Exception):  # drop it if still queued
                ray.cancel(ref)
            raise RuntimeError(
                f"{what} on {self.name} did not finish within {self.timeout_s} s") from None
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"{what} on {self.name}: the stage died "
                               f"({type(exc).__name__})") from exc
        except ray.exceptions.RayError as exc:
            raise RuntimeError(f"{what} on {self.name} failed: {exc}") from exc


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """Tensor -> numpy for transport; 16-bit floats travel as their raw bits (numpy has no bf16)."""
    t = t.detach().cpu().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy()
    return t.numpy()


def _from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.array(a, copy=True))  # Ray hands out read-only buffers
    return t.view(dtype) if t.dtype == torch.int16 else t


class RayStepFuture:
    """The pending output of one step: an ObjectRef or a CompiledDAGRef of the last stage."""

    def __init__(self, ref: Any, executor: RayExecutor) -> None:
        self._ref = ref
        self._executor = executor

    def result(self, timeout: float | None = None) -> StepOutput:
        import ray

        try:
            data = ray.get(self._ref, timeout=timeout)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayChannelTimeoutError) as exc:
            raise TimeoutError(f"a pipeline step did not finish within {timeout} s") from exc
        except ray.exceptions.RayError as exc:
            raise RuntimeError(self._executor.describe_failure(exc)) from exc
        return self._executor.output_decoder.decode(data)


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.config = config
        num_stages = config.parallel.pipeline_parallel_size
        self._started_ray = _connect_ray(num_stages, config.parallel.threads_per_stage)
        self.threads_per_stage = _threads_per_stage(config, num_stages)
        self.output_decoder = msgspec.msgpack.Decoder(StepOutput)
        self._encoder = msgspec.msgpack.Encoder()
        self._dag = None
        self._closed = False
        # on CUDA every stage actor gets a GPU of its own (Ray sets its CUDA_VISIBLE_DEVICES,
        # so the actor's "cuda" is that GPU) and sizes its KV cache there
        on_cuda = torch.device(config.device).type == "cuda"
        num_gpus = 1 if on_cuda else 0
        if on_cuda and int(ray.cluster_resources().get("GPU", 0)) < num_stages:
            if self._started_ray:
                ray.shutdown()
            raise ValueError(
                f"pipeline_parallel_size={num_stages} on CUDA with the Ray executor needs "
                f"{num_stages} GPUs (one per stage), but the Ray cluster has "
                f"{int(ray.cluster_resources().get('GPU', 0))}; lower pipeline_parallel_size or "
                f"use distributed_executor_backend='inprocess' (the stages then share one GPU)")
        bundle = {"CPU": self.threads_per_stage, **({"GPU": num_gpus} if on_cuda else {})}
        self.pg = placement_group([bundle] * num_stages, strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=60)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            gpus = " and 1 GPU" if on_cuda else ""
            raise ValueError(
                f"the Ray cluster cannot reserve {num_stages} stages x {self.threads_per_stage} "
                f"CPUs{gpus}; lower threads_per_stage or pipeline_parallel_size") from None
        actor_cls = ray.remote(StageActor)
        parallel = dataclasses.replace(config.parallel, threads_per_stage=self.threads_per_stage)
        device = "cuda" if on_cuda else config.device  # an actor sees its own GPU alone
        config_bytes = self._encoder.encode(dataclasses.replace(config, parallel=parallel,
                                                                device=device))
        self.stages: list[StageHandle] = [
            cast(StageHandle, actor_cls.options(
                num_cpus=self.threads_per_stage,
                num_gpus=num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=i),
            ).remote(config_bytes, i))
            for i in range(num_stages)
        ]
        self._stage_of_actor = {a._actor_id.hex(): i for i, a in enumerate(self.stages)}
        try:
            fits = ray.get([s.num_kv_blocks_that_fit.remote() for s in self.stages],
                           timeout=STARTUP_TIMEOUT_S)
            self.num_kv_blocks = min(fits)
            ray.get([s.init_kv_cache.remote(self.num_kv_blocks) for s in self.stages],
                    timeout=STARTUP_TIMEOUT_S)
            if config.parallel.ray_compiled_graph:
                self._dag = self._compile()
        except BaseException:
            self.shutdown()
            raise

    def _compile(self):
        from ray.dag import InputNode

        with InputNode() as batch:
            node = None
            for stage in self.stages:
                node = stage.execute.bind(batch, node)
        return node.experimental_compile(
            _max_inflight_executions=self.config.scheduler.max_concurrent_batches)

    def submit(self, batch: StepBatch) -> RayStepFuture:
        if self._closed:
            raise RuntimeError("the Ray executor is shut down")
        batch_bytes = self._encoder.encode(batch)
        if self._dag is not None:
            return RayStepFuture(self._dag.execute(batch_bytes), self)
        ref = None
        for stage in self.stages:
            ref = stage.execute.remote(batch_bytes, ref)
        return RayStepFuture(ref, self)

    def kv_stages(self) -> list[KVStage]:
        """One `RayKVStage` per stage actor. Not with `ray_compiled_graph`: the compiled graph
        keeps the actors busy, so they would never run a KV call."""
        if self.config.parallel.ray_compiled_graph:
            raise ValueError("disaggregated prefill/decode (KV transfer) needs "
                             "ray_compiled_graph off: the compiled graph's actors take no other "
                             "calls")
        if self._closed:
            raise RuntimeError("the Ray executor is shut down")
        ranges = self.config.parallel.layer_ranges(self.config.model.num_layers)
        dtype = getattr(torch, self.config.dtype)
        return [RayKVStage(actor, i, ranges[i], dtype) for i, actor in enumerate(self.stages)]

    def describe_failure(self, exc: BaseException) -> str:
        """Name the stage behind a Ray error."""
        import ray

        actor_id = getattr(exc, "actor_id", None)
        stage = self._stage_of_actor.get(actor_id) if isinstance(actor_id, str) else None
        if stage is None:  # e.g. a task error: the actor id appears in the message
            stage = next((i for hex_id, i in self._stage_of_actor.items() if hex_id in str(exc)),
                         None)
        if stage is None:
            where = "a pipeline stage"
        else:
            start, end = self.config.parallel.layer_ranges(self.config.model.num_layers)[stage]
            where = f"pipeline stage {stage} (layers {start}-{end - 1})"
        if isinstance(exc, ray.exceptions.RayActorError):
            return f"{where} died: {type(exc).__name__}"
        return f"{where} failed: {exc}"

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        import ray
        from ray.util.placement_group import remove_placement_group

        if self._dag is not None:
            _run_with_timeout(self._dag.teardown, TEARDOWN_TIMEOUT_S, "compiled graph teardown")
            self._dag = None
        for stage in getattr(self, "stages", []):
            with contextlib.suppress(Exception):  # already dead
                ray.kill(stage, no_restart=True)
        self.stages = []
        with contextlib.suppress(Exception):
            remove_placement_group(self.pg)
        if self._started_ray:
            ray.shutdown()


def _connect_ray(num_stages: int, threads_per_stage: int | None) -> bool:
    """Attach to a running Ray (initialised here, or RAY_ADDRESS set) or start a local one.
    Returns True if this call started Ray (and so must stop it).

    A local Ray serves only this host's stages, so it is started on the loopback address: its
    nodes register, advertise and connect on 127.0.0.1 and its agents listen there. (Ray 2.60's
    GCS and raylet gRPC ports still listen on every interface; Ray's token authentication, on by
    default, guards them.)"""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        return False
    cpus = os.cpu_count() or 1
    needed = num_stages * (threads_per_stage or max(1, cpus // num_stages))
    ray.init(
        num_cpus=max(cpus, needed),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address="127.0.0.1",
        _system_config={
            "worker_niceness": 0,  # Ray's default nice 15 loses to any busy process
            "max_direct_call_object_size": 1 << 20,  # mid-size hidden states skip the store
        },
    )
    return True


def _threads_per_stage(config: EngineConfig, num_stages: int) -> int:
    import ray

    cluster_cpus = int(ray.cluster_resources().get("CPU", 0))
    threads = config.parallel.threads_per_stage
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // num_stages)
    if threads * num_stages > cluster_cpus:
        raise ValueError(
            f"threads_per_stage={threads} x pipeline_parallel_size={num_stages} needs "
            f"{threads * num_stages} CPUs but the Ray cluster has {cluster_cpus}; lower "
            f"threads_per_stage")
    return threads


def _run_with_timeout(fn, timeout: float, what: str) -> None:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        logger.warning("%s did not finish within %.0f s; killing the stages", what, timeout)
