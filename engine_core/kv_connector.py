"""The KV-connector interface the engine loop drives (disaggregated prefill/decode), declared
beside `Executor`: the loop calls `before_step` and `after_step` around each step, and a connector
sees and changes the scheduler only through `KVTransferView`. The implementation lives in
`engine_core/kv_transfer/` (`KVConnector`); the loop never imports it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from engine_core.kv_transfer_config import KVTransferConfig
    from engine_core.messages import EngineCoreOutput, KVTransferStats
    from engine_core.request import Request

__all__ = ["KVConnectorBase", "KVTransferView"]


class KVTransferView(Protocol):
    """What a KV connector may read and do of the scheduler (`Scheduler` implements it). Called
    from the engine thread only, between steps."""

    def num_free_blocks(self) -> int:
        """Free KV blocks now."""
        ...

    def requests_awaiting_kv(self) -> list[Request]:
        """Decode side: requests given blocks for their whole prompt, waiting (out of
        scheduling) for their KV to arrive; aborted ones among them are finished."""
        ...

    def requests_holding_kv(self) -> list[Request]:
        """Prefill side: finished requests whose blocks are kept for a decoder."""
        ...

    def block_ids(self, request_id: str) -> list[int]:
        """The blocks of a request above, in order."""
        ...

    def remote_kv_ready(self, request_id: str, ok: bool) -> None:
        """An awaiting request's KV is in its blocks (`ok`), or will not be (it computes its
        prompt itself): back to the waiting queue."""
        ...

    def free_held_kv(self, request_id: str) -> None:
        """A decoder has the KV of this held request (or its lease expired): free its blocks."""
        ...


class KVConnectorBase(ABC):
    """The engine side of KV transfer, owned by one `EngineCore`."""

    kv_config: KVTransferConfig

    @abstractmethod
    def before_step(self, scheduler: KVTransferView) -> None:
        """Apply what finished in the background (KV arrived, leases released or expired) and
        start transfers for requests that are ready for them."""

    @abstractmethod
    def after_step(self, scheduler: KVTransferView, outputs: list[EngineCoreOutput]) -> None:
        """Lend (and push) the blocks of finished prefills; their final `outputs` carry the
        transfer params."""

    @abstractmethod
    def set_free_blocks(self, num_free_blocks: int) -> None:
        """The engine's free blocks now (what a pushed transfer may take)."""

    @abstractmethod
    def stats(self) -> KVTransferStats:
        """A copy of the connector's figures now (`SchedulerStats.kv_transfer`)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the connector's threads and close its sockets. Idempotent."""
