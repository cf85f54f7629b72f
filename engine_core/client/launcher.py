"""Starting engine cores for one front-end: sockets, spawn, handshake, reaping.

Every client of engine-core processes starts them here, one engine or N. `EngineLauncher`
owns what identifies and secures the engines and how they come up:

- the addresses: ipc:// in a private (0700) temp dir when every engine is local, tcp:// on
  `DataParallelConfig.address` otherwise (or when asked), CurveZMQ over tcp with a key
  directory (`pp-engine keys`; tcp without keys only with `insecure_tcp`), the ZAP handler
  (`CurveAuthenticator`) of the front-end's context;
- one random, secret routing id per engine (`EngineLink.identity`; whoever holds it can pose as
  that engine on the input and output sockets, so it only ever travels in INIT);
- the local engines' processes: multiprocessing spawn, or Ray actors with
  `DataParallelConfig.backend == "ray"` (`ray_launcher.py`); remote ones are started on their
  hosts with `pp-engine serve --headless` (`headless.py`);
- the front-end side of the HELLO -> INIT -> READY handshake (the engine side and a diagram are
  in `core_process.py`), with a config check (an engine whose config differs is refused,
  naming the field) and, while remote ranks exist, rejoins of restarted remote engines;
- reaping: a stopped engine gets `SHUTDOWN_TIMEOUT_S` to exit, then is terminated, then killed;
  the ipc dir is removed.

Every wait is bounded and every frame is decoded inside a try: a bad one is logged (capped by
the shared `WarningLimiter`) and dropped.
"""

from __future__ import annotations

import logging
import multiprocessing
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import msgspec
import zmq

from engine_core.client.core_process import KIND_HELLO, engine_version, run_engine_core
from engine_core.config import DataParallelConfig, EngineArgs, config_mismatch
from engine_core.messages import HandshakeHello, HandshakeInit, HandshakeReady, SchedulerStats
from engine_core.transport import (
    CurveAuthenticator,
    CurveKeys,
    WarningLimiter,
    load_server_keys,
    prepare_router,
    require_keys_for_tcp,
)

if TYPE_CHECKING:
    from engine_core.client.ray_launcher import RayEngineLauncher

__all__ = ["EngineLauncher", "EngineLink", "EngineProcessHandle", "new_identity", "reap"]

logger = logging.getLogger(__name__)

LIVENESS_POLL_S = 1.0  # how often a waiting front-end checks that its engines live
SHUTDOWN_TIMEOUT_S = 10.0  # an engine told to stop gets this long before it is terminated
INPUT_INBOUND_BYTES = 4096  # only an engine's hello arrives on the input socket
HANDSHAKE_INBOUND_BYTES = 1 << 20
EXITED_ENGINE_GRACE_MS = 500  # what an engine sent just before it exited arrives within this


class EngineProcessHandle(Protocol):
    """What the front-end needs of a local engine: a spawned process or a Ray actor."""

    @property
    def pid(self) -> int | None: ...

    @property
    def exitcode(self) -> int | None: ...

    def is_alive(self) -> bool: ...

    def join(self, timeout: float | None = None) -> None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


def new_identity() -> bytes:
    """A fresh secret routing id (never starting with a 0 byte, which libzmq reserves)."""
    return b"E" + secrets.token_bytes(15)


@dataclass
class EngineLink:
    """One engine core (one data-parallel rank) as the launcher sees it."""

    rank: int
    identity: bytes  # its routing id on the input and output sockets (a secret)
    process: EngineProcessHandle | None = None  # None: a remote engine
    pid: int | None = None
    host: str = ""
    alive: bool = False  # ready, and not declared dead since
    accepted: bool = False  # its READY came, with our config
    greeted: bool = False  # its hello came on the input socket (so it can be routed to)
    ever_ready: bool = False  # it got ready once (then it is given time to exit when stopped)
    stats: SchedulerStats = field(default_factory=SchedulerStats)  # the last it reported


def reap(process: EngineProcessHandle, wait_s: float) -> None:
    """Give `process` up to `wait_s` to exit on its own, then terminate it, then kill it."""
    process.join(wait_s if process.is_alive() else 0)
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)


class EngineLauncher:
    """Brings up the engines of one front-end and takes them down again.

    Use: `bind(ctx, input_socket, output_socket)` (the front-end's two ROUTERs, created by the
    client in `ctx`), then `launch(timeout_s)`, then `serve_rejoins()` from the client's output
    loop, and `reap(told)` / `close()` at the end. The engine records are the client's
    (`EngineLink`s or subclasses of it); the launcher fills in their process, pid, host and
    handshake state and renews a remote engine's routing id when it rejoins.

    ValueError at construction for a bad transport, a non-zero start rank (that is for
    headless launchers), tcp without keys (unless `insecure_tcp`) or an unreadable key
    directory."""

    def __init__(self, engine_args: EngineArgs, dp: DataParallelConfig,
                 engines: Sequence[EngineLink], bad_frames: WarningLimiter, *,
                 transport: str = "ipc", zmq_keys: str | None = None,
                 insecure_tcp: bool = False) -> None:
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', got {transport!r}")
        if dp.start_rank != 0:
            raise ValueError("the front-end's local engines are ranks 0..L-1: "
                             "--data-parallel-start-rank (-dpr) is for --headless only")
        transport = ("tcp" if dp.has_remote or dp.rpc_port is not None or dp.backend == "ray"
                     else transport)
        require_keys_for_tcp(transport, zmq_keys, insecure_tcp)
        self.engine_args, self.dp, self.transport = engine_args, dp, transport
        self.zmq_keys = zmq_keys if transport == "tcp" else None  # ipc needs none
        self.keys: CurveKeys | None = (load_server_keys(self.zmq_keys)
                                       if self.zmq_keys is not None else None)
        self.config = engine_args.resolve()
        self.expected_fields = self.config.config_fields()
        self.engines = engines
        self.bad_frames = bad_frames
        self._by_identity = {e.identity: e for e in engines}
        self.ipc_dir: str | None = None  # made by bind() (ipc only)
        self.auth: CurveAuthenticator | None = None
        self.handshake_socket: zmq.Socket | None = None
        self._input_socket: zmq.Socket | None = None
        self.handshake_address = self.input_address = self.output_address = ""
        self.ray: RayEngineLauncher | None = None
        self._peers: dict[bytes, EngineLink] = {}  # handshake routing id -> rank it said HELLO for
        self._refusals: dict[int, str] = {}  # rank -> why its last engine was refused

    # ---- addresses ----------------------------------------------------------------------------
    def bind(self, ctx: zmq.Context, input_socket: zmq.Socket,
             output_socket: zmq.Socket) -> None:
        """Start the ZAP handler in `ctx` (the sync context, or the shadow of an asyncio one,
        that holds the sockets), then bind the handshake, input and output ROUTERs.
        ValueError (naming the address) if one cannot bind."""
        if self.transport == "ipc":
            self.ipc_dir = tempfile.mkdtemp(prefix="pp-engine-")
        self.auth = CurveAuthenticator(ctx, self.keys) if self.keys is not None else None
        self.handshake_socket = ctx.socket(zmq.ROUTER)
        self._input_socket = input_socket
        for sock, name, inbound, port in (
                (self.handshake_socket, "handshake", HANDSHAKE_INBOUND_BYTES, self.dp.rpc_port),
                (input_socket, "input", INPUT_INBOUND_BYTES, None),
                (output_socket, "output", -1, None)):
            prepare_router(sock, self.keys, inbound)
            sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)  # a vanished host drops its connection
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
            address = self._address(name, port)
            try:
                sock.bind(address)
            except zmq.ZMQError as exc:
                raise ValueError(f"cannot bind the engine {name} socket to {address}: "
                                 f"{exc}") from None
            setattr(self, f"{name}_address", sock.getsockopt_string(zmq.LAST_ENDPOINT))

    def _address(self, name: str, port: int | None = None) -> str:
        if self.transport == "ipc":
            return f"ipc://{self.ipc_dir}/{name}"
        return f"tcp://{self.dp.address}:{port if port is not None else '*'}"

    def find(self, identity: bytes) -> EngineLink | None:
        """The engine with this routing id (None: no engine of ours)."""
        return self._by_identity.get(identity)

    def _name(self, engine: EngineLink) -> str:
        """How messages name an engine: "the engine core", or "data-parallel engine R"."""
        return "the engine core" if len(self.engines) == 1 else \
            f"data-parallel engine {engine.rank}"

    # ---- startup ------------------------------------------------------------------------------
    def launch(self, timeout_s: float) -> None:
        """Start the local engines, then HELLO -> INIT -> READY (+ the hello on the input
        socket) with every engine, local and remote, within timeout_s (blocking).

        Raises ValueError if a local engine rejected its arguments, RuntimeError if one failed
        or exited, TimeoutError (naming the ranks and the address) if they were not all ready
        in time. The caller stops whatever was started (`reap`, `close`)."""
        assert self.handshake_socket is not None and self._input_socket is not None, "bind first"
        for engine in self.engines[:self.dp.local]:
            engine.process = self._start_local(engine.rank)
            engine.pid = engine.process.pid
        deadline = time.monotonic() + timeout_s
        poller = zmq.Poller()
        poller.register(self.handshake_socket, zmq.POLLIN)
        poller.register(self._input_socket, zmq.POLLIN)
        while not all(e.alive for e in self.engines):
            events = dict(poller.poll(int(LIVENESS_POLL_S * 1000)))
            if self.handshake_socket in events:
                self._on_handshake(self.handshake_socket.recv_multipart())
            if self._input_socket in events:
                self._on_input(self._input_socket.recv_multipart())
            for engine in self.engines[:self.dp.local]:
                assert engine.process is not None
                if not engine.alive and not engine.process.is_alive():
                    # the READY that says why may still be on its way: read what came
                    while self.handshake_socket.poll(EXITED_ENGINE_GRACE_MS):
                        self._on_handshake(self.handshake_socket.recv_multipart())
                    raise RuntimeError(f"{self._name(engine)} (pid {engine.pid}) exited during "
                                       f"startup (exit code {engine.process.exitcode})")
            if time.monotonic() > deadline:
                missing = [e.rank for e in self.engines if not e.alive]
                why = "".join(f"; rank {r} was refused: {m}" for r, m in self._refusals.items())
                raise TimeoutError(f"engine core(s) {missing} did not get ready within "
                                   f"{timeout_s:g} s at {self.handshake_address}{why}")
        if not self.dp.has_remote:  # else it stays open: a restarted remote engine rejoins
            self.handshake_socket.close(linger=0)
            self.handshake_socket = None

    def _start_local(self, rank: int) -> EngineProcessHandle:
        """Spawn local rank `rank` (a process, or a Ray actor); it connects to the handshake."""
        if self.dp.backend == "ray":
            if self.ray is None:
                from engine_core.client.ray_launcher import RayEngineLauncher

                self.ray = RayEngineLauncher(self.dp.local)
            return self.ray.start(self.handshake_address, rank, self.zmq_keys)
        process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, name=f"pp-engine-core-dp{rank}",
            args=(self.handshake_address, rank, self.zmq_keys), daemon=True)
        process.start()
        return process

    def serve_rejoins(self) -> list[EngineLink]:
        """After startup: the handshakes of remote engines restarted with the rank of a dead
        one (non-blocking). Returns the engines that became ready again."""
        if self.handshake_socket is None or self._input_socket is None:
            return []
        was_alive = {e.rank for e in self.engines if e.alive}
        while self.handshake_socket.poll(0):
            try:
                self._on_handshake(self.handshake_socket.recv_multipart())
            except (ValueError, RuntimeError) as exc:  # never for remote engines; be safe
                logger.error("handshake failed: %s", exc)
        while self._input_socket.poll(0):
            self._on_input(self._input_socket.recv_multipart())
        return [e for e in self.engines if e.alive and e.rank not in was_alive]

    def _on_input(self, frames: list[bytes]) -> None:
        """A frame on the input socket: only an engine's hello (before READY completes) is
        expected there."""
        engine = self._by_identity.get(frames[0]) if len(frames) == 2 else None
        if engine is not None and frames[1] == KIND_HELLO:
            engine.greeted = True
            self._ready_if_complete(engine)
        else:
            self.bad_frames.warning("dropped a frame of %d part(s) on the input socket",
                                    len(frames))

    def _on_handshake(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.bad_frames.warning("dropped a handshake message of %d frame(s)", len(frames))
            return
        sender, payload = frames
        engine = self._peers.get(sender)
        if engine is None:
            try:
                hello = msgspec.msgpack.decode(payload, type=HandshakeHello)
            except msgspec.DecodeError as exc:
                self.bad_frames.warning("dropped an undecodable HELLO: %s", exc)
                return
            self._on_hello(sender, hello)
            return
        try:
            ready = msgspec.msgpack.decode(payload, type=HandshakeReady)
        except msgspec.DecodeError as exc:
            self.bad_frames.warning("dropped an undecodable READY: %s", exc)
            return
        del self._peers[sender]
        error = ready.error
        if error is None:
            error = config_mismatch(self.expected_fields, ready.config_fields)
        if error is None:
            engine.accepted = True  # alive once its hello on the input socket arrived too
            engine.stats = ready.stats if ready.stats is not None else SchedulerStats()
            self._ready_if_complete(engine)
            return
        if engine.process is not None:  # a local engine: its failure is the front-end's
            kind = ValueError if ready.error_type in ("ValueError", "ConfigMismatchError") \
                else RuntimeError
            raise kind(error)
        logger.error("refused data-parallel engine %d from %s: %s", engine.rank, engine.host,
                     error)
        self._refusals[engine.rank] = error

    def _ready_if_complete(self, engine: EngineLink) -> None:
        if engine.accepted and engine.greeted and not engine.alive:
            engine.alive = True
            logger.info("%s %s (host %s, pid %s)", self._name(engine),
                        "rejoined" if engine.ever_ready else "ready", engine.host or "local",
                        engine.pid)
            engine.ever_ready = True

    def _on_hello(self, sender: bytes, hello: HandshakeHello) -> None:
        assert self.handshake_socket is not None
        rank = hello.engine_index
        engine = self.engines[rank] if 0 <= rank < len(self.engines) else None
        if engine is None or engine.alive or (engine.process is not None
                                              and hello.pid != engine.pid):
            self.bad_frames.warning("dropped a HELLO for rank %d (pid %d): not expected", rank,
                                    hello.pid)
            return
        if engine.process is None:  # remote: (re)joining; a fresh routing id each time
            engine.pid, engine.host = hello.pid, hello.host
            engine.accepted = engine.greeted = False
            del self._by_identity[engine.identity]
            engine.identity = new_identity()
            self._by_identity[engine.identity] = engine
        if hello.version != engine_version():
            logger.warning("engine core %d runs pp-engine %s, the front-end %s",
                           rank, hello.version, engine_version())
        self._peers[sender] = engine
        init = HandshakeInit(self.input_address, self.output_address,
                             msgspec.msgpack.encode(self.engine_args), engine.identity,
                             dp_size=len(self.engines), config_fields=self.expected_fields)
        self.handshake_socket.send_multipart([sender, msgspec.msgpack.encode(init)])

    # ---- shutdown -----------------------------------------------------------------------------
    def reap(self, told: set[int]) -> None:
        """Reap the local engines (blocking): the ranks in `told` (asked to stop) and those
        that were ready once (exiting on their own after a failure, say) get up to
        `SHUTDOWN_TIMEOUT_S` in all, the others none; then terminate, then kill."""
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        for engine in self.engines:
            process = engine.process
            if process is None or process.pid is None:
                continue
            grace = engine.rank in told or engine.ever_ready
            reap(process, max(0.0, deadline - time.monotonic()) if grace else 0)

    def close(self) -> None:
        """Remove the Ray actors, close the handshake socket, stop the ZAP handler (before the
        context is terminated) and remove the ipc dir. Idempotent."""
        if self.ray is not None:
            self.ray.close()
            self.ray = None
        if self.handshake_socket is not None:
            self.handshake_socket.close(linger=0)
            self.handshake_socket = None
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        if self.ipc_dir is not None:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
