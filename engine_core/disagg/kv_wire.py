"""KV control messages (placeholder until the connector branch lands)."""

from __future__ import annotations

import msgspec

__all__ = ["ReleaseKV"]


class ReleaseKV(msgspec.Struct, tag=True):
    lease_id: str


class PullKV(msgspec.Struct, tag=True):
    lease_id: str
    compat_hash: str


class PushOffer(msgspec.Struct, tag=True):
    lease_id: str
    compat_hash: str
    num_blocks: int
    num_bytes: int


class PushReply(msgspec.Struct, tag=True):
    lease_id: str
    accepted: bool
    reason: str | None = None
