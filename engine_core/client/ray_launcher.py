"""`--data-parallel-backend ray`: data-parallel ranks as Ray actors instead of local processes.

On an existing Ray cluster (`RAY_ADDRESS`, or Ray already initialised) or a local one, each rank
is an engine-core actor in a placement group of its own, running the same
`core_process.run_engine_core` as a spawned process would: the same handshake, sockets and
CurveZMQ keys carry the traffic (tcp on `--data-parallel-address`, which the cluster's nodes
must reach), so no headless command is needed. A rank's pipeline stages (with `-pp`) are Ray
actors too, placed by its own executor. `RayEngineHandle` gives `launcher.py` what it needs of
a process (`launcher.EngineProcessHandle`: pid, is_alive, exitcode, join, terminate, kill).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from engine_core.client.core_process import run_engine_core

__all__ = ["RayEngineLauncher"]


class _EngineCoreActor:
    """The body of one rank's Ray actor (made remote in `RayEngineLauncher`)."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, handshake_address: str, rank: int, zmq_keys: str | None) -> int:
        # No parent process to watch inside Ray: exit when the front-end's connection drops.
        return run_engine_core(handshake_address, rank, zmq_keys, watch_front_end=True)


class RayEngineHandle:
    """One rank's actor and its running `run` call, with a process-like surface."""

    def __init__(self, actor: Any, ref: Any, pid: int) -> None:
        self.actor, self.ref, self.pid = actor, ref, pid
        self.exitcode: int | None = None

    def is_alive(self) -> bool:
        import ray

        if self.exitcode is not None:
            return False
        ready, _ = ray.wait([self.ref], timeout=0)
        if not ready:
            return True
        try:
            self.exitcode = int(ray.get(self.ref))
        except Exception:  # the actor died (killed, node lost)
            self.exitcode = -9
        return False

    def join(self, timeout: float | None = None) -> None:
        import ray

        ray.wait([self.ref], timeout=timeout)
        self.is_alive()

    def terminate(self) -> None:
        self.kill()

    def kill(self) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)
        self.join(5)


class RayEngineLauncher:
    """Starts (and at `close`, removes) the Ray actors of the front-end's local ranks."""

    def __init__(self, num_engines: int) -> None:
        from engine_core.executors.ray_executor import _connect_ray

        self._started_ray = _connect_ray(num_engines, 1)
        self._groups: list[Any] = []
        self.handles: list[RayEngineHandle] = []

    def start(self, handshake_address: str, rank: int,
              zmq_keys: str | None) -> RayEngineHandle:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group([{"CPU": 1}], strategy="STRICT_PACK")
        self._groups.append(group)
        ray.get(group.ready(), timeout=120)
        actor_class: Any = ray.remote(num_cpus=1, max_restarts=0)(_EngineCoreActor)
        actor = actor_class.options(
            name=None, scheduling_strategy=PlacementGroupSchedulingStrategy(group)).remote()
        pid = int(ray.get(actor.pid.remote(), timeout=120))
        handle = RayEngineHandle(actor, actor.run.remote(handshake_address, rank, zmq_keys),
                                 pid)
        self.handles.append(handle)
        return handle

    def close(self) -> None:
        """Kill what is left of the actors, remove their placement groups, and stop Ray if
        this launcher started it."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for handle in self.handles:
            handle.kill()
        for group in self._groups:
            with contextlib.suppress(Exception):
                remove_placement_group(group)
        self.handles, self._groups = [], []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
