"""The compatibility of two instances' KV caches: a P/D pair may exchange KV blocks only if
model, dtype, block size and head layout agree."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine_core.config import EngineConfig

__all__ = ["kv_compat_fields", "kv_compat_hash", "kv_compat_mismatch"]


def kv_compat_fields(config: EngineConfig) -> dict[str, str]:
    """What decides whether KV written by one instance is valid on another (name -> JSON)."""
    m = config.model
    values: dict[str, object] = {
        "architecture": m.architecture, "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
        "num_layers": m.num_layers, "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
        "rope_theta": m.rope_theta, "dtype": config.dtype, "block_size": config.cache.block_size,
    }
    return {name: json.dumps(value) for name, value in values.items()}


def kv_compat_hash(fields: dict[str, str]) -> str:
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def kv_compat_mismatch(ours: dict[str, str], theirs: dict[str, str]) -> str | None:
    """None if the two agree, else a message naming every differing field."""
    names = sorted(n for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n))
    if not names:
        return None
    return "KV layout mismatch: " + "; ".join(
        f"{n} is {theirs.get(n, 'missing')} there but {ours.get(n, 'missing')} here"
        for n in names)
