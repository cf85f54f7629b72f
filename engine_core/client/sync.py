"""`SyncDPClient`: the data-parallel client with `EngineCore`'s synchronous surface, for `LLM`.

It runs the one asyncio implementation (`dp.DPEngineCoreClient`) on a private event loop, so the
routing, handshake and fault handling exist once for `LLM` and `AsyncLLM`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from engine_core.client.base import EngineState
from engine_core.client.dp import DPEngineCoreClient
from engine_core.config import DataParallelConfig, EngineArgs
from engine_core.messages import EngineCoreOutput, EngineCoreRequest, SchedulerStats

__all__ = ["SyncDPClient"]


class SyncDPClient:
    """Implements `base.SyncEngineClient` over N engine cores. `step()` waits for the next
    batch from any engine (at most about a second: idle engines send heartbeats) and raises
    RuntimeError once every engine is dead; a request whose engine died comes back with
    finish_reason "error"."""

    def __init__(self, engine_args: EngineArgs, dp: DataParallelConfig, *,
                 transport: str = "ipc", zmq_keys: str | None = None,
                 insecure_tcp: bool = False, timeout_s: float = 600.0) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self.client = self._loop.run_until_complete(DPEngineCoreClient.start(
                engine_args, dp, transport=transport, zmq_keys=zmq_keys,
                insecure_tcp=insecure_tcp, timeout_s=timeout_s))
        except BaseException:
            self._loop.close()
            raise

    def add_requests(self, requests: Sequence[EngineCoreRequest]) -> None:
        self.client.add_requests(requests)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.client.add_requests([request])

    def abort_requests(self, request_ids: list[str]) -> None:
        self.client.abort_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.client.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        return self._loop.run_until_complete(self.client.get_outputs()).outputs

    @property
    def stats(self) -> SchedulerStats:
        return self.client.stats

    def engine_states(self) -> list[EngineState]:
        return self.client.engine_states()

    def is_alive(self) -> bool:
        return self.client.is_alive()

    def shutdown(self) -> None:
        if not self._loop.is_closed():
            self.client.shutdown()
            self._loop.close()
