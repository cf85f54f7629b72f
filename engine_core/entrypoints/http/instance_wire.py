"""Proxy <-> instance request traffic (msgspec, never pickle), on DEALER -> ROUTER sockets.

Each proxy holds one asyncio DEALER per instance, whose routing id is the proxy's id, and
multiplexes its requests on it by `request_id`; the instance binds a ROUTER (its `request_address`
at registration). Several proxies may share an instance: each request names its proxy
(`reply_to`), and the instance answers there and nowhere else.

    proxy -> instance   ProxyRequest        an OpenAI request body, plus typed transfer params
    proxy -> instance   ProxyAbort          the client went away: abort, free the blocks
    instance -> proxy   ResponseHead        the HTTP status and media type, once
    instance -> proxy   ResponseChunk ...   the body (one chunk for JSON, one per SSE event);
                                            the last has `last=True` and, on a prefill
                                            instance, the KV transfer params of each prompt

The instance serves a `ProxyRequest` through its own OpenAI app, so a response is byte for byte
what `pp-engine serve` would have answered over HTTP.
"""

from __future__ import annotations

import msgspec

from engine_core.transfer_params import KVTransferParams

__all__ = [
    "ROUTES",
    "InstanceMessage",
    "ProxyAbort",
    "ProxyMessage",
    "ProxyRequest",
    "ResponseChunk",
    "ResponseHead",
]

ROUTES = ("/v1/completions", "/v1/chat/completions")


class ProxyRequest(msgspec.Struct, tag=True, omit_defaults=True):
    """One OpenAI request for an instance.

    `reply_to`: the proxy that accepted the request, by the id it gave the instance at
    registration (also the routing id of its connection): every response message goes there,
    and the instance aborts the request if that proxy stops answering its heartbeats. A request
    naming no proxy the instance is registered with is dropped. `route`: one of `ROUTES`.
    `body`: the JSON body (for the prefill leg the proxy has set max_tokens to 1 and turned
    streaming off). `do_remote_decode`: keep the prompts' KV for a decode instance and return
    its params. `push_to` (PUT/PUT_ASYNC prefill): the decode
    instance's KV endpoint and layout hash; prompt i is pushed as transfer
    `f"{push_to.lease_id}-{i}"`. `kv_transfer_params` (decode leg): per prompt, what the
    prefill instance returned (None: compute that prompt here)."""

    request_id: str
    route: str
    body: bytes
    reply_to: str = ""  # the sending proxy's return address (its id, from RegisterReply)
    do_remote_decode: bool = False
    push_to: KVTransferParams | None = None
    kv_transfer_params: list[KVTransferParams | None] = []


class ProxyAbort(msgspec.Struct, tag=True):
    request_id: str


class ResponseHead(msgspec.Struct, tag=True):
    request_id: str
    status: int
    media_type: str


class ResponseChunk(msgspec.Struct, tag=True, omit_defaults=True):
    request_id: str
    data: bytes
    last: bool = False
    kv_transfer_params: list[KVTransferParams | None] = []  # prefill leg: per prompt


ProxyMessage = ProxyRequest | ProxyAbort
InstanceMessage = ResponseHead | ResponseChunk
