"""A decode instance's pushed KV, from the producer's offer until its request takes it.

A push (PUT, PUT_ASYNC) starts with an offer naming its size. `offer` reserves the bytes at
once, so pushes arriving together cannot oversubscribe memory, in one of two pools:

- the receive buffer (`kv_buffer_size` bytes) when it has room and the instance has free KV
  blocks for the transfer (a hint the engine thread publishes: free blocks, less the blocks of
  buffered transfers not taken yet);
- else the overflow pool (`kv_overflow_size` bytes);
- else neither: the producer is told to hold (back-pressure). It keeps its lease and the
  consumer pulls the transfer (GET) when its request comes.

On an accelerator the buffer would be device memory and the overflow pool host memory; here
both hold host tensors, with separate accounting. A transfer whose request has not taken it
within the TTL (from its offer), complete or not (a producer that died mid-push), is dropped
by `expire` and counted. Ids of transfers taken, released or dropped are remembered (bounded,
for the TTL) so late layers for them are dropped at once.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from engine_core.executors.kv_endpoint import KVLayer

__all__ = ["ReceiveBuffer", "TransferState"]

logger = logging.getLogger(__name__)

BUFFER, OVERFLOW = "buffer", "overflow"


class TransferState(enum.Enum):
    UNKNOWN = enum.auto()  # nothing heard of it yet
    ARRIVING = enum.auto()  # accepted, layers on the way
    COMPLETE = enum.auto()  # every layer here: `take` it
    HELD = enum.auto()  # told to hold, or refused: the producer keeps it, pull it (GET)
    GONE = enum.auto()  # taken, released, expired or dropped


class ReceiveStats(Protocol):
    """The counters and gauges `ReceiveBuffer` keeps up to date (`KVTransferStats`)."""

    transfers_held: int
    overflow_transfers: int
    pushes_expired: int
    buffer_bytes: int
    overflow_bytes: int


@dataclass
class _Transfer:
    pool: str  # BUFFER or OVERFLOW
    num_blocks: int
    num_bytes: int  # reserved at the offer
    since: float  # the offer's time
    layers: list[KVLayer] = field(default_factory=list)
    received_bytes: int = 0
    done: bool = False


class ReceiveBuffer:
    """Thread-safe bookkeeping of pushed transfers by lease id: the KV endpoint thread offers,
    adds layers and marks them done, the fetcher thread takes them, the engine thread publishes
    free blocks. `wait` blocks until something changes (bounded); `clock` is injectable."""

    def __init__(self, buffer_size: float, overflow_size: float, ttl_s: float,
                 stats: ReceiveStats, clock: Callable[[], float] = time.monotonic,
                 max_records: int = 4096) -> None:
        self.buffer_size = buffer_size
        self.overflow_size = overflow_size
        self.ttl_s = ttl_s
        self.stats = stats
        self.clock = clock
        self.max_records = max_records
        self._cond = threading.Condition()
        self._transfers: dict[str, _Transfer] = {}
        self._held: OrderedDict[str, float] = OrderedDict()  # lease id -> when
        self._finished: OrderedDict[str, float] = OrderedDict()  # lease id -> when
        self._bytes = {BUFFER: 0, OVERFLOW: 0}
        self._free_blocks: int | None = None  # unknown until the engine publishes it
        self._version = 0  # bumped on every change a waiter may care about

    # ---- the engine thread --------------------------------------------------------------------
    def set_free_blocks(self, num_free_blocks: int) -> None:
        """The instance's free KV blocks now (the hint `offer` checks against)."""
        with self._cond:
            self._free_blocks = num_free_blocks

    # ---- the KV endpoint thread ---------------------------------------------------------------
    def offer(self, lease_id: str, num_blocks: int, num_bytes: int) -> tuple[bool, str | None]:
        """Reserve room for a pushed transfer: (accepted, reason if not)."""
        with self._cond:
            if lease_id in self._finished:
                return False, "this transfer is already finished here"
            if lease_id in self._transfers or lease_id in self._held:
                return False, "this transfer was already offered"
            if num_blocks < 0 or num_bytes < 0:
                return False, f"bad offer: {num_blocks} blocks, {num_bytes} bytes"
            pending = sum(t.num_blocks for t in self._transfers.values() if t.pool == BUFFER)
            has_blocks = self._free_blocks is None or num_blocks <= self._free_blocks - pending
            if has_blocks and self._bytes[BUFFER] + num_bytes <= self.buffer_size:
                pool = BUFFER
            elif self._bytes[OVERFLOW] + num_bytes <= self.overflow_size:
                pool = OVERFLOW
                self.stats.overflow_transfers += 1
            else:
                self._remember(self._held, lease_id)
                self.stats.transfers_held += 1
                self._changed()
                return False, (f"hold: no room for {num_bytes} bytes (buffer "
                               f"{self._bytes[BUFFER]}/{self.buffer_size:.0f}, overflow "
                               f"{self._bytes[OVERFLOW]}/{self.overflow_size:.0f} bytes)")
            self._transfers[lease_id] = _Transfer(pool, num_blocks, num_bytes, self.clock())
            self._add_bytes(pool, num_bytes)
            return True, None

    def refuse(self, lease_id: str) -> None:
        """An offer refused for another reason (another KV layout): its request pulls it."""
        with self._cond:
            if lease_id not in self._transfers and lease_id not in self._finished:
                self._remember(self._held, lease_id)
                self._changed()

    def add_layer(self, layer: KVLayer) -> str | None:
        """Keep one pushed layer; None, or why it was dropped (no accepted offer for it, or
        more bytes than offered: then the whole transfer is dropped)."""
        lease_id = layer.header.lease_id
        nbytes = 2 * layer.k.numel() * layer.k.element_size()
        with self._cond:
            transfer = self._transfers.get(lease_id)
            if transfer is None:
                return ("the transfer is already finished here" if lease_id in self._finished
                        else "no accepted offer for this transfer")
            if transfer.done or transfer.received_bytes + nbytes > transfer.num_bytes:
                self._drop(lease_id)
                return f"more than the {transfer.num_bytes} bytes offered: transfer dropped"
            transfer.layers.append(layer)
            transfer.received_bytes += nbytes
            return None

    def done(self, lease_id: str) -> bool:
        """The producer has sent every layer; False if no such transfer is arriving."""
        with self._cond:
            transfer = self._transfers.get(lease_id)
            if transfer is None:
                return False
            transfer.done = True
            self._changed()
            return True

    def expire(self) -> list[str]:
        """Drop transfers older than the TTL (counted), forget old held and finished ids.
        Returns the dropped transfers' ids."""
        with self._cond:
            cutoff = self.clock() - self.ttl_s
            gone = [lease_id for lease_id, t in self._transfers.items() if t.since <= cutoff]
            for lease_id in gone:
                self._drop(lease_id)
            self.stats.pushes_expired += len(gone)
            for records in (self._held, self._finished):
                while records and next(iter(records.values())) <= cutoff:
                    records.popitem(last=False)
        for lease_id in gone:
            logger.warning("dropped pushed KV of %s: its request did not come within %.1f s",
                           lease_id, self.ttl_s)
        return gone

    # ---- the fetcher thread (and ReleaseKV) ---------------------------------------------------
    def state(self, lease_id: str) -> TransferState:
        with self._cond:
            return self._state(lease_id)

    def take(self, lease_id: str) -> list[KVLayer] | None:
        """The layers of a complete transfer, which leaves the buffer (its bytes are freed);
        None if it is not complete."""
        with self._cond:
            transfer = self._transfers.get(lease_id)
            if transfer is None or not transfer.done:
                return None
            self._drop(lease_id)
            return transfer.layers

    def drop(self, lease_id: str) -> TransferState:
        """Forget a transfer (released, or its request gave up on it); returns its state before.
        Late layers for it are dropped."""
        with self._cond:
            state = self._state(lease_id)
            self._held.pop(lease_id, None)
            if lease_id in self._transfers:
                self._drop(lease_id)
            else:
                self._remember(self._finished, lease_id)
                self._changed()
            return state

    @property
    def version(self) -> int:
        """Read before looking at states; `wait(version)` then misses no change."""
        return self._version

    def wait(self, version: int, timeout: float) -> None:
        """Block until something changed since `version` (a transfer completed, was held or
        dropped, or `notify` was called), or `timeout` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != version, timeout)

    def notify(self) -> None:
        with self._cond:
            self._changed()

    # ---- sizes --------------------------------------------------------------------------------
    @property
    def num_transfers(self) -> int:
        with self._cond:
            return len(self._transfers)

    @property
    def buffer_bytes(self) -> int:
        return self._bytes[BUFFER]

    @property
    def overflow_bytes(self) -> int:
        return self._bytes[OVERFLOW]

    # ---- internals (the lock held) ------------------------------------------------------------
    def _state(self, lease_id: str) -> TransferState:
        transfer = self._transfers.get(lease_id)
        if transfer is not None:
            return TransferState.COMPLETE if transfer.done else TransferState.ARRIVING
        if lease_id in self._held:
            return TransferState.HELD
        if lease_id in self._finished:
            return TransferState.GONE
        return TransferState.UNKNOWN

    def _changed(self) -> None:
        self._version += 1
        self._cond.notify_all()

    def _drop(self, lease_id: str) -> None:
        transfer = self._transfers.pop(lease_id)
        self._add_bytes(transfer.pool, -transfer.num_bytes)
        self._remember(self._finished, lease_id)
        self._changed()

    def _add_bytes(self, pool: str, nbytes: int) -> None:
        self._bytes[pool] += nbytes
        self.stats.buffer_bytes = self._bytes[BUFFER]
        self.stats.overflow_bytes = self._bytes[OVERFLOW]

    def _remember(self, records: OrderedDict[str, float], lease_id: str) -> None:
        records[lease_id] = self.clock()
        records.move_to_end(lease_id)
        while len(records) > self.max_records:
            records.popitem(last=False)
