"""What a KV connector counts: transfers in both directions, drops, leases, back-pressure."""

from __future__ import annotations

import logging

import msgspec

from engine_core.transport import WarningLimiter

__all__ = ["DroppedMessages", "KVTransferStats"]


class KVTransferStats(msgspec.Struct):
    """Counters since start (both sides; an instance counts what its role does) and two gauges.
    Written by the connector's threads, read by the engine's stats."""

    sent_tokens: int = 0
    received_tokens: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    seconds: float = 0.0  # spent moving KV, both directions, summed over transfers
    dropped_messages: int = 0
    leases_expired: int = 0  # producer: leases whose decoder never took them
    pushes_expired: int = 0  # consumer: buffered pushes whose request never came
    transfers_held: int = 0  # back-pressure: pushes D told to hold / P was told to hold
    overflow_transfers: int = 0  # consumer: pushes that went to the overflow pool
    buffer_bytes: int = 0  # consumer, now: bytes reserved in the receive buffer
    overflow_bytes: int = 0  # consumer, now: bytes reserved in the overflow pool


class DroppedMessages:
    """Count a peer's message that was dropped (garbage, a wrong layout, nothing it belongs
    to) and log why, rate-limited so a flood cannot fill the disk."""

    def __init__(self, stats: KVTransferStats, logger: logging.Logger) -> None:
        self.stats = stats
        self._warnings = WarningLimiter(logger)

    def __call__(self, what: str) -> None:
        self.stats.dropped_messages += 1
        self._warnings.warning("dropped %s", what)
