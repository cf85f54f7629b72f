"""The KV control plane: the small messages instances (and the proxy) exchange with a KV
endpoint, apart from the KV itself (`executors/kv_endpoint.py`: one multipart message per layer).

Only msgspec Structs live here (no torch, no zmq), so the proxy can import them cheaply. Each is
one msgpack frame sent by a DEALER to an instance's KV endpoint (a ROUTER, CurveZMQ when keys are
configured); the endpoint answers on the same connection. `lease_id` names one transfer: with
GET it is P's lease id, with PUT/PUT_ASYNC the transfer id the proxy chose (P leases under it).

    from -> to   message                           answer / effect
    D -> P       PullKV(lease_id, compat_hash)     the layers, then PullDone(error=None), or
                                                   PullDone(error) (unknown lease, other layout)
    P -> D       PushOffer(lease_id, compat_hash,  PushReply(lease_id, accepted, reason): D has
                           num_blocks, num_bytes)  reserved room (its buffer or overflow pool),
                                                   or says hold (back-pressure) / refuses
    P -> D       the layers, then                  (only after an accepted offer)
                 PushDone(lease_id, num_layers)
    any -> P, D  ReleaseKV(lease_id)               no answer. P ends the lease and frees its
                                                   blocks; D drops what it buffered for it

`ReleaseKV` is what D sends P once it has pulled a transfer (or gave up on it), and what the
proxy sends both P and D when a client request ends before D took the KV.
"""

from __future__ import annotations

import msgspec

__all__ = ["KVControl", "PullDone", "PullKV", "PushDone", "PushOffer", "PushReply", "ReleaseKV"]


class PullKV(msgspec.Struct, tag=True):
    """D asks P for the layers of lease `lease_id` (D's KV layout: `compat_hash`)."""

    lease_id: str
    compat_hash: str


class PullDone(msgspec.Struct, tag=True):
    """P's last answer to a `PullKV`: every layer was sent (`error` None), or why none was."""

    error: str | None = None


class PushOffer(msgspec.Struct, tag=True):
    """P offers to push transfer `lease_id`: `num_blocks` blocks, `num_bytes` bytes of K and V
    over all layers. P sends no layer before an accepted `PushReply`."""

    lease_id: str
    compat_hash: str
    num_blocks: int
    num_bytes: int


class PushReply(msgspec.Struct, tag=True):
    """D's answer to a `PushOffer`. Not accepted: `reason` says why (another KV layout, or
    "hold": no room now, D pulls the transfer with GET when its request comes)."""

    lease_id: str
    accepted: bool
    reason: str | None = None


class PushDone(msgspec.Struct, tag=True):
    """P has sent every layer of transfer `lease_id` (`num_layers` layer messages)."""

    lease_id: str
    num_layers: int


class ReleaseKV(msgspec.Struct, tag=True):
    """The sender no longer needs this transfer: a producer ends the lease and frees its blocks;
    a consumer drops what it buffered (or noted as held) for it. Unknown ids are ignored."""

    lease_id: str


KVControl = PullKV | PullDone | PushOffer | PushReply | PushDone | ReleaseKV
