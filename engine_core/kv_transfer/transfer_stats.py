"""Counting and logging the messages a KV connector drops (the counters: `KVTransferStats`,
a message of the core layer: it travels inside `SchedulerStats`)."""

from __future__ import annotations

import logging

from engine_core.messages import KVTransferStats
from engine_core.transport import WarningLimiter

__all__ = ["DroppedMessages"]


class DroppedMessages:
    """Count a peer's message that was dropped (garbage, a wrong layout, nothing it belongs
    to) and log why, rate-limited so a flood cannot fill the disk."""

    def __init__(self, stats: KVTransferStats, logger: logging.Logger) -> None:
        self.stats = stats
        self._warnings = WarningLimiter(logger)

    def __call__(self, what: str) -> None:
        self.stats.dropped_messages += 1
        self._warnings.warning("dropped %s", what)
