"""`SyncEngineCoreClient`: engine-core processes behind `EngineCore`'s synchronous surface.

`LLM` uses it for `engine_process=True` (one engine) and for data parallelism (N engines). It
runs the one asyncio implementation (`core_client.EngineCoreClient`) on a private event loop,
so the launch, routing, handshake and fault handling exist once for `LLM` and `AsyncLLM`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from engine_core.client.base import EngineState
from engine_core.client.core_client import EngineCoreClient
from engine_core.messages import EngineCoreOutput, EngineCoreRequest, SchedulerStats

__all__ = ["SyncEngineCoreClient"]


class SyncEngineCoreClient:
    """Implements `base.SyncEngineClient` over an `EngineCoreClient` (from
    `factory.make_client`), which it starts (raising what `EngineCoreClient.start` raises) and
    owns. `step()` waits for the next batch from any engine, at most `step_timeout_s`
    (TimeoutError, rather than a hang), and raises RuntimeError once every engine is dead (for
    one engine: with its error text); while another engine lives, a request whose engine died
    comes back with finish_reason "error"."""

    def __init__(self, client: EngineCoreClient, *, startup_timeout_s: float = 600.0,
                 step_timeout_s: float = 600.0) -> None:
        self.client = client
        self.step_timeout_s = step_timeout_s
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(client.start(startup_timeout_s))
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
        """The next batch of outputs (waits for it; see the class)."""
        return self._loop.run_until_complete(
            self.client.get_outputs(self.step_timeout_s)).outputs

    def stats(self) -> SchedulerStats:
        """The sum over live engines (as `EngineCore.stats()` for one in process)."""
        return self.client.stats()

    def engine_states(self) -> list[EngineState]:
        return self.client.engine_states()

    def is_alive(self) -> bool:
        return self.client.is_alive()

    def shutdown(self) -> None:
        """Stop the engines and close the client. Idempotent."""
        if not self._loop.is_closed():
            self.client.shutdown()
            self._loop.close()
