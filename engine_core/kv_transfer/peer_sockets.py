"""One thread's DEALER sockets to peers' KV endpoints."""

from __future__ import annotations

import time

import zmq

from engine_core.transport import CurveKeys, secure_client

__all__ = ["PeerSockets"]


class PeerSockets:
    """DEALER sockets by endpoint, made on first use (CurveZMQ clients when `keys` are given).
    A peer that did not answer in time is `silence`d: its socket is closed (what was queued for
    it is dropped) and `is_silent` says so for `silent_s`, so a dead peer costs one wait, not one
    per request. Not thread-safe: each thread has its own."""

    def __init__(self, ctx: zmq.Context, keys: CurveKeys | None, silent_s: float) -> None:
        self.ctx, self.keys, self.silent_s = ctx, keys, silent_s
        self._sockets: dict[str, zmq.Socket] = {}
        self._silent_until: dict[str, float] = {}

    def get(self, endpoint: str) -> zmq.Socket:
        sock = self._sockets.get(endpoint)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            secure_client(sock, self.keys)
            sock.setsockopt(zmq.LINGER, 1000)
            try:
                sock.connect(endpoint)  # ZMQError if `endpoint` is not an address
            except zmq.ZMQError:
                sock.close(linger=0)
                raise
            self._sockets[endpoint] = sock
        return sock

    def silence(self, endpoint: str) -> None:
        self._sockets.pop(endpoint).close(linger=0)
        self._silent_until[endpoint] = time.monotonic() + self.silent_s

    def is_silent(self, endpoint: str) -> bool:
        until = self._silent_until.get(endpoint)
        if until is not None and until <= time.monotonic():
            del self._silent_until[endpoint]
            until = None
        return until is not None

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()
