"""What the HTTP front doors (`pp-engine serve`, `pp-engine proxy`) share around their app:
binding the port early, the `--api-key` check and leaving cleanly on SIGTERM."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Awaitable, Callable

from starlette.requests import Request

from engine_core.server.protocol import RequestError

__all__ = ["api_key_check", "exit_on_sigterm", "listen"]


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
