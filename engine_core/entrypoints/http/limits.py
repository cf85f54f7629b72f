"""The request body limit: a pure ASGI middleware that answers 413 once a body is too large.

It never buffers a body itself. A declared `Content-Length` over the limit is refused before
the app runs; otherwise it counts the bytes the app actually receives (chunked bodies
included) and stops the read with `RequestTooLarge` as soon as the count passes the limit, so
at most one chunk beyond the limit is ever held in memory. The server (uvicorn) discards the
rest of the body as it arrives, so the client can finish sending and read the 413.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from engine_core.entrypoints.http.errors import RequestError

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "RequestBodyLimit", "RequestTooLarge"]

DEFAULT_MAX_REQUEST_BYTES = 4 << 20  # 4 MiB

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestTooLarge(RequestError):
    """The request body passed the limit (HTTP 413)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"the request body is larger than this server's limit of {max_bytes} "
                         f"bytes (--max-request-bytes)", status=413, code=413)


class RequestBodyLimit:
    """ASGI middleware: HTTP requests whose body exceeds `max_bytes` get a 413 OpenAI error.

    The app sees a `receive` that raises `RequestTooLarge` (a `RequestError`, so the app's own
    error handling may answer it) once the body passes the limit; if the exception escapes the
    app before a response has started, this middleware sends the 413 itself."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _send_413(send, self.max_bytes)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except RequestTooLarge:
            if started:
                raise
            await _send_413(send, self.max_bytes)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(send: Send, max_bytes: int) -> None:
    body = json.dumps(RequestTooLarge(max_bytes).body()).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
