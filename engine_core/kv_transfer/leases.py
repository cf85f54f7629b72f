"""A producer's leases: blocks of finished prefills held for a decoder until it (or the proxy)
releases them, or until the lease's time-to-live runs out."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Lease", "LeaseTable"]


@dataclass(frozen=True)
class Lease:
    lease_id: str
    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    expires_at: float


class LeaseTable:
    """Pure bookkeeping (no blocks are freed here): the caller frees the blocks of each lease
    that `release` or `expire` returns. `clock` is injectable for tests."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self.clock = clock
        self._leases: dict[str, Lease] = {}
        self._prefix = os.urandom(4).hex()
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, lease_id: str) -> bool:
        return lease_id in self._leases

    def grant(self, request_id: str, block_ids: list[int], num_tokens: int,
              lease_id: str | None = None) -> Lease:
        """Lease `block_ids` of `request_id` as `lease_id` (None: a fresh id of this table).
        ValueError if `lease_id` is already leased."""
        if lease_id is None:
            lease_id = f"{self._prefix}-{next(self._ids)}"
        elif lease_id in self._leases:
            raise ValueError(f"lease_id {lease_id!r} is already leased")
        lease = Lease(lease_id, request_id, tuple(block_ids), num_tokens,
                      self.clock() + self.ttl_s)
        self._leases[lease.lease_id] = lease
        return lease

    def request_ids(self) -> set[str]:
        return {lease.request_id for lease in self._leases.values()}

    def get(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    def release(self, lease_id: str) -> Lease | None:
        """The decoder has the KV (or gave up, or the proxy released it): the lease ends. None
        for an unknown lease."""
        return self._leases.pop(lease_id, None)

    def expire(self) -> list[Lease]:
        """End and return every lease past its time-to-live."""
        now = self.clock()
        gone = [lease for lease in self._leases.values() if lease.expires_at <= now]
        for lease in gone:
            del self._leases[lease.lease_id]
        return gone
