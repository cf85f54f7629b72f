"""The engine-core process: the two-stage loop between a ZMQ input and output socket.

Startup handshake (every wait bounded):

    front-end (binds)                      engine core (connects)
       | <------------ HELLO ----------------- |   handshake DEALER -> ROUTER
       | -- INIT: addresses, engine identity,  |
       |    engine args ---------------------> |
       |                       [load model, allocate KV cache]
       | <-- b"hello" on the input socket ---- |   so the front-end can route to it
       | <------------ READY ------------------ |   (config hash; or the error that stopped it)

The wire: the front-end binds a ROUTER for input and a ROUTER for output; the engine connects a
DEALER to each, both with the routing id `HandshakeInit.engine_identity`, a random secret the
front-end chose. Inputs arrive as two frames, a kind (`add` / `abort` / `shutdown`) and a
msgspec payload, sent only to that identity (a stranger attached to the socket gets nothing);
`EngineCoreOutputs` leave as one frame and the front-end drops any frame whose sender identity
is not its engine's. Only token ids cross. Every frame is decoded inside a try: a malformed or
unknown frame is logged (capped) and dropped, and a request that decodes but is invalid is
answered alone with `finish_reason="error"`; the engine keeps serving.

Over tcp every socket (handshake, input, output) is CurveZMQ when the front-end was given a key
directory: the engine gets that directory as a process argument and connects as a CURVE client
(see `transport.py`). One front-end ROUTER can hold several engines, one identity each.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import signal
import socket
import time

import msgspec
import zmq

from engine_core.config import EngineArgs, EngineConfig, config_mismatch
from engine_core.engine import EngineCore
from engine_core.executors.factory import make_executor, make_proposer
from engine_core.messages import (
    AbortRequests,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    HandshakeHello,
    HandshakeInit,
    HandshakeReady,
    SchedulerStats,
)
from engine_core.transport import CurveKeys, WarningLimiter, load_client_keys, secure_client
from engine_core.validation import MAX_REQUEST_ID_CHARS

logger = logging.getLogger(__name__)

KIND_ADD, KIND_ABORT, KIND_SHUTDOWN = b"add", b"abort", b"shutdown"
KIND_HELLO = b"hello"  # engine -> front-end, once, on the input socket
KIND_PING = b"ping"  # front-end -> engine: a no-op that tells the front-end the engine is there
HANDSHAKE_TIMEOUT_MS = 30_000
IDLE_POLL_MS = 500  # how often an idle engine checks that its parent is still alive
HEARTBEAT_MS = 1000  # an idle headless engine still sends its stats this often
KV_TRANSFER_POLL_MS = 2  # how often an engine with nothing to compute checks on KV transfers


def run_engine_core(handshake_address: str, engine_index: int = 0,
                    zmq_keys: str | None = None, engine_args: bytes | None = None,
                    watch_front_end: bool = False) -> int:
    """Entry point of the engine-core process (also of a remote, headless engine); returns
    its exit code (0 after a requested shutdown).

    `engine_index`: the data-parallel rank this engine asks for in its HELLO.
    `zmq_keys`: a CurveZMQ key directory (`pp-engine keys`); with it every connection,
    the handshake's included, is a CURVE client of the front-end.
    `engine_args`: msgspec-encoded `EngineArgs` of a headless engine, which runs its own
    arguments (the front-end's INIT then only checks that the configs agree); None: run the
    front-end's. `watch_front_end`: exit when the connection to the front-end drops (a headless
    engine has no front-end parent process to watch)."""
    with contextlib.suppress(ValueError):  # not the main thread (a Ray actor, say)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front-end decides when we stop
    keys = load_client_keys(zmq_keys) if zmq_keys is not None else None
    ctx = zmq.Context()
    handshake = ctx.socket(zmq.DEALER)
    handshake.setsockopt(zmq.LINGER, 1000)
    secure_client(handshake, keys)
    handshake.connect(handshake_address)
    handshake.send(msgspec.msgpack.encode(HandshakeHello(
        engine_index, os.getpid(), socket.gethostname(), engine_version())))
    init = None
    if handshake.poll(HANDSHAKE_TIMEOUT_MS):
        try:
            init = msgspec.msgpack.decode(handshake.recv(), type=HandshakeInit)
        except msgspec.DecodeError as exc:
            logger.error("undecodable INIT from the front-end (%s); exiting", exc)
    else:
        logger.error("engine %d: no INIT from the front-end at %s within %d ms; exiting",
                     engine_index, handshake_address, HANDSHAKE_TIMEOUT_MS)
    if init is None:
        handshake.close(linger=0)
        ctx.term()
        return 1
    try:
        args = msgspec.msgpack.decode(engine_args if engine_args is not None
                                      else init.engine_args, type=EngineArgs)
        config = args.resolve()
        mismatch = (config_mismatch(init.config_fields, config.config_fields())
                    if init.config_fields else None)
        if mismatch is not None:
            raise ConfigMismatchError(f"engine {engine_index} refused: {mismatch}")
        engine = _make_engine(config)
    except Exception as exc:
        if isinstance(exc, ConfigMismatchError):
            logger.error("%s", exc)
        handshake.send(msgspec.msgpack.encode(
            HandshakeReady(error=str(exc), error_type=_error_type(exc))))
        handshake.close()
        ctx.term()
        return 1
    input_socket = _connect(ctx, init.input_address, init.engine_identity, keys)
    monitor = input_socket.get_monitor_socket(zmq.EVENT_DISCONNECTED) if watch_front_end \
        else None
    input_socket.send(KIND_HELLO)  # queued until connected; READY follows
    output_socket = _connect(ctx, init.output_address, init.engine_identity, keys)
    output_socket.setsockopt(zmq.LINGER, 2000)
    output_socket.setsockopt(zmq.SNDTIMEO, IDLE_POLL_MS)  # never block forever on a gone peer
    handshake.send(msgspec.msgpack.encode(HandshakeReady(
        config_hash=engine.config.config_hash(), num_kv_blocks=engine.executor.num_kv_blocks,
        config_fields=engine.config.config_fields(), stats=engine.stats())))
    handshake.close()
    loop = EngineCoreLoop(engine, input_socket, output_socket, monitor)
    try:
        loop.run()
    finally:
        engine.shutdown()
        if monitor is not None:
            input_socket.disable_monitor()
            monitor.close(linger=0)
        input_socket.close(linger=0)
        output_socket.close()
        ctx.term()
    return 0 if loop.stopping else 1


def _error_type(exc: BaseException) -> str:
    """The error's name for READY; "ValueError" for its subclasses (a KV cache too large for
    the host, say), which the front-end raises as ValueError: a bad setting, not a crash."""
    if isinstance(exc, ValueError) and not isinstance(exc, ConfigMismatchError):
        return "ValueError"
    return type(exc).__name__


def _make_engine(config: EngineConfig) -> EngineCore:
    """The engine core, with its draft proposer when it speculates with a draft model, and a
    KV connector when it is a prefill/decode instance."""
    executor = make_executor(config)
    proposer = make_proposer(config, executor)  # shuts the executor down if it raises
    connector = None
    if config.kv_transfer is not None:
        from engine_core.kv_transfer.connector import KVConnector

        try:
            connector = KVConnector(config, config.kv_transfer, executor.kv_stages(),
                                    host=config.kv_transfer.kv_ip,
                                    lease_ttl_s=config.kv_transfer.lease_ttl_s,
                                    zmq_keys=config.kv_transfer.zmq_keys)
        except BaseException:
            if proposer is not None:
                proposer.shutdown()
            executor.shutdown()
            raise
    return EngineCore(config, executor, kv_connector=connector, proposer=proposer)


class ConfigMismatchError(ValueError):
    """The engine's own config differs from the front-end's (names the fields)."""


def engine_version() -> str:
    """The installed pp-engine version, sent in HELLO and shown by /version ("unknown" from a
    source tree)."""
    try:
        return importlib.metadata.version("pp-engine")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _connect(ctx: zmq.Context, address: str, identity: bytes,
             keys: CurveKeys | None) -> zmq.Socket:
    """A DEALER with the engine's routing id, connected to one of the front-end's ROUTERs."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.setsockopt(zmq.LINGER, 0)
    # ZMTP heartbeats: a peer host that vanished without closing the connection is noticed
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
    secure_client(sock, keys)
    sock.connect(address)
    return sock


class EngineCoreLoop:
    """Busy loop of the engine-core process: take inputs, step, publish outputs."""

    def __init__(self, engine: EngineCore, input_socket: zmq.Socket,
                 output_socket: zmq.Socket, monitor: zmq.Socket | None = None) -> None:
        self.engine = engine
        self.input_socket = input_socket
        self.output_socket = output_socket
        self.request_decoder = msgspec.msgpack.Decoder(EngineCoreRequest)
        self.abort_decoder = msgspec.msgpack.Decoder(AbortRequests)
        self.bad_frames = WarningLimiter(logger)
        self.encoder = msgspec.msgpack.Encoder()
        self.stopping = False
        self.parent_pid = os.getppid()
        self._last_stats: SchedulerStats | None = None
        self._last_send = time.monotonic()
        # A headless engine's: EVENT_DISCONNECTED of the input socket. Such an engine also sends
        # its stats at least every HEARTBEAT_MS (the front-end's sign that it lives).
        self.monitor = monitor

    def run(self) -> None:
        parent = self.parent_pid
        while not self.stopping:
            if self.engine.needs_compute():
                timeout_ms = 0
            elif self.engine.has_kv_transfers():  # only waiting on KV moving: no busy spin
                timeout_ms = KV_TRANSFER_POLL_MS
            else:
                timeout_ms = IDLE_POLL_MS
            inputs_changed = self._take_inputs(timeout_ms)
            if self.stopping:
                break
            outputs: list[EngineCoreOutput] = []
            if self.engine.needs_compute() or self.engine.has_kv_transfers():
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # a stage died or failed: report it and exit
                    logger.exception("engine step failed")
                    self._send(EngineCoreOutputs(stats=self.engine.stats(), error=str(exc)))
                    return
            # with KV transfer, stats also change off the loop (transfers, leases released)
            if outputs or inputs_changed or self.engine.kv_connector is not None:
                self._publish(outputs)
            elif (self.monitor is not None
                  and time.monotonic() - self._last_send > HEARTBEAT_MS / 1000):
                self._send(EngineCoreOutputs(stats=self.engine.stats()))  # "still alive"
            if os.getppid() != parent:
                logger.error("the front-end process is gone; exiting")
                return
            if self.monitor is not None and self.monitor.poll(0):
                logger.error("the connection to the front-end dropped; exiting")
                return

    def _take_inputs(self, timeout_ms: int) -> bool:
        """Apply every queued input; wait up to timeout_ms for the first. True if any arrived."""
        if not self.input_socket.poll(timeout_ms):
            return False
        while True:
            try:
                frames = self.input_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            try:
                self._handle(frames)
            except Exception as exc:  # a bug for one message must not end the engine
                self.bad_frames.warning("failed to apply an input of %d frame(s): %r",
                                        len(frames), exc)
            if self.stopping:
                return True

    def _handle(self, frames: list[bytes]) -> None:
        """Apply one input message. Never raises for what arrived: a malformed frame is logged
        (kind and sizes only, never the payload) and dropped."""
        kind = frames[0][:16] if frames else b""
        if len(frames) != 2:
            self.bad_frames.warning("dropped an input of %d frame(s) (sizes %s, kind %r)",
                                    len(frames), [len(f) for f in frames][:8], kind)
            return
        payload = frames[1]
        if kind == KIND_ADD:
            self._add(payload)
        elif kind == KIND_ABORT:
            try:
                request_ids = self.abort_decoder.decode(payload).request_ids
            except msgspec.DecodeError as exc:
                self.bad_frames.warning("dropped an undecodable %r input (%d bytes): %s",
                                        kind, len(payload), exc)
                return
            self.engine.abort_requests(request_ids)
        elif kind == KIND_SHUTDOWN:
            self.stopping = True
        elif kind == KIND_PING:
            pass
        else:
            self.bad_frames.warning("dropped an input of unknown kind %r (%d bytes)",
                                    kind, len(payload))

    def _add(self, payload: bytes) -> None:
        """Decode and add one request. An invalid one (bad fields, or refused by
        `EngineCore.add_request`) is finished alone with finish_reason "error" if its id can be
        read, else logged and dropped."""
        try:
            request = self.request_decoder.decode(payload)
        except msgspec.ValidationError as exc:  # well-formed msgpack, invalid request
            request_id = _recover_request_id(payload)
            self.bad_frames.warning("rejected an invalid add input (%d bytes, request_id %s): %s",
                                    len(payload), "unreadable" if request_id is None
                                    else repr(request_id), exc)
            if request_id is not None:
                self._reject(request_id, f"invalid request: {exc}")
            return
        except msgspec.DecodeError as exc:
            self.bad_frames.warning("dropped an undecodable b'add' input (%d bytes): %s",
                                    len(payload), exc)
            return
        try:
            self.engine.add_request(request)
        except ValueError as exc:  # the front-end validates first; this is a last line
            self.bad_frames.warning("rejected request %r: %s", request.request_id[:64], exc)
            self._reject(request.request_id, str(exc))

    def _reject(self, request_id: str, message: str) -> None:
        if request_id in self.engine.scheduler.requests:
            return  # a duplicate of a live request's id: answering it would end that request
        self._send(EngineCoreOutputs(outputs=[EngineCoreOutput(
            request_id, [], finish_reason="error", error=message)]))

    def _publish(self, outputs: list[EngineCoreOutput]) -> None:
        stats = self.engine.stats()
        if outputs or stats != self._last_stats:
            self._send(EngineCoreOutputs(outputs=outputs, stats=stats))
            self._last_stats = stats

    def _send(self, message: EngineCoreOutputs) -> None:
        data = self.encoder.encode(message)
        self._last_send = time.monotonic()
        while True:
            try:
                self.output_socket.send(data)
                return
            except zmq.Again:  # the front-end is not reading: wait while it still exists
                if os.getppid() != self.parent_pid:
                    raise RuntimeError("the front-end process is gone") from None


def _recover_request_id(payload: bytes) -> str | None:
    """The request_id of an add payload that failed validation, if one can be read safely."""
    try:
        request_id = msgspec.msgpack.decode(payload, type=_RequestIdOnly).request_id
    except msgspec.DecodeError:
        return None
    return request_id if 0 < len(request_id) <= MAX_REQUEST_ID_CHARS else None


class _RequestIdOnly(msgspec.Struct):
    """Reads only the id of an `EngineCoreRequest` (other fields are skipped unvalidated)."""

    request_id: str
