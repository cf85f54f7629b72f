"""The proxy's side of its instances: the discovery socket, one connection per instance, and the
requests waiting on each.

    instance DEALER --Register/Heartbeat--> discovery ROUTER (bound by the proxy)
    proxy DEALER (one per instance) --ProxyRequest/ProxyAbort--> instance ROUTER
    proxy DEALER <--ResponseHead/ResponseChunk-- instance ROUTER
    proxy DEALER (one per KV endpoint) --ReleaseKV--> instance KV endpoint

The proxy's id (`proxy_id`, random per start) is its return address: it answers every
registration, is the routing id of each of its DEALERs, and every ProxyRequest carries it as
`reply_to`, so instances shared by several proxies answer each request to the one that sent it.

Every message is one msgpack frame (`discovery.py`, `wire.py`); the discovery ROUTER replies
with the frames the instance sent before its message (a REQ-style empty delimiter, if any)
echoed back. Frames that do not decode are dropped and logged, at a capped rate.

A request on an instance is a `Leg`: the proxy sends its `ProxyRequest` and reads the replies,
which a reader task per connection routes by (instance, request id) into the leg's queue.
Every read waits at most `request_timeout_s`, and a leg fails at once when its instance stops
heartbeating (checked every few hundred ms) or registers again at another request address.

Everything here runs on the event loop thread (zmq.asyncio), including the socket sends: a
`Leg` only puts frames in its connection's outbox, so aborting never awaits and is safe inside
a cancelled task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import zmq
import zmq.asyncio

from engine_core.entrypoints.http.discovery_wire import (
    CONSUMER_ROLES,
    PRODUCER_ROLES,
    DiscoveryMessage,
    Heartbeat,
    HeartbeatReply,
    Register,
    RegisterReply,
)
from engine_core.entrypoints.http.errors import RequestError
from engine_core.entrypoints.http.instance_wire import (
    InstanceMessage,
    ProxyAbort,
    ProxyMessage,
    ProxyRequest,
    ResponseChunk,
    ResponseHead,
)
from engine_core.entrypoints.proxy.discovery import InstanceInfo, NoInstanceError, Registry
from engine_core.kv_transfer.kv_wire import ReleaseKV
from engine_core.transfer_params import KVTransferParams
from engine_core.transport import (
    CurveAuthenticator,
    CurveKeys,
    WarningLimiter,
    is_loopback_host,
    load_client_keys,
    load_server_keys,
    prepare_router,
    secure_client,
)

if TYPE_CHECKING:
    from collections.abc import Collection

    from engine_core.entrypoints.proxy.config import ProxyConfig

__all__ = ["InstancePool", "Leg", "LegFailed"]

logger = logging.getLogger("engine_core.entrypoints.proxy.server")

_MAX_DISCOVERY_MESSAGE_BYTES = 1 << 20  # a Register is a few hundred bytes


class LegFailed(RequestError):
    """A leg's instance failed (HTTP 502, code "instance_failed") or sent nothing in time
    (504, code "instance_timeout"); the message names the role and the instance."""

    def __init__(self, leg: Leg, message: str, timeout: bool = False) -> None:
        super().__init__(f"the {leg.role} instance {leg.instance_id} {message}",
                         status=504 if timeout else 502, type="server_error",
                         code="instance_timeout" if timeout else "instance_failed")
        self.instance_id = leg.instance_id


@dataclass
class _Gone:
    """Put in a leg's queue when its instance is dropped: the reason, for the error."""

    reason: str


@dataclass
class _Connection:
    """The proxy's DEALER to one instance, its outbox, and the tasks that serve it."""

    instance_id: str
    address: str
    socket: zmq.asyncio.Socket
    outbox: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class Leg:
    """One request on one instance (the prefill or the decode half of a client request).

    The caller `send`s one ProxyRequest, reads the ResponseHead (`head`) and the chunks
    (`chunk`) until one has `last`, and must `release` the leg in every case (a `finally`):
    release sends a ProxyAbort if the instance may still be working on it, and gives back the
    instance's in-flight count. Reads raise `LegFailed`."""

    def __init__(self, pool: InstancePool, info: InstanceInfo, request_id: str, role: str,
                 timeout_s: float) -> None:
        self.info, self.request_id, self.role = info, request_id, role
        self.instance_id = info.register.instance_id
        self.queue: asyncio.Queue[ResponseHead | ResponseChunk | _Gone] = asyncio.Queue()
        self.sent = self.finished = self.released = False
        self._pool, self._timeout_s = pool, timeout_s
        info.in_flight += 1

    def send(self, message: ProxyMessage) -> None:
        """Queue a message for the instance (never blocks). From a ProxyRequest on, the
        instance's replies with this request id come to this leg."""
        self._pool._send(self, message)
        self.sent = True

    async def _receive(self) -> ResponseHead | ResponseChunk:
        try:
            item = await asyncio.wait_for(self.queue.get(), self._timeout_s)
        except asyncio.TimeoutError:
            raise LegFailed(self, f"sent nothing for {self._timeout_s:g} s "
                                  f"(--request-timeout-s)", timeout=True) from None
        if isinstance(item, _Gone):
            raise LegFailed(self, item.reason)
        return item

    async def head(self) -> ResponseHead:
        """The response's status and media type (the first message)."""
        message = await self._receive()
        if not isinstance(message, ResponseHead):
            raise LegFailed(self, "sent a body chunk before the response head")
        return message

    async def chunk(self) -> ResponseChunk:
        """The next piece of the body; `last` on the final one."""
        message = await self._receive()
        if not isinstance(message, ResponseChunk):
            raise LegFailed(self, "sent a second response head")
        if message.last:
            self.finished = True
        return message

    async def read_all(self) -> tuple[ResponseHead, list[ResponseChunk]]:
        """The head and every chunk, up to the last."""
        head = await self.head()
        chunks = [await self.chunk()]
        while not chunks[-1].last:
            chunks.append(await self.chunk())
        return head, chunks

    def release(self) -> None:
        """Abort the request on the instance if it may still run it; forget the leg. Never
        awaits (safe in a cancelled task); idempotent."""
        if self.released:
            return
        self.released = True
        if self.sent and not self.finished:
            self.send(ProxyAbort(self.request_id))
        self._pool._forget(self)
        self.info.in_flight -= 1


class InstancePool:
    """The registered instances and the proxy's connections to them.

    `start()` (on the event loop) binds the discovery socket and starts the tasks; `close()`
    stops them, closes every socket and terminates the ZMQ context. With `config.zmq_keys`
    the discovery socket is a CURVE server admitting only the directory's client keys, and the
    connections to instances are CURVE clients with the client pair."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.registry = Registry(heartbeat_timeout_s=config.heartbeat_timeout_s)
        self.encoder = msgspec.msgpack.Encoder()
        self._discovery_decoder = msgspec.msgpack.Decoder(DiscoveryMessage)
        self._instance_decoder = msgspec.msgpack.Decoder(InstanceMessage)
        self._warnings = WarningLimiter(logger)
        self.proxy_id = f"proxy-{uuid.uuid4().hex[:16]}"
        self.num_unrouted = 0  # instance messages that matched no open leg
        self._connections: dict[str, _Connection] = {}
        self._kv_sockets: dict[str, zmq.asyncio.Socket] = {}  # by instance id: for ReleaseKV
        self._legs: dict[tuple[str, str], Leg] = {}
        self._ctx: zmq.asyncio.Context | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._auth: CurveAuthenticator | None = None
        self._client_keys: CurveKeys | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.discovery_address = ""

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the discovery ROUTER (port 0: a free one; see `discovery_address`) and start
        serving it. ValueError if the port cannot be bound or the keys cannot be read."""
        keys_dir = self.config.zmq_keys
        server_keys = load_server_keys(keys_dir) if keys_dir is not None else None
        self._client_keys = load_client_keys(keys_dir) if keys_dir is not None else None
        self._ctx = zmq.asyncio.Context()
        if server_keys is not None:
            self._auth = CurveAuthenticator(zmq.Context.shadow(self._ctx.underlying), server_keys)
        self._router = self._ctx.socket(zmq.ROUTER)
        prepare_router(self._router, server_keys, _MAX_DISCOVERY_MESSAGE_BYTES)
        host, port = self.config.discovery_host, self.config.discovery_port
        endpoint = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        if ":" in host:
            self._router.setsockopt(zmq.IPV6, 1)
        try:
            self._router.bind(endpoint if port else endpoint.rsplit(":", 1)[0] + ":*")
        except zmq.ZMQError as exc:
            await self.close()
            raise ValueError(f"cannot bind the discovery socket {endpoint}: {exc}") from None
        self.discovery_address = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._tasks = [asyncio.create_task(self._serve_discovery()),
                       asyncio.create_task(self._expire_loop())]
        logger.info("discovery socket on %s (CurveZMQ %s)", self.discovery_address,
                    "on" if server_keys is not None else "off")

    async def close(self) -> None:
        """Stop every task, fail the legs still waiting, close the sockets, end the context."""
        self._closing = True
        tasks = self._tasks + [t for c in self._connections.values() for t in c.tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        for instance_id in list(self._connections):
            self._drop(instance_id, "is gone: the proxy is shutting down")
        for sock in self._kv_sockets.values():
            sock.close(linger=0)
        self._kv_sockets.clear()
        if self._router is not None:
            self._router.close(linger=0)
            self._router = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # ---- what the request handlers use --------------------------------------------------------
    def pick(self, producer: bool, exclude: Collection[str] = ()) -> InstanceInfo:
        """The least loaded live instance of the role; NoInstanceError naming the role."""
        self._reconcile()
        return self.registry.pick(producer, exclude)

    def pick_pair(self, exclude: Collection[str] = ()) -> tuple[InstanceInfo, InstanceInfo]:
        """Prefill and decode instances for a request (`Registry.pick_pair`: the same instance
        for both means colocated); NoInstanceError naming the missing role."""
        self._reconcile()
        return self.registry.pick_pair(exclude)

    def has_instance(self, producer: bool, exclude: Collection[str] = ()) -> bool:
        try:
            self.pick(producer, exclude)
        except NoInstanceError:
            return False
        return True

    def missing_roles(self) -> list[str]:
        """Why the proxy cannot serve yet: one NoInstanceError message per missing role."""
        missing = []
        for producer in (True, False):
            try:
                self.pick(producer)
            except NoInstanceError as exc:
                missing.append(str(exc))
        return missing

    def instances(self) -> list[InstanceInfo]:
        self._reconcile()
        return list(self.registry.instances.values())

    def model_name(self) -> str | None:
        """The model the registered instances serve (they all agree), if any says."""
        return next((i.register.model_name for i in self.instances() if i.register.model_name),
                    None)

    def open(self, info: InstanceInfo, request_id: str, role: str) -> Leg:
        """A leg for `request_id` on the instance, counted in its in-flight load until released.
        An instance gone by the time the leg sends gives a leg that fails on its first read."""
        return Leg(self, info, request_id, role, self.config.request_timeout_s)

    def _send(self, leg: Leg, message: ProxyMessage) -> None:
        connection = self._connections.get(leg.instance_id)
        if connection is None:  # gone since it was picked
            if isinstance(message, ProxyRequest):
                leg.queue.put_nowait(_Gone("is no longer registered"))
            return
        if isinstance(message, ProxyRequest):
            # Legs are routed by (instance, request id) from their request on: the two legs of
            # a request on one kv_both instance share the id, one after the other.
            self._legs[(leg.instance_id, leg.request_id)] = leg
            message = msgspec.structs.replace(message, reply_to=self.proxy_id)
        connection.outbox.put_nowait(self.encoder.encode(message))

    def release_kv(self, params: list[KVTransferParams | None], decode: InstanceInfo) -> None:
        """A request ended before its decode instance took the KV its prefill instance holds
        for it: tell the prefill instance to end those leases now (and the decode instance to
        drop what was pushed to it), rather than at their expiry. Only registered endpoints are
        sent to; never blocks, and a send that cannot go out is dropped (the leases expire)."""
        for param in params:
            if param is None or not param.lease_id or not param.block_ids:
                continue
            targets = [info for info in self.registry.instances.values()
                       if info.register.kv_endpoint == param.kv_endpoint]
            if param.send_type != "GET" and decode.instance_id in self.registry.instances:
                targets.append(decode)
            for info in targets:
                self._send_kv_control(info, ReleaseKV(param.lease_id))

    def _send_kv_control(self, info: InstanceInfo, message: ReleaseKV) -> None:
        assert self._ctx is not None
        sock = self._kv_sockets.get(info.instance_id)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 1000)
            secure_client(sock, self._client_keys)
            try:
                sock.connect(info.register.kv_endpoint)
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                self._warnings.warning("cannot reach the KV endpoint %r of %s: %s",
                                       info.register.kv_endpoint, info.instance_id, exc)
                return
            self._kv_sockets[info.instance_id] = sock
        with contextlib.suppress(zmq.Again):
            sock.send(self.encoder.encode(message), zmq.NOBLOCK)

    def _forget(self, leg: Leg) -> None:
        key = (leg.instance_id, leg.request_id)
        if self._legs.get(key) is leg:
            del self._legs[key]

    # ---- discovery ----------------------------------------------------------------------------
    async def _serve_discovery(self) -> None:
        assert self._router is not None
        router = self._router
        while True:
            frames = await router.recv_multipart()
            if len(frames) < 2:
                self._warnings.warning("discovery: dropped a message without a payload frame")
                continue
            try:
                message = self._discovery_decoder.decode(frames[-1])
            except msgspec.DecodeError as exc:
                self._warnings.warning("discovery: dropped a malformed frame: %s", exc)
                continue
            if isinstance(message, Register):
                reply: RegisterReply | HeartbeatReply = self._register(message)
            else:
                reply = HeartbeatReply(known=self._heartbeat(message))
            try:
                await router.send_multipart([*frames[:-1], self.encoder.encode(reply)])
            except zmq.ZMQError as exc:  # the instance went away meanwhile
                self._warnings.warning("discovery: could not reply: %s", exc)

    def _register(self, message: Register) -> RegisterReply:
        instance_id = message.instance_id
        if self._client_keys is None and not self.config.insecure_tcp:
            for name, address in (("request_address", message.request_address),
                                  ("kv_endpoint", message.kv_endpoint)):
                host = address.removeprefix("tcp://").rpartition(":")[0]
                if not is_loopback_host(host):
                    return RegisterReply(f"refused: {name} {address!r} is not on this host and "
                                         f"the proxy runs without CurveZMQ keys (pass "
                                         f"--zmq-keys, or --insecure-tcp)")
        reply = self.registry.register(message)
        if reply.error is not None:
            logger.warning("refused instance %s (%s at %s): %s", instance_id, message.role,
                           message.request_address, reply.error)
            return reply
        old = self._connections.get(instance_id)
        if old is not None and old.address != message.request_address:
            self._drop(instance_id, "registered again at a new request address")
        if instance_id not in self._connections:
            try:
                self._connect(instance_id, message.request_address)
            except zmq.ZMQError as exc:
                self.registry.instances.pop(instance_id, None)
                return RegisterReply(f"refused: cannot connect to request_address "
                                     f"{message.request_address!r}: {exc}")
        logger.info("instance %s registered: %s, requests at %s, KV at %s (%s)", instance_id,
                    message.role, message.request_address, message.kv_endpoint,
                    message.send_type)
        self._reconcile()
        return RegisterReply(proxy_id=self.proxy_id)

    def _heartbeat(self, message: Heartbeat) -> bool:
        self._reconcile()  # an instance past its timeout is gone, even if it beats again now
        return self.registry.heartbeat(message)

    async def _expire_loop(self) -> None:
        period = min(0.5, self.config.heartbeat_timeout_s / 5)
        while True:
            await asyncio.sleep(period)
            self._reconcile()

    def _reconcile(self) -> None:
        """Forget silent instances and drop the connections the registry no longer backs."""
        self.registry.expire()
        for instance_id, connection in list(self._connections.items()):
            info = self.registry.instances.get(instance_id)
            if info is None:
                self._drop(instance_id, f"stopped heartbeating (silent for more than "
                                        f"{self.config.heartbeat_timeout_s:g} s)")
            elif info.register.request_address != connection.address:
                self._drop(instance_id, "registered again at a new request address")

    # ---- connections --------------------------------------------------------------------------
    def _connect(self, instance_id: str, address: str) -> None:
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, self.proxy_id.encode())  # the instance answers here
        secure_client(sock, self._client_keys)
        try:
            sock.connect(address)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        connection = _Connection(instance_id, address, sock)
        connection.tasks = [asyncio.create_task(self._read(connection)),
                            asyncio.create_task(self._write(connection))]
        self._connections[instance_id] = connection

    def _drop(self, instance_id: str, reason: str) -> None:
        """Close the connection and fail every leg on the instance at once."""
        connection = self._connections.pop(instance_id)
        for task in connection.tasks:
            task.cancel()
        connection.socket.close(linger=0)
        kv_socket = self._kv_sockets.pop(instance_id, None)
        if kv_socket is not None:
            kv_socket.close(linger=0)
        failed = [leg for (iid, _), leg in self._legs.items() if iid == instance_id]
        for leg in failed:
            leg.queue.put_nowait(_Gone(reason))
            self._forget(leg)
        if failed or not self._closing:
            logger.warning("instance %s %s; %d request(s) on it failed", instance_id, reason,
                           len(failed))

    async def _read(self, connection: _Connection) -> None:
        """Route the instance's replies to their legs; drop what belongs to no live leg (the
        late reply of an aborted or retried request) or does not decode."""
        while True:
            frames = await connection.socket.recv_multipart()
            try:
                message = self._instance_decoder.decode(frames[-1])
            except msgspec.DecodeError as exc:
                self._warnings.warning("instance %s: dropped a malformed frame: %s",
                                       connection.instance_id, exc)
                continue
            leg = self._legs.get((connection.instance_id, message.request_id))
            if leg is not None:
                leg.queue.put_nowait(message)
            else:
                self.num_unrouted += 1

    async def _write(self, connection: _Connection) -> None:
        while True:
            frame = await connection.outbox.get()
            await connection.socket.send(frame)

    # ---- metrics ------------------------------------------------------------------------------
    def count_by_role(self) -> dict[str, int]:
        """Registered instances per role (kv_producer, kv_consumer, kv_both)."""
        counts = dict.fromkeys(sorted(set(PRODUCER_ROLES + CONSUMER_ROLES)), 0)
        for info in self.instances():
            counts[info.register.role] += 1
        return counts
