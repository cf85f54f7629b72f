"""What the HTTP front doors (`pp-engine serve`, `pp-engine proxy`) share around their app:
binding the port early, the `--api-key` check, OpenAI-style error bodies for every error, SSE
responses that always end their event generator, CORS, checking TLS files before anything
starts, and leaving cleanly on SIGTERM."""

from __future__ import annotations

import secrets
import socket
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from engine_core.entrypoints.http.errors import RequestError, error_body

__all__ = ["ClosingStreamingResponse", "CorsConfig", "add_cors", "add_error_handlers",
           "api_key_check", "check_tls_files", "exit_on_sigterm", "listen"]


@dataclass(frozen=True)
class CorsConfig:
    """Cross-origin access to the API (vLLM's `--allowed-origins`, `--allowed-methods`,
    `--allowed-headers`, `--allow-credentials`; by default any origin, method and header)."""

    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False


def add_cors(app: FastAPI, cors: CorsConfig) -> None:
    """Answer CORS preflights and add the Access-Control-* headers to responses for the
    allowed origins (Starlette's CORSMiddleware). Added last, so it wraps every other
    middleware: an error response (401, 413) carries the headers too."""
    app.add_middleware(CORSMiddleware, allow_origins=list(cors.allowed_origins),
                       allow_methods=list(cors.allowed_methods),
                       allow_headers=list(cors.allowed_headers),
                       allow_credentials=cors.allow_credentials)


def check_tls_files(keyfile: str | None, certfile: str | None, ca_certs: str | None,
                    cert_reqs: int | None) -> None:
    """ValueError naming the flag unless the TLS files load (what uvicorn will do once the
    engine is up): a certificate (`--ssl-certfile`, its key in `--ssl-keyfile` or in the same
    file) and, to check client certificates, `--ssl-ca-certs`."""
    if certfile is None:
        for flag, value in (("--ssl-keyfile", keyfile), ("--ssl-ca-certs", ca_certs),
                            ("--ssl-cert-reqs", cert_reqs)):
            if value is not None:
                raise ValueError(f"{flag} needs --ssl-certfile (TLS is on when a certificate "
                                 f"is given)")
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        files = f"--ssl-certfile {certfile!r}" + (f", --ssl-keyfile {keyfile!r}" if keyfile
                                                  else "")
        raise ValueError(f"{files}: cannot load the certificate and its key: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    if ca_certs is not None:
        try:
            context.load_verify_locations(ca_certs)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"--ssl-ca-certs: cannot load {ca_certs!r}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None


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
