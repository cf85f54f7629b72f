"""The engine-core process: the two-stage loop between a ZMQ input and output socket.

Startup handshake (every wait bounded):

    front-end                         engine core
       | <------------ HELLO --------------- |   (connects to the handshake address)
       | -- INIT: addresses + engine args -> |
       |                       [load model, allocate KV cache]
       | <------------ READY ---------------- |   (config hash; or the error that stopped it)

Then requests arrive on the input socket as two frames, a kind (`add` / `abort` / `shutdown`)
and a msgspec payload; `EngineCoreOutputs` leave on the output socket. Only token ids cross.
"""

from __future__ import annotations

import logging
import os
import signal

import msgspec
import zmq

from engine_core.config import EngineArgs
from engine_core.engine import EngineCore
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

logger = logging.getLogger(__name__)

KIND_ADD, KIND_ABORT, KIND_SHUTDOWN = b"add", b"abort", b"shutdown"
HANDSHAKE_TIMEOUT_MS = 30_000
IDLE_POLL_MS = 500  # how often an idle engine checks that its parent is still alive


def run_engine_core(handshake_address: str, engine_index: int = 0) -> None:
    """Entry point of the engine-core process (also usable for a remote, headless engine)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front-end decides when we stop
    ctx = zmq.Context()
    handshake = ctx.socket(zmq.DEALER)
    handshake.setsockopt(zmq.LINGER, 1000)
    handshake.connect(handshake_address)
    handshake.send(msgspec.msgpack.encode(HandshakeHello(engine_index, os.getpid())))
    if not handshake.poll(HANDSHAKE_TIMEOUT_MS):
        logger.error("no INIT from the front-end within %d ms; exiting", HANDSHAKE_TIMEOUT_MS)
        return
    init = msgspec.msgpack.decode(handshake.recv(), type=HandshakeInit)
    try:
        engine_args = msgspec.msgpack.decode(init.engine_args, type=EngineArgs)
        engine = EngineCore(engine_args.resolve())
    except Exception as exc:
        handshake.send(msgspec.msgpack.encode(
            HandshakeReady(error=str(exc), error_type=type(exc).__name__)))
        handshake.close()
        ctx.term()
        return
    input_socket = ctx.socket(zmq.PULL)
    input_socket.connect(init.input_address)
    output_socket = ctx.socket(zmq.PUSH)
    output_socket.setsockopt(zmq.LINGER, 2000)
    output_socket.setsockopt(zmq.SNDTIMEO, IDLE_POLL_MS)  # never block forever on a gone peer
    output_socket.connect(init.output_address)
    handshake.send(msgspec.msgpack.encode(HandshakeReady(
        config_hash=engine.config.config_hash(), num_kv_blocks=engine.executor.num_kv_blocks)))
    handshake.close()
    try:
        EngineCoreLoop(engine, input_socket, output_socket).run()
    finally:
        engine.shutdown()
        input_socket.close(linger=0)
        output_socket.close()
        ctx.term()


class EngineCoreLoop:
    """Busy loop of the engine-core process: take inputs, step, publish outputs."""

    def __init__(self, engine: EngineCore, input_socket: zmq.Socket,
                 output_socket: zmq.Socket) -> None:
        self.engine = engine
        self.input_socket = input_socket
        self.output_socket = output_socket
        self.request_decoder = msgspec.msgpack.Decoder(EngineCoreRequest)
        self.abort_decoder = msgspec.msgpack.Decoder(AbortRequests)
        self.encoder = msgspec.msgpack.Encoder()
        self.stopping = False
        self.parent_pid = os.getppid()
        self._last_stats: SchedulerStats | None = None

    def run(self) -> None:
        parent = self.parent_pid
        while not self.stopping:
            busy = self.engine.has_unfinished_requests()
            inputs_changed = self._take_inputs(0 if busy else IDLE_POLL_MS)
            if self.stopping:
                break
            outputs: list[EngineCoreOutput] = []
            if self.engine.has_unfinished_requests():
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # a stage died or failed: report it and exit
                    logger.exception("engine step failed")
                    self._send(EngineCoreOutputs(stats=self._stats(), error=str(exc)))
                    return
            if outputs or inputs_changed:
                self._publish(outputs)
            if os.getppid() != parent:
                logger.error("the front-end process is gone; exiting")
                return

    def _take_inputs(self, timeout_ms: int) -> bool:
        """Apply every queued input; wait up to timeout_ms for the first. True if any arrived."""
        if not self.input_socket.poll(timeout_ms):
            return False
        while True:
            try:
                kind, payload = self.input_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            if kind == KIND_ADD:
                self._add(self.request_decoder.decode(payload))
            elif kind == KIND_ABORT:
                self.engine.abort_requests(self.abort_decoder.decode(payload).request_ids)
            elif kind == KIND_SHUTDOWN:
                self.stopping = True
                return True

    def _add(self, request: EngineCoreRequest) -> None:
        try:
            self.engine.add_request(request)
        except ValueError as exc:  # the front-end validates first; this is a last line
            logger.warning("rejected request %s: %s", request.request_id, exc)
            self._send(EngineCoreOutputs(outputs=[EngineCoreOutput(
                request.request_id, [], finish_reason="abort")]))

    def _publish(self, outputs: list[EngineCoreOutput]) -> None:
        stats = self._stats()
        if outputs or stats != self._last_stats:
            self._send(EngineCoreOutputs(outputs=outputs, stats=stats))
            self._last_stats = stats

    def _stats(self) -> SchedulerStats:
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        return SchedulerStats(
            num_running=scheduler.num_running, num_waiting=scheduler.num_waiting,
            kv_usage=blocks.usage, num_free_blocks=blocks.num_free_blocks,
            num_total_blocks=blocks.num_usable_blocks,
            num_preemptions=scheduler.num_preemptions)

    def _send(self, message: EngineCoreOutputs) -> None:
        data = self.encoder.encode(message)
        while True:
            try:
                self.output_socket.send(data)
                return
            except zmq.Again:  # the front-end is not reading: wait while it still exists
                if os.getppid() != self.parent_pid:
                    raise RuntimeError("the front-end process is gone") from None
