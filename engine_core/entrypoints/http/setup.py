"""What the HTTP front doors (`pp-engine serve`, `pp-engine proxy`) share around their app:
binding the port early, the `--api-key` check, OpenAI-style error bodies for every error, SSE
responses that always end their event generator, and leaving cleanly on SIGTERM."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from engine_core.entrypoints.http.errors import RequestError, error_body

__all__ = ["ClosingStreamingResponse", "add_error_handlers", "api_key_check", "exit_on_sigterm",
           "listen"]


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body's async generator however the response ends.

    Starlette's leaves the generator suspended at its `yield` when sending a chunk fails or is
    cancelled (the client went away mid-send); the generator's `finally`, which aborts the work
    behind the stream, then runs only when the garbage collector gets to it, and a reference
    cycle through the exception can put that off for as long as the process lives."""

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


def add_error_handlers(app: FastAPI) -> None:
    """Answer a `RequestError` and every HTTP error of the framework (404, 405, ...) with an
    OpenAI error body."""

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse(error_body(str(exc.detail), code=exc.status_code),
                            status_code=exc.status_code, headers=exc.headers)


def listen(host: str, port: int) -> socket.socket:
    """Bind the port before anything slow starts, so a port in use fails at once (ValueError).
    Port 0 binds a free port (read it from `getsockname()`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def api_key_check(api_key: str) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency: 401 unless the request carries `Authorization: Bearer <api_key>`."""
    expected = f"Bearer {api_key}".encode()

    async def check(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not secrets.compare_digest(given, expected):
            raise RequestError("missing or incorrect API key; send 'Authorization: Bearer KEY'",
                               status=401, code="invalid_api_key")

    return check


def exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM handler: leave through the `finally` blocks (exit code 0). uvicorn re-raises a
    SIGTERM it captured once it has shut down; this turns it into a clean exit."""
    raise SystemExit(0)
