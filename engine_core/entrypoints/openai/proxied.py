"""The seam between a disaggregation instance (`instance.py`) and the OpenAI serving
(`serving.py`): a request from the proxy is served like its HTTP route, with its KV transfer side
as a typed argument and the KV transfer params the engine returned as a typed result.

    instance --(scope, receive, send, KVTransferRequest)--> ProxiedApp --> KVTransferResult

Nothing of it rides in the ASGI scope, and neither side writes into an object the other holds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from engine_core.transfer_params import KVTransferParams

__all__ = ["KVTransferRequest", "KVTransferResult", "ProxiedApp"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class KVTransferRequest:
    """The transfer side of one proxied request (`instance_wire.ProxyRequest`'s fields).

    `do_remote_decode` (prefill leg): keep each prompt's KV for a decode instance. `push_to`
    (PUT/PUT_ASYNC prefill): the decode instance to push to; prompt i is pushed as transfer
    `f"{push_to.lease_id}-{i}"`. `params_in` (decode leg): per prompt, where its KV is (None or
    missing: compute that prompt here)."""

    do_remote_decode: bool = False
    push_to: KVTransferParams | None = None
    params_in: tuple[KVTransferParams | None, ...] = ()

    def params_for(self, index: int) -> KVTransferParams | None:
        """What the engine request of prompt `index` carries."""
        if self.push_to is not None:
            return msgspec.structs.replace(self.push_to,
                                           lease_id=f"{self.push_to.lease_id}-{index}")
        return self.params_in[index] if index < len(self.params_in) else None


@dataclass(frozen=True)
class KVTransferResult:
    """What a proxied request's engine requests returned: per prompt, in prompt order, the KV
    transfer params of its final output (a prefill leg's, for the decode instance; None where
    the engine returned none). Empty when the request failed before any prompt ran."""

    params: tuple[KVTransferParams | None, ...] = ()


class ProxiedApp(Protocol):
    """Serves one proxied request as the route `scope["path"]` of the HTTP server would (same
    body limit, error bodies, streaming; `receive` yielding `http.disconnect` aborts it), and
    returns once the whole response has gone to `send`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send,
                       kv_transfer: KVTransferRequest) -> KVTransferResult: ...
