"""Clients of an engine-core process: spawn it, shake hands, send requests, receive outputs.

`EngineCoreProcClient` is synchronous and has the same surface as an in-process `EngineCore`
(add_request, abort_requests, step, has_unfinished_requests, shutdown), so `LLM` can run the
engine in a separate process unchanged. `AsyncEngineCoreClient` is its asyncio twin for
`AsyncLLM`. Sockets: ipc:// in a private temp dir by default, tcp:// when asked. Everything on
them is msgspec; every wait has a timeout, and a dead engine process is noticed within about a
second.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import shutil
import tempfile
import time

import msgspec
import zmq
import zmq.asyncio

from engine_core.config import EngineArgs
from engine_core.core_process import KIND_ABORT, KIND_ADD, KIND_SHUTDOWN, run_engine_core
from engine_core.messages import (
    AbortRequests,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    HandshakeHello,
    HandshakeInit,
    HandshakeReady,
)

LIVENESS_POLL_S = 1.0
SHUTDOWN_TIMEOUT_S = 10.0


class EngineProcess:
    """Spawns the engine-core process and runs the front-end side of the handshake."""

    def __init__(self, engine_args: EngineArgs, transport: str = "ipc",
                 host: str = "127.0.0.1") -> None:
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', got {transport!r}")
        self.engine_args = engine_args
        self.transport, self.host = transport, host
        self._ipc_dir = tempfile.mkdtemp(prefix="pp-engine-") if transport == "ipc" else None
        self.process: multiprocessing.process.BaseProcess | None = None

    def address(self, name: str) -> str:
        if self.transport == "ipc":
            return f"ipc://{self._ipc_dir}/{name}"
        return f"tcp://{self.host}:*"

    def start(self, input_address: str, output_address: str, timeout_s: float) -> HandshakeReady:
        """Spawn the process and complete HELLO -> INIT -> READY within timeout_s.

        Raises ValueError if the engine rejected its arguments, RuntimeError if it failed or
        died, TimeoutError if it did not get ready in time."""
        ctx = zmq.Context.instance()
        handshake = ctx.socket(zmq.ROUTER)
        handshake.setsockopt(zmq.LINGER, 0)
        try:
            handshake_address = _bind(handshake, self.address("handshake"))
            self.process = multiprocessing.get_context("spawn").Process(
                target=run_engine_core, args=(handshake_address, 0), name="pp-engine-core",
                daemon=True)
            self.process.start()
            deadline = time.monotonic() + timeout_s
            identity, _hello = self._recv(handshake, deadline, HandshakeHello)
            init = HandshakeInit(input_address, output_address,
                                 msgspec.msgpack.encode(self.engine_args))
            handshake.send_multipart([identity, msgspec.msgpack.encode(init)])
            _, ready = self._recv(handshake, deadline, HandshakeReady)
        except BaseException:
            self.stop()
            raise
        finally:
            handshake.close()
        if ready.error is not None:
            self.stop()
            error_type = ValueError if ready.error_type == "ValueError" else RuntimeError
            raise error_type(ready.error)
        return ready

    def _recv(self, socket: zmq.Socket, deadline: float, message_type: type):
        while True:
            if socket.poll(int(LIVENESS_POLL_S * 1000)):
                identity, payload = socket.recv_multipart()
                return identity, msgspec.msgpack.decode(payload, type=message_type)
            if not self.is_alive():
                raise RuntimeError(f"the engine-core process exited during startup "
                                   f"(exit code {self.process.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine core did not answer {message_type.__name__} "
                                   f"in time")

    def is_alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def stop(self) -> None:
        """Wait for a requested exit, then terminate and kill if needed. Idempotent."""
        if self.process is not None:
            self.process.join(SHUTDOWN_TIMEOUT_S if self.process.is_alive() else 0)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None


def _bind(socket: zmq.Socket, address: str) -> str:
    """Bind and return the concrete address (a tcp port chosen by the OS for ':*')."""
    socket.bind(address)
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


class _ClientBase:
    """Request bookkeeping shared by both clients."""

    def __init__(self, proc: EngineProcess) -> None:
        self.proc = proc
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self.unfinished: set[str] = set()
        self.error: str | None = None

    def is_alive(self) -> bool:
        return self.error is None and self.proc.is_alive()

    @property
    def pid(self) -> int | None:
        """The engine-core process id."""
        return self.proc.process.pid if self.proc.process is not None else None

    def _frames_add(self, request: EngineCoreRequest) -> list[bytes]:
        self.unfinished.add(request.request_id)
        return [KIND_ADD, self.encoder.encode(request)]

    def _frames_abort(self, request_ids: list[str]) -> list[bytes]:
        self.unfinished.difference_update(request_ids)
        return [KIND_ABORT, self.encoder.encode(AbortRequests(list(request_ids)))]

    def _received(self, batch: EngineCoreOutputs) -> EngineCoreOutputs:
        for output in batch.outputs:
            if output.finish_reason is not None:
                self.unfinished.discard(output.request_id)
        if batch.error is not None:
            self.error = batch.error
        return batch

    def _dead_message(self) -> str:
        code = self.proc.process.exitcode if self.proc.process is not None else None
        return self.error or f"the engine-core process died (exit code {code})"


class EngineCoreProcClient(_ClientBase):
    """Synchronous client with `EngineCore`'s surface, for `LLM(..., engine_process=True)`."""

    def __init__(self, engine_args: EngineArgs, transport: str = "ipc",
                 host: str = "127.0.0.1", timeout_s: float = 600.0,
                 step_timeout_s: float = 600.0) -> None:
        proc = EngineProcess(engine_args, transport, host)
        super().__init__(proc)
        ctx = zmq.Context.instance()
        self.input_socket = ctx.socket(zmq.PUSH)
        self.output_socket = ctx.socket(zmq.PULL)
        self.step_timeout_s = step_timeout_s
        try:
            ready = proc.start(_bind(self.input_socket, proc.address("input")),
                               _bind(self.output_socket, proc.address("output")), timeout_s)
        except BaseException:
            self._close_sockets()
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
        """Send without ever blocking on a dead peer (a PUSH socket with no peer would)."""
        deadline = time.monotonic() + self.step_timeout_s
        while not self.input_socket.poll(int(LIVENESS_POLL_S * 1000), zmq.POLLOUT):
            self._check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine core took no input for {self.step_timeout_s} s")
        self._check()
        self.input_socket.send_multipart(frames, flags=zmq.NOBLOCK)

    def has_unfinished_requests(self) -> bool:
        return bool(self.unfinished)

    def step(self) -> list[EngineCoreOutput]:
        """The next batch of outputs (waits for it). RuntimeError if the engine is dead."""
        deadline = time.monotonic() + self.step_timeout_s
        while True:
            self._check()
            if self.output_socket.poll(int(LIVENESS_POLL_S * 1000)):
                batch = self._received(self.decoder.decode(self.output_socket.recv()))
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
            self.input_socket.send_multipart([KIND_SHUTDOWN, b""])
        self.proc.stop()
        self._close_sockets()

    def _close_sockets(self) -> None:
        self.input_socket.close(linger=0)
        self.output_socket.close(linger=0)


class AsyncEngineCoreClient(_ClientBase):
    """asyncio client for `AsyncLLM`."""

    def __init__(self, proc: EngineProcess, ctx: zmq.asyncio.Context,
                 input_socket: zmq.asyncio.Socket, output_socket: zmq.asyncio.Socket) -> None:
        super().__init__(proc)
        self.ctx = ctx
        self.input_socket = input_socket
        self.output_socket = output_socket
        self.num_kv_blocks = 0

    @classmethod
    async def start(cls, engine_args: EngineArgs, *, transport: str = "ipc",
                    host: str = "127.0.0.1", timeout_s: float = 600.0) -> AsyncEngineCoreClient:
        proc = EngineProcess(engine_args, transport, host)
        ctx = zmq.asyncio.Context()
        input_socket, output_socket = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        client = cls(proc, ctx, input_socket, output_socket)
        try:
            input_address = _bind(input_socket, proc.address("input"))
            output_address = _bind(output_socket, proc.address("output"))
            ready = await asyncio.to_thread(proc.start, input_address, output_address, timeout_s)
        except BaseException:
            client.shutdown()
            raise
        client.num_kv_blocks = ready.num_kv_blocks
        return client

    def add_request(self, request: EngineCoreRequest) -> None:
        if not self.is_alive():
            raise RuntimeError(self._dead_message())
        self.input_socket.send_multipart(self._frames_add(request))

    def abort_requests(self, request_ids: list[str]) -> None:
        if self.is_alive():
            self.input_socket.send_multipart(self._frames_abort(request_ids))

    async def get_outputs(self) -> EngineCoreOutputs:
        """The next message from the engine core. RuntimeError once the engine is dead."""
        while True:
            if self.error is not None or not self.proc.is_alive():
                raise RuntimeError(self._dead_message())
            if await self.output_socket.poll(int(LIVENESS_POLL_S * 1000)):
                return self._received(self.decoder.decode(await self.output_socket.recv()))

    def shutdown(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                self.input_socket.send_multipart([KIND_SHUTDOWN, b""], flags=zmq.NOBLOCK)
        self.proc.stop()
        self.input_socket.close(linger=0)
        self.output_socket.close(linger=0)
        self.ctx.term()

