"""The KV endpoint of an instance: one ROUTER socket, served by one thread, on both sides.

A producer serves pulls (`PullKV` -> a layer message per layer, then `PullDone`) and takes
`ReleaseKV` (the engine thread ends the lease). A consumer answers push offers (reserving
room in its receive buffer, or hold), keeps pushed layers for their accepted transfers, and
drops buffered KV on `ReleaseKV` or past its TTL. Anything else is dropped and counted."""

from __future__ import annotations

import logging
import queue
import threading
import time

import msgspec
import zmq

from engine_core.executors.kv_endpoint import KVFrameError, decode_layer
from engine_core.kv_transfer.kv_wire import (
    KVControl,
    PullDone,
    PullKV,
    PushDone,
    PushOffer,
    PushReply,
    ReleaseKV,
)
from engine_core.kv_transfer.local_kv import LocalKV
from engine_core.kv_transfer.receive_buffer import ReceiveBuffer
from engine_core.kv_transfer.transfer_stats import DroppedMessages
from engine_core.kv_transfer_config import KVTransferConfig
from engine_core.messages import KVTransferStats
from engine_core.transport import CurveKeys, secure_server

__all__ = ["SWEEP_INTERVAL_S", "KVServer"]

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.5  # how often a consumer drops buffered KV past its TTL

_control = msgspec.msgpack.Decoder(KVControl)


class KVServer:
    """`run` is the endpoint thread: it binds `endpoint` (a CurveZMQ server with `keys`), sets
    `ready` (with `bind_error` on failure), and serves until `stop`. Lease ids released by a
    peer go on `released` for the engine thread (producer)."""

    def __init__(self, endpoint: str, kv_config: KVTransferConfig, local: LocalKV,
                 received: ReceiveBuffer, stats: KVTransferStats, drop: DroppedMessages,
                 released: queue.SimpleQueue[str], stop: threading.Event) -> None:
        self.endpoint = endpoint
        self.kv_config = kv_config
        self.local = local
        self.received = received
        self.stats = stats
        self.drop = drop
        self.released = released
        self.stop = stop
        self.bind_error: str | None = None

    def run(self, ctx: zmq.Context, keys: CurveKeys | None, ready: threading.Event) -> None:
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        secure_server(sock, keys)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            self.bind_error = str(exc)
            sock.close()
            return
        finally:
            ready.set()
        last_sweep = time.monotonic()
        try:
            while not self.stop.is_set():
                if time.monotonic() - last_sweep >= SWEEP_INTERVAL_S:
                    self.received.expire()  # buffered KV whose request never came
                    last_sweep = time.monotonic()
                if sock.poll(100):
                    self._serve_one(sock, sock.recv_multipart(copy=False))
        finally:
            sock.close()

    def _serve_one(self, sock: zmq.Socket, frames: list) -> None:
        if len(frames) == 4:  # a pushed layer: identity, header, K, V
            self._receive_layer(frames[1:])
            return
        if len(frames) != 2:
            self.drop(f"a KV control message of {len(frames)} frames")
            return
        identity, payload = frames[0].bytes, frames[1].bytes
        try:
            message = _control.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.drop(f"a bad KV control message: {exc}")
            return
        if isinstance(message, ReleaseKV):  # from any authenticated peer (D, the proxy)
            if self.kv_config.is_producer:
                self.released.put(message.lease_id)  # the engine thread ends it
            if self.kv_config.is_consumer:
                self.received.drop(message.lease_id)
        elif isinstance(message, PullKV):
            self._send_lease(sock, identity, message)
        elif isinstance(message, PushOffer):
            reply = self._answer_offer(message)
            sock.send_multipart([identity, msgspec.msgpack.encode(reply)])
        elif isinstance(message, PushDone):
            if not self.received.done(message.lease_id):
                self.drop(f"PushDone of {message.lease_id!r}, no such push arriving")
        else:
            self.drop(f"an unexpected {type(message).__name__}")

    # ---- producer: serving a pull -------------------------------------------------------------
    def _send_lease(self, sock: zmq.Socket, identity: bytes, pull: PullKV) -> None:
        start = time.perf_counter()
        error, leased = None, None
        if pull.compat_hash != self.local.compat_hash:
            error = f"KV layout hash {pull.compat_hash} differs from {self.local.compat_hash}"
        else:
            try:  # a stage that died or timed out must not end the endpoint thread
                leased = self.local.read_lease(pull.lease_id)
            except RuntimeError as exc:
                error = f"reading the KV of lease {pull.lease_id!r} failed: {exc}"
            else:
                if leased is None:
                    error = f"unknown KV lease {pull.lease_id!r}"
        if leased is None:  # `error` says why
            self.drop(f"a KV pull: {error}")
            sock.send_multipart([identity, msgspec.msgpack.encode(PullDone(error))])
            return
        lease, layers = leased
        for frames in self.local.encode(lease.lease_id, lease.num_tokens, layers):
            sock.send_multipart([identity, *frames], copy=False)
            self.stats.sent_bytes += sum(memoryview(f).nbytes for f in frames)
        sock.send_multipart([identity, msgspec.msgpack.encode(PullDone())])
        self.stats.sent_tokens += lease.num_tokens
        self.stats.seconds += time.perf_counter() - start

    # ---- consumer: pushes arriving ------------------------------------------------------------
    def _answer_offer(self, offer: PushOffer) -> PushReply:
        """Reserve room for a push (buffer, else overflow), or say hold, or refuse it."""
        reason = None
        if not self.kv_config.is_consumer:
            reason = f"this instance is a {self.kv_config.kv_role}, it takes no KV"
        elif offer.compat_hash != self.local.compat_hash:
            reason = f"KV layout hash {offer.compat_hash} differs from {self.local.compat_hash}"
        elif offer.num_bytes != offer.num_blocks * self.local.block_bytes:
            reason = (f"{offer.num_bytes} bytes offered for {offer.num_blocks} blocks of "
                      f"{self.local.block_bytes} bytes")
        if reason is not None:
            self.drop(f"a push offer of {offer.lease_id!r}: {reason}")
            if self.kv_config.is_consumer:
                self.received.refuse(offer.lease_id)
            return PushReply(offer.lease_id, False, reason)
        accepted, reason = self.received.offer(offer.lease_id, offer.num_blocks,
                                               offer.num_bytes)
        if not accepted:
            logger.info("push of %s not accepted: %s", offer.lease_id, reason)
        return PushReply(offer.lease_id, accepted, reason)

    def _receive_layer(self, frames: list) -> None:
        """Keep a pushed layer for its accepted transfer; drop it (counted) otherwise."""
        try:
            layer = decode_layer(frames)
        except KVFrameError as exc:
            self.drop(f"a pushed KV message: {exc}")
            return
        header = layer.header
        error: str | None
        if header.compat_hash != self.local.compat_hash:
            error = f"KV layout hash {header.compat_hash}, ours is {self.local.compat_hash}"
        else:
            error = self.received.add_layer(layer)
        if error is not None:
            self.drop(f"a pushed KV layer of {header.lease_id!r}: {error}")
            return
        self.stats.received_bytes += 2 * layer.k.numel() * layer.k.element_size()
