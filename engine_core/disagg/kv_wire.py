"""KV control messages (placeholder until the connector branch lands)."""

from __future__ import annotations

import msgspec

__all__ = ["ReleaseKV"]


class ReleaseKV(msgspec.Struct, tag=True):
    lease_id: str
