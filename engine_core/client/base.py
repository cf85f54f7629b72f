"""The front-end's view of "an engine core": one declared interface per calling style.

`AsyncLLM` (and through it the server) talks to an `AsyncEngineClient`:
`core_client.EngineCoreClient`, for one engine-core process or N (local, remote, Ray), so it
does not care how many engines there are. `LLM` talks to a `SyncEngineClient`: `EngineCore` in
process, or `sync.SyncEngineCoreClient` (the same client behind a synchronous facade) for
`engine_process=True` and data parallelism. The client comes from `factory.make_client`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from engine_core.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    SchedulerStats,
)

__all__ = ["AsyncEngineClient", "EngineState", "SyncEngineClient"]


@dataclass(frozen=True)
class EngineState:
    """One engine core as the front-end sees it (for /metrics and tests)."""

    index: int  # the data-parallel rank
    alive: bool
    stats: SchedulerStats
    num_routed: int  # requests sent to it so far
    pid: int | None = None  # None for a remote engine


@runtime_checkable
class AsyncEngineClient(Protocol):
    """The contract `AsyncLLM` relies on.

    - `add_requests(requests)`: queue the sequences of one user request; all of them go to the
      same engine (they share a prompt). RuntimeError if no engine can take them.
    - `abort_requests(ids)`: each id reaches the engine that owns it; unknown ids are ignored.
    - `get_outputs(timeout_s=None)`: the next batch; while another engine lives, a request
      whose engine died is finished here with finish_reason "error" and that engine's error.
      RuntimeError once no engine is left (the client is dead), naming why the last one died;
      the requests still open are then the caller's to fail. TimeoutError if `timeout_s`
      passes without a batch.
    - `engine_states()`: one `EngineState` per engine; `stats()`: the sum over live engines.
    - `is_alive()`: at least one engine lives. `stop_engines()`: stop and reap the processes
      (blocking; safe off the event loop). `shutdown()`: that, and close every socket.
    """

    def add_requests(self, requests: Sequence[EngineCoreRequest]) -> None: ...

    def abort_requests(self, request_ids: list[str]) -> None: ...

    async def get_outputs(self, timeout_s: float | None = None) -> EngineCoreOutputs: ...

    def stats(self) -> SchedulerStats: ...

    def engine_states(self) -> list[EngineState]: ...

    def is_alive(self) -> bool: ...

    def stop_engines(self) -> None: ...

    def shutdown(self) -> None: ...


@runtime_checkable
class SyncEngineClient(Protocol):
    """The contract `LLM` relies on (`EngineCore`'s own surface): `add_requests` queues the
    sequences of one user request, `step()` returns the next outputs (blocking, bounded) and
    raises RuntimeError when the engine (every engine) is dead, `stats()` is the load of the
    engine (the sum over live engines)."""

    def add_requests(self, requests: list[EngineCoreRequest]) -> None: ...

    def abort_requests(self, request_ids: list[str]) -> None: ...

    def has_unfinished_requests(self) -> bool: ...

    def step(self) -> list[EngineCoreOutput]: ...

    def stats(self) -> SchedulerStats: ...

    def shutdown(self) -> None: ...
