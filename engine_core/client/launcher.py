"""Clients of an engine-core process: spawn it, shake hands, send requests, receive outputs.

`EngineCoreProcClient` is synchronous and has the same surface as an in-process `EngineCore`
(add_request, abort_requests, step, has_unfinished_requests, shutdown), so `LLM` can run the
engine in a separate process unchanged. `AsyncEngineCoreClient` is its asyncio twin for
`AsyncLLM`. Sockets: ipc:// in a private (0700) temp dir by default, tcp:// when asked, and then
CurveZMQ with a key directory (or, explicitly, `insecure_tcp`). The front-end binds a ROUTER for
input and one for output and talks only to its engine's routing id (see `core_process.py` for
the wire). Everything on them is msgspec, every frame is decoded inside a try (a bad one is
logged, capped, and dropped), every wait has a timeout, and a dead engine process is noticed
within about a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import secrets
import shutil
import tempfile
import time

import msgspec
import zmq
import zmq.asyncio

from engine_core.client.base import EngineState
from engine_core.client.core_process import (
    KIND_ABORT,
    KIND_ADD,
    KIND_HELLO,
    KIND_SHUTDOWN,
    run_engine_core,
)
from engine_core.config import EngineArgs
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
from engine_core.transport import (
    CurveAuthenticator,
    WarningLimiter,
    load_server_keys,
    prepare_router,
    require_keys_for_tcp,
)

logger = logging.getLogger(__name__)

LIVENESS_POLL_S = 1.0
SHUTDOWN_TIMEOUT_S = 10.0
UNREACHABLE_RETRY_S = 0.05  # the engine's input socket is (re)connecting
INPUT_INBOUND_BYTES = 4096  # only the engine's hello arrives here (CURVE framing included)


class EngineProcess:
    """Spawns the engine-core process and runs the front-end side of the handshake.

    Owns what identifies and secures the engine: its routing id (`identity`, a random secret)
    and, over tcp, the CurveZMQ keys. ValueError at construction for tcp without keys (unless
    `insecure_tcp`) or an unreadable key directory."""

    def __init__(self, engine_args: EngineArgs, transport: str = "ipc",
                 host: str = "127.0.0.1", zmq_keys: str | None = None,
                 insecure_tcp: bool = False) -> None:
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', got {transport!r}")
        require_keys_for_tcp(transport, zmq_keys, insecure_tcp)
        self.engine_args = engine_args
        self.transport, self.host = transport, host
        self.zmq_keys = zmq_keys if transport == "tcp" else None  # ipc needs none
        self.keys = load_server_keys(zmq_keys) if self.zmq_keys is not None else None
        self.identity = b"E" + secrets.token_bytes(15)  # never starts with 0 (libzmq reserves it)
        self._ipc_dir = tempfile.mkdtemp(prefix="pp-engine-") if transport == "ipc" else None
        self.process: multiprocessing.process.BaseProcess | None = None
        self.bad_frames = WarningLimiter(logger)

    def address(self, name: str) -> str:
        if self.transport == "ipc":
            return f"ipc://{self._ipc_dir}/{name}"
        return f"tcp://{self.host}:*"

    def authenticator(self, ctx: zmq.Context) -> CurveAuthenticator | None:
        """The ZAP handler `ctx` needs before its server sockets bind (None without keys)."""
        return CurveAuthenticator(ctx, self.keys) if self.keys is not None else None

    def bind_router(self, socket: zmq.Socket, name: str, max_inbound_bytes: int = -1) -> str:
        """Set up and bind one of the front-end's ROUTERs; returns its concrete address. A peer
        that sends a message over `max_inbound_bytes` (-1: no limit) is disconnected."""
        prepare_router(socket, self.keys, max_inbound_bytes)
        return _bind(socket, self.address(name))

    def start(self, ctx: zmq.Context, input_socket: zmq.Socket, output_address: str,
              timeout_s: float) -> HandshakeReady:
        """Spawn the process and complete HELLO -> INIT -> READY (and the engine's hello on
        `input_socket`, a bound sync ROUTER of `ctx`) within timeout_s.

        Raises ValueError if the engine rejected its arguments, RuntimeError if it failed or
        died, TimeoutError if it did not get ready in time."""
        handshake = ctx.socket(zmq.ROUTER)
        try:
            handshake_address = self.bind_router(handshake, "handshake", 1 << 20)
            self.process = multiprocessing.get_context("spawn").Process(
                target=run_engine_core, args=(handshake_address, 0, self.zmq_keys),
                name="pp-engine-core", daemon=True)
            self.process.start()
            deadline = time.monotonic() + timeout_s
            identity, _ = self._recv(handshake, deadline, HandshakeHello, self._is_our_hello)
            init = HandshakeInit(input_socket.getsockopt_string(zmq.LAST_ENDPOINT),
                                 output_address, msgspec.msgpack.encode(self.engine_args),
                                 self.identity)
            handshake.send_multipart([identity, msgspec.msgpack.encode(init)])
            _, ready = self._recv(handshake, deadline, HandshakeReady,
                                  lambda sender, _: sender == identity)
            if ready.error is None:
                self._recv(input_socket, deadline, None,
                           lambda sender, hello: sender == self.identity and hello == KIND_HELLO)
        except BaseException:
            self.stop()
            raise
        finally:
            handshake.close(linger=0)
        if ready.error is not None:
            self.stop()
            error_type = ValueError if ready.error_type == "ValueError" else RuntimeError
            raise error_type(ready.error)
        return ready

    def _is_our_hello(self, _sender: bytes, hello: HandshakeHello) -> bool:
        return hello.pid == self.process.pid

    def _recv(self, socket: zmq.Socket, deadline: float, message_type: type | None, accept):
        """The first [sender, payload] on a ROUTER that decodes as message_type (raw bytes for
        None) and that accept(sender, message) admits; anything else is logged and dropped."""
        what = message_type.__name__ if message_type is not None else "the engine's hello"
        while True:
            if socket.poll(int(LIVENESS_POLL_S * 1000)):
                frames = socket.recv_multipart()
                try:
                    sender, payload = frames
                    message = (payload if message_type is None
                               else msgspec.msgpack.decode(payload, type=message_type))
                except (ValueError, msgspec.DecodeError) as exc:
                    self.bad_frames.warning("dropped a bad frame while waiting for %s "
                                            "(%d frames): %s", what, len(frames), exc)
                    continue
                if accept(sender, message):
                    return sender, message
                self.bad_frames.warning("dropped %s from an unknown peer", what)
                continue
            if not self.is_alive():
                raise RuntimeError(f"the engine-core process exited during startup "
                                   f"(exit code {self.process.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine core did not answer {what} in time")

    def is_alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def stop(self) -> None:
        """Wait for a requested exit, then terminate and kill if needed. Idempotent."""
        if self.process is not None:
            reap(self.process, SHUTDOWN_TIMEOUT_S)
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None


def reap(process: multiprocessing.process.BaseProcess, wait_s: float) -> None:
    """Give `process` up to `wait_s` to exit on its own, then terminate it, then kill it."""
    process.join(wait_s if process.is_alive() else 0)
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)


def _bind(socket: zmq.Socket, address: str) -> str:
    """Bind and return the concrete address (a tcp port chosen by the OS for ':*')."""
    socket.bind(address)
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


class _ClientBase:
    """Request bookkeeping and frame decoding shared by both clients."""

    def __init__(self, proc: EngineProcess) -> None:
        self.proc = proc
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self.unfinished: set[str] = set()
        self.error: str | None = None
        self.stats = SchedulerStats()
        self.num_routed = 0

    def is_alive(self) -> bool:
        return self.error is None and self.proc.is_alive()

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        """Queue the sequences of one user request (see `client/base.py`)."""
        for request in requests:
            self.add_request(request)

    def engine_states(self) -> list[EngineState]:
        """The one engine, as `client/base.py` describes it (stats: the last received)."""
        return [EngineState(0, self.is_alive(), self.stats, self.num_routed, self.pid)]

    def stop_engines(self) -> None:
        """Stop and reap the engine-core process (blocking)."""
        self.proc.stop()

    @property
    def pid(self) -> int | None:
        """The engine-core process id."""
        return self.proc.process.pid if self.proc.process is not None else None

    @property
    def engine_identity(self) -> bytes:
        """The engine's routing id on both sockets (a secret: whoever holds it can pose as it)."""
        return self.proc.identity

    def _frames_add(self, request: EngineCoreRequest) -> list[bytes]:
        self.unfinished.add(request.request_id)
        self.num_routed += 1
        return [self.proc.identity, KIND_ADD, self.encoder.encode(request)]

    def _frames_abort(self, request_ids: list[str]) -> list[bytes]:
        self.unfinished.difference_update(request_ids)
        return [self.proc.identity, KIND_ABORT,
                self.encoder.encode(AbortRequests(list(request_ids)))]

    def _frames_shutdown(self) -> list[bytes]:
        return [self.proc.identity, KIND_SHUTDOWN, b""]

    def _decode_output(self, frames: list[bytes]) -> EngineCoreOutputs | None:
        """One message from the output ROUTER: [sender, payload]. None (logged, capped) unless
        it comes from our engine and decodes; never raises."""
        if len(frames) != 2 or frames[0] != self.proc.identity:
            self.proc.bad_frames.warning("dropped an output of %d frame(s) (sizes %s) not from "
                                         "our engine", len(frames), [len(f) for f in frames][:8])
            return None
        try:
            return self.decoder.decode(frames[1])
        except msgspec.DecodeError as exc:
            self.proc.bad_frames.warning("dropped an undecodable output (%d bytes): %s",
                                         len(frames[1]), exc)
            return None

    def _received(self, batch: EngineCoreOutputs) -> EngineCoreOutputs:
        for output in batch.outputs:
            if output.finish_reason is not None:
                self.unfinished.discard(output.request_id)
        if batch.error is not None:
            self.error = batch.error
        if batch.stats is not None:
            self.stats = batch.stats
        return batch

    def _dead_message(self) -> str:
        code = self.proc.process.exitcode if self.proc.process is not None else None
        return self.error or f"the engine-core process died (exit code {code})"


class EngineCoreProcClient(_ClientBase):
    """Synchronous client with `EngineCore`'s surface, for `LLM(..., engine_process=True)`.

    `zmq_keys` (a `pp-engine keys` directory) secures tcp with CurveZMQ; tcp without it raises
    ValueError unless `insecure_tcp`."""

    def __init__(self, engine_args: EngineArgs, transport: str = "ipc",
                 host: str = "127.0.0.1", timeout_s: float = 600.0,
                 step_timeout_s: float = 600.0, zmq_keys: str | None = None,
                 insecure_tcp: bool = False) -> None:
        proc = EngineProcess(engine_args, transport, host, zmq_keys, insecure_tcp)
        super().__init__(proc)
        self.ctx = zmq.Context()  # our own: its ZAP handler admits only our engines
        self.auth = proc.authenticator(self.ctx)
        self.input_socket = self.ctx.socket(zmq.ROUTER)
        self.output_socket = self.ctx.socket(zmq.ROUTER)
        self.step_timeout_s = step_timeout_s
        try:
            self.input_address = proc.bind_router(self.input_socket, "input", INPUT_INBOUND_BYTES)
            self.output_address = proc.bind_router(self.output_socket, "output")
            ready = proc.start(self.ctx, self.input_socket, self.output_address, timeout_s)
        except BaseException:
            self._close()
            raise
        self.num_kv_blocks = ready.num_kv_blocks

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(self._frames_add(request))

    def abort_requests(self, request_ids: list[str]) -> None:
        frames = self._frames_abort(request_ids)
        if self.is_alive():
            with contextlib.suppress(RuntimeError, TimeoutError):
                self._send(frames)

    def _send(self, frames: list[bytes]) -> None:
        """Send to our engine; while it is unreachable (reconnecting) retry until step_timeout_s,
        checking that it lives."""
        deadline = time.monotonic() + self.step_timeout_s
        while True:
            self._check()
            try:
                self.input_socket.send_multipart(frames, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine core took no input for {self.step_timeout_s} s")
            time.sleep(UNREACHABLE_RETRY_S)

    def has_unfinished_requests(self) -> bool:
        return bool(self.unfinished)

    def step(self) -> list[EngineCoreOutput]:
        """The next batch of outputs (waits for it). RuntimeError if the engine is dead."""
        deadline = time.monotonic() + self.step_timeout_s
        while True:
            self._check()
            if self.output_socket.poll(int(LIVENESS_POLL_S * 1000)):
                batch = self._decode_output(self.output_socket.recv_multipart())
                if batch is not None:
                    self._received(batch)
                    self._check()
                    return batch.outputs
            if time.monotonic() > deadline:
                raise TimeoutError(f"no output from the engine core in {self.step_timeout_s} s")

    def _check(self) -> None:
        if not self.is_alive():
            self.unfinished.clear()
            raise RuntimeError(self._dead_message())

    def shutdown(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                self.input_socket.send_multipart(self._frames_shutdown(), flags=zmq.NOBLOCK)
        self.proc.stop()
        self._close()

    def _close(self) -> None:
        self.input_socket.close(linger=0)
        self.output_socket.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.term()


class AsyncEngineCoreClient(_ClientBase):
    """asyncio client for `AsyncLLM`. Inputs go out on a plain (sync, never blocking) ROUTER,
    outputs arrive on an asyncio one; both live in one libzmq context with the ZAP handler."""

    def __init__(self, proc: EngineProcess, ctx: zmq.asyncio.Context) -> None:
        super().__init__(proc)
        self.ctx = ctx
        self.sync_ctx = zmq.Context.shadow(ctx.underlying)
        self.auth = proc.authenticator(self.sync_ctx)
        self.input_socket = self.sync_ctx.socket(zmq.ROUTER)
        self.output_socket = ctx.socket(zmq.ROUTER)
        self.input_address = self.output_address = ""  # bound in start()
        self.num_kv_blocks = 0

    @classmethod
    async def start(cls, engine_args: EngineArgs, *, transport: str = "ipc",
                    host: str = "127.0.0.1", timeout_s: float = 600.0,
                    zmq_keys: str | None = None,
                    insecure_tcp: bool = False) -> AsyncEngineCoreClient:
        proc = EngineProcess(engine_args, transport, host, zmq_keys, insecure_tcp)
        client = cls(proc, zmq.asyncio.Context())
        try:
            client.input_address = proc.bind_router(client.input_socket, "input",
                                                    INPUT_INBOUND_BYTES)
            client.output_address = proc.bind_router(client.output_socket, "output")
            ready = await asyncio.to_thread(proc.start, client.sync_ctx, client.input_socket,
                                            client.output_address, timeout_s)
        except BaseException:
            client.shutdown()
            raise
        client.num_kv_blocks = ready.num_kv_blocks
        return client

    def add_request(self, request: EngineCoreRequest) -> None:
        if not self.is_alive():
            raise RuntimeError(self._dead_message())
        self._send(self._frames_add(request))

    def abort_requests(self, request_ids: list[str]) -> None:
        if self.is_alive():
            with contextlib.suppress(RuntimeError):
                self._send(self._frames_abort(request_ids))

    def _send(self, frames: list[bytes]) -> None:
        try:
            self.input_socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: its socket is gone; it is dying
            raise RuntimeError(f"the engine core is not reachable: {exc}") from None

    async def get_outputs(self) -> EngineCoreOutputs:
        """The next message from the engine core (bad frames are dropped). RuntimeError once
        the engine is dead."""
        while True:
            if self.error is not None or not self.proc.is_alive():
                raise RuntimeError(self._dead_message())
            if await self.output_socket.poll(int(LIVENESS_POLL_S * 1000)):
                batch = self._decode_output(await self.output_socket.recv_multipart())
                if batch is not None:
                    return self._received(batch)

    def shutdown(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                self.input_socket.send_multipart(self._frames_shutdown(), flags=zmq.NOBLOCK)
        self.proc.stop()
        self.input_socket.close(linger=0)
        self.output_socket.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.term()
