"""What a prefill instance hands a decode instance (through the proxy) about a request's KV."""

from __future__ import annotations

import msgspec

__all__ = ["KVTransferParams"]


class KVTransferParams(msgspec.Struct, frozen=True, omit_defaults=True):
    """Where and how a decode instance gets a prefilled request's KV.

    `kv_endpoint`: P's KV endpoint address (for GET). `block_ids`: P's blocks holding the first
    `num_tokens` tokens of the prompt (whole blocks only). `compat_hash`: P's KV layout hash.
    `lease_id`: names P's hold on those blocks; P frees them after a push D accepted, when a
    `ReleaseKV` for it arrives (from D after a pull, or from the proxy) or when it expires. With
    PUT/PUT_ASYNC it is the transfer id the proxy chose, and the *prefill* request carries
    params too: D's `kv_endpoint` to push to and that `lease_id` (no blocks). `send_type` in
    P's answer: "GET" when P pushes nothing (then D pulls at once).
    """

    kv_endpoint: str
    block_ids: list[int]
    num_tokens: int
    compat_hash: str
    lease_id: str
    send_type: str = "PUT"
