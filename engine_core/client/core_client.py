"""Data parallelism: N engine cores behind one front-end (DESIGN section 6).

Every engine is a full engine-core process (`core_process.run_engine_core`: its own scheduler,
KV blocks and pipeline stages). The front-end binds three ROUTERs: handshake, input, output.
Local engines are spawned here; remote ones are started on other hosts with
`pp-engine serve --headless` and connect to the handshake socket at the head's
`--data-parallel-address:--data-parallel-rpc-port`. Each engine says HELLO (rank, host, pid,
version) and gets INIT: the input/output addresses, its own secret routing id, the global DP
size and the front-end's config fields; it answers READY with its config hash (an engine whose
config differs is refused, naming the field, on both sides). Sockets are ipc when every engine
is local, tcp on the given address as soon as one is remote (CurveZMQ with `--zmq-keys`; tcp
without keys only with `--insecure-tcp`).

Routing: every user request (all its n sequences) goes to the live engine with the lowest
`waiting * 4 + running + sends since its last report` (with `routing="prefix"`, to the engine
that was sent the most of its prompt's leading blocks, unless that one is much busier: see
`prefix_router.py`); engines report their stats with every
output batch and at least once a second when idle. The front-end remembers which engine owns
each request, so aborts reach it, and attributes outputs to their engine by the sender's
routing id. An engine that dies (its process exits, or a remote one is silent for
`REMOTE_SILENCE_S`, or its connection dropped) fails only its own requests (finish_reason
"error"); routing skips it. A remote engine restarted with the rank of a dead one rejoins (the
handshake socket stays open while there are remote ranks). When none is left the client is
dead (`get_outputs` raises RuntimeError).
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
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from engine_core.client.base import EngineState
from engine_core.client.core_client import (
    INPUT_INBOUND_BYTES,
    LIVENESS_POLL_S,
    SHUTDOWN_TIMEOUT_S,
    reap,
)
from engine_core.client.core_process import (
    KIND_ABORT,
    KIND_ADD,
    KIND_HELLO,
    KIND_PING,
    KIND_SHUTDOWN,
    engine_version,
    run_engine_core,
)
from engine_core.client.prefix_router import PrefixIndex
from engine_core.config import DataParallelConfig, EngineArgs, config_mismatch
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

__all__ = ["DPEngineCoreClient"]

logger = logging.getLogger(__name__)

REMOTE_SILENCE_S = 10.0  # a remote engine that sent nothing (not even a heartbeat) is dead
WAITING_WEIGHT = 4  # a waiting request weighs this many running ones in the load score
PREFIX_LOAD_SLACK = 8  # prefix routing yields to load when the holder is this much busier


@dataclass
class _Engine:
    """One data-parallel rank as the front-end tracks it."""

    rank: int
    identity: bytes  # its routing id on the input and output sockets (a secret)
    process: multiprocessing.process.BaseProcess | None = None  # None: remote
    pid: int | None = None
    host: str = ""
    alive: bool = False
    accepted: bool = False  # its READY came, with our config
    greeted: bool = False  # its hello came on the input socket (so it can be routed to)
    stats: SchedulerStats = field(default_factory=SchedulerStats)
    sends_since_report: int = 0
    num_routed: int = 0
    last_seen: float = 0.0
    requests: set[str] = field(default_factory=set)

    def score(self) -> int:
        return (self.stats.num_waiting * WAITING_WEIGHT + self.stats.num_running
                + self.sends_since_report)


class DPEngineCoreClient:
    """asyncio client of N engine cores (implements `base.AsyncEngineClient`).

    Create with `await DPEngineCoreClient.start(...)`. ValueError at start for bad flags, a
    socket that cannot bind (port in use) or tcp without keys; TimeoutError (naming the ranks
    and the address) if the engines are not all READY in time."""

    def __init__(self, engine_args: EngineArgs, dp: DataParallelConfig, transport: str = "ipc",
                 zmq_keys: str | None = None, insecure_tcp: bool = False) -> None:
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', got {transport!r}")
        if dp.start_rank != 0:
            raise ValueError("the front-end's local engines are ranks 0..L-1: "
                             "--data-parallel-start-rank (-dpr) is for --headless only")
        transport = ("tcp" if dp.has_remote or dp.rpc_port is not None or dp.backend == "ray"
                     else transport)
        require_keys_for_tcp(transport, zmq_keys, insecure_tcp)
        self.engine_args, self.dp, self.transport = engine_args, dp, transport
        self.zmq_keys = zmq_keys if transport == "tcp" else None
        self.keys = load_server_keys(zmq_keys) if self.zmq_keys is not None else None
        config = engine_args.resolve()
        self.expected_fields = config.config_fields()
        self.engines = [_Engine(rank, b"E" + secrets.token_bytes(15)) for rank in range(dp.size)]
        self._by_identity = {e.identity: e for e in self.engines}
        self._owner: dict[str, _Engine] = {}
        self.prefix_index = (PrefixIndex(dp.size, config.cache.block_size)
                             if dp.routing == "prefix" and config.cache.enable_prefix_caching
                             else None)
        self._failed: list[EngineCoreOutput] = []
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self.bad_frames = WarningLimiter(logger)
        self._ipc_dir = tempfile.mkdtemp(prefix="pp-engine-dp-") if transport == "ipc" else None
        self.ctx = zmq.asyncio.Context()
        self.sync_ctx = zmq.Context.shadow(self.ctx.underlying)
        self.auth = CurveAuthenticator(self.sync_ctx, self.keys) if self.keys else None
        self.handshake_socket: zmq.Socket | None = self.sync_ctx.socket(zmq.ROUTER)
        self.input_socket = self.sync_ctx.socket(zmq.ROUTER)
        self.output_socket = self.ctx.socket(zmq.ROUTER)
        self.handshake_address = self.input_address = self.output_address = ""
        self._closed = False
        self.launcher = None  # a RayEngineLauncher with --data-parallel-backend ray
        self._peers: dict[bytes, _Engine] = {}  # handshake routing id -> rank it said HELLO for
        self._refusals: dict[int, str] = {}  # rank -> why its last engine was refused

    @classmethod
    async def start(cls, engine_args: EngineArgs, dp: DataParallelConfig, *,
                    transport: str = "ipc", zmq_keys: str | None = None,
                    insecure_tcp: bool = False, timeout_s: float = 600.0
                    ) -> DPEngineCoreClient:
        client = cls(engine_args, dp, transport, zmq_keys, insecure_tcp)
        try:
            client._bind()
            await asyncio.to_thread(client._start_engines, timeout_s)
        except BaseException:
            client.shutdown()
            raise
        return client

    # ---- startup ------------------------------------------------------------------------------
    def _address(self, name: str, port: int | None = None) -> str:
        if self.transport == "ipc":
            return f"ipc://{self._ipc_dir}/{name}"
        return f"tcp://{self.dp.address}:{port if port is not None else '*'}"

    def _bind(self) -> None:
        for sock, name, inbound, port in (
                (self.handshake_socket, "handshake", 1 << 20, self.dp.rpc_port),
                (self.input_socket, "input", INPUT_INBOUND_BYTES, None),
                (self.output_socket, "output", -1, None)):
            prepare_router(sock, self.keys, inbound)
            sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)  # a vanished host drops its connection
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
            address = self._address(name, port)
            try:
                sock.bind(address)
            except zmq.ZMQError as exc:
                raise ValueError(f"cannot bind the data-parallel {name} socket to {address}: "
                                 f"{exc}") from None
            setattr(self, f"{name}_address", sock.getsockopt_string(zmq.LAST_ENDPOINT))

    def _start_engines(self, timeout_s: float) -> None:
        """Spawn the local ranks, then HELLO -> INIT -> READY (+ the hello on the input socket)
        with every rank, local and remote, within timeout_s."""
        spawn = multiprocessing.get_context("spawn")
        if self.dp.backend == "ray" and self.dp.local:
            from engine_core.client.ray_launcher import RayEngineLauncher

            self.launcher = RayEngineLauncher(self.dp.local)
        for engine in self.engines[:self.dp.local]:
            if self.launcher is not None:
                engine.process = self.launcher.start(self.handshake_address, engine.rank,
                                                     self.zmq_keys)
                engine.pid = engine.process.pid
                continue
            engine.process = spawn.Process(
                target=run_engine_core, name=f"pp-engine-core-dp{engine.rank}",
                args=(self.handshake_address, engine.rank, self.zmq_keys), daemon=True)
            engine.process.start()
            engine.pid = engine.process.pid
        deadline = time.monotonic() + timeout_s
        peers, refusals = self._peers, self._refusals
        poller = zmq.Poller()
        poller.register(self.handshake_socket, zmq.POLLIN)
        poller.register(self.input_socket, zmq.POLLIN)
        while not all(e.alive for e in self.engines):
            events = dict(poller.poll(int(LIVENESS_POLL_S * 1000)))
            if self.handshake_socket in events:
                self._on_handshake(self.handshake_socket.recv_multipart(), peers, refusals)
            if self.input_socket in events:
                self._on_input(self.input_socket.recv_multipart())
            for engine in self.engines[:self.dp.local]:
                if not engine.alive and not engine.process.is_alive():
                    raise RuntimeError(f"data-parallel engine {engine.rank} (pid {engine.pid}) "
                                       f"exited during startup (exit code "
                                       f"{engine.process.exitcode})")
            if time.monotonic() > deadline:
                missing = [e.rank for e in self.engines if not e.alive]
                why = "".join(f"; rank {r} was refused: {m}" for r, m in refusals.items())
                raise TimeoutError(f"data-parallel engine(s) {missing} did not get ready within "
                                   f"{timeout_s:g} s at {self.handshake_address}{why}")
        if not self.dp.has_remote:  # else it stays open: a restarted remote engine rejoins
            self.handshake_socket.close(linger=0)
            self.handshake_socket = None

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

    def _serve_rejoins(self) -> None:
        """After startup: handshakes of remote engines restarted with the rank of a dead one
        (non-blocking; called from `get_outputs`)."""
        if self.handshake_socket is None:
            return
        while self.handshake_socket.poll(0):
            try:
                self._on_handshake(self.handshake_socket.recv_multipart(), self._peers,
                                   self._refusals)
            except (ValueError, RuntimeError) as exc:  # never for remote engines; be safe
                logger.error("handshake failed: %s", exc)
        while self.input_socket.poll(0):
            self._on_input(self.input_socket.recv_multipart())

    def _on_handshake(self, frames: list[bytes], peers: dict[bytes, _Engine],
                      refusals: dict[int, str]) -> None:
        if len(frames) != 2:
            self.bad_frames.warning("dropped a handshake message of %d frame(s)", len(frames))
            return
        sender, payload = frames
        engine = peers.get(sender)
        try:
            message = msgspec.msgpack.decode(
                payload, type=HandshakeHello if engine is None else HandshakeReady)
        except msgspec.DecodeError as exc:
            self.bad_frames.warning("dropped an undecodable handshake message: %s", exc)
            return
        if engine is None:
            self._on_hello(sender, message, peers)
            return
        del peers[sender]
        ready: HandshakeReady = message
        error = ready.error
        if error is None:
            error = config_mismatch(self.expected_fields, ready.config_fields)
        if error is None:
            engine.accepted = True  # alive once its hello on the input socket arrived too
            self._ready_if_complete(engine)
            return
        if engine.process is not None:  # a local engine: its failure is the front-end's
            kind = ValueError if ready.error_type in ("ValueError", "ConfigMismatchError") \
                else RuntimeError
            raise kind(error)
        logger.error("refused data-parallel engine %d from %s: %s", engine.rank, engine.host,
                     error)
        refusals[engine.rank] = error

    @staticmethod
    def _ready_if_complete(engine: _Engine) -> None:
        if engine.accepted and engine.greeted and not engine.alive:
            engine.alive = True
            engine.last_seen = time.monotonic()
            engine.stats, engine.sends_since_report = SchedulerStats(), 0
            logger.info("data-parallel engine %d %s (host %s, pid %s)", engine.rank,
                        "rejoined" if engine.num_routed else "ready", engine.host or "local",
                        engine.pid)

    def _on_hello(self, sender: bytes, hello: HandshakeHello,
                  peers: dict[bytes, _Engine]) -> None:
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
            engine.identity = b"E" + secrets.token_bytes(15)
            self._by_identity[engine.identity] = engine
        if hello.version != engine_version():
            logger.warning("data-parallel engine %d runs pp-engine %s, the front-end %s",
                           rank, hello.version, engine_version())
        peers[sender] = engine
        init = HandshakeInit(self.input_address, self.output_address,
                             msgspec.msgpack.encode(self.engine_args), engine.identity,
                             dp_size=self.dp.size, config_fields=self.expected_fields)
        self.handshake_socket.send_multipart([sender, msgspec.msgpack.encode(init)])

    # ---- requests -----------------------------------------------------------------------------
    def add_requests(self, requests: Sequence[EngineCoreRequest]) -> None:
        """Send the sequences of one user request to the least loaded live engine."""
        if not requests:
            return
        live = [e for e in self.engines if e.alive]
        if not live:
            raise RuntimeError(self._dead_message())
        engine = min(live, key=lambda e: (e.score(), e.num_routed))
        if self.prefix_index is not None:
            hashes = self.prefix_index.hashes(requests[0].prompt_token_ids)
            best = max(live, key=lambda e: (self.prefix_index.match(e.rank, hashes),
                                            -e.score()))
            if (self.prefix_index.match(best.rank, hashes) > 0
                    and best.score() - engine.score() <= PREFIX_LOAD_SLACK):
                engine = best
            self.prefix_index.record(engine.rank, hashes)
        for request in requests:
            self._owner[request.request_id] = engine
            engine.requests.add(request.request_id)
        engine.sends_since_report += len(requests)
        engine.num_routed += len(requests)
        try:
            for request in requests:
                self.input_socket.send_multipart(
                    [engine.identity, KIND_ADD, self.encoder.encode(request)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # its socket is gone: it is dying
            self._fail(engine, f"not reachable ({exc})")

    def add_request(self, request: EngineCoreRequest) -> None:
        self.add_requests([request])

    def abort_requests(self, request_ids: list[str]) -> None:
        by_engine: dict[int, list[str]] = {}
        for request_id in request_ids:
            engine = self._owner.pop(request_id, None)
            if engine is not None:
                engine.requests.discard(request_id)
                by_engine.setdefault(engine.rank, []).append(request_id)
        for rank, ids in by_engine.items():
            engine = self.engines[rank]
            if engine.alive:
                with contextlib.suppress(zmq.ZMQError):
                    self.input_socket.send_multipart(
                        [engine.identity, KIND_ABORT, self.encoder.encode(AbortRequests(ids))],
                        flags=zmq.NOBLOCK)

    def owner_of(self, request_id: str) -> int | None:
        """The rank of the engine that holds this unfinished request (None: none does)."""
        engine = self._owner.get(request_id)
        return engine.rank if engine is not None else None

    def has_unfinished_requests(self) -> bool:
        return bool(self._owner) or bool(self._failed)

    # ---- outputs ------------------------------------------------------------------------------
    async def get_outputs(self) -> EngineCoreOutputs:
        """The next batch from any engine (plus the failures of engines found dead).
        RuntimeError once every engine is dead."""
        while True:
            self._serve_rejoins()
            self._check_engines()
            if self._failed:
                failed, self._failed = self._failed, []
                return EngineCoreOutputs(outputs=failed, stats=self.stats)
            if not any(e.alive for e in self.engines):
                raise RuntimeError(self._dead_message())
            if await self.output_socket.poll(int(LIVENESS_POLL_S * 1000)):
                batch = self._received(await self.output_socket.recv_multipart())
                if batch is not None:
                    return batch

    def _received(self, frames: list[bytes]) -> EngineCoreOutputs | None:
        engine = self._by_identity.get(frames[0]) if len(frames) == 2 else None
        if engine is None:
            self.bad_frames.warning("dropped an output of %d frame(s) (sizes %s) from no engine "
                                    "of ours", len(frames), [len(f) for f in frames][:8])
            return None
        try:
            batch = self.decoder.decode(frames[1])
        except msgspec.DecodeError as exc:
            self.bad_frames.warning("dropped an undecodable output of engine %d (%d bytes): %s",
                                    engine.rank, len(frames[1]), exc)
            return None
        if not engine.alive:
            return None  # declared dead already; its requests have failed
        engine.last_seen = time.monotonic()
        if batch.stats is not None:
            engine.stats = batch.stats
            engine.sends_since_report = 0
        outputs = []
        for output in batch.outputs:
            if self._owner.get(output.request_id) is not engine:
                continue  # aborted (or never ours): the caller forgot it
            if output.finish_reason is not None:
                del self._owner[output.request_id]
                engine.requests.discard(output.request_id)
            outputs.append(output)
        if batch.error is not None:
            self._fail(engine, batch.error)
        failed, self._failed = self._failed, []
        return EngineCoreOutputs(outputs=outputs + failed, stats=self.stats)

    def _check_engines(self) -> None:
        now = time.monotonic()
        for engine in self.engines:
            if not engine.alive:
                continue
            if engine.process is not None and not engine.process.is_alive():
                self._fail(engine, f"its process {engine.pid} exited with code "
                                   f"{engine.process.exitcode}")
            elif engine.process is None and now - engine.last_seen > REMOTE_SILENCE_S:
                self._fail(engine, f"nothing heard from it ({engine.host}, pid {engine.pid}) "
                                   f"for {REMOTE_SILENCE_S:g} s")
            elif engine.process is None and now - engine.last_seen > LIVENESS_POLL_S:
                try:  # its connection is gone (the ROUTER forgot its id) if this fails
                    self.input_socket.send_multipart([engine.identity, KIND_PING, b""],
                                                     flags=zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    self._fail(engine, f"its connection dropped ({engine.host}, pid "
                                       f"{engine.pid}: {exc})")

    def _fail(self, engine: _Engine, reason: str) -> None:
        """Declare `engine` dead: each of its requests ends with finish_reason "error"."""
        engine.alive = engine.accepted = engine.greeted = False
        message = f"data-parallel engine {engine.rank} died: {reason}"
        alive = sum(e.alive for e in self.engines)
        logger.error("%s; %d request(s) fail, %d engine(s) left", message,
                     len(engine.requests), alive)
        for request_id in sorted(engine.requests):
            self._owner.pop(request_id, None)
            self._failed.append(EngineCoreOutput(request_id, [], finish_reason="error",
                                                 error=message))
        engine.requests.clear()
        engine.stats = SchedulerStats()
        if self.prefix_index is not None:
            self.prefix_index.forget(engine.rank)

    def _dead_message(self) -> str:
        return f"all {len(self.engines)} data-parallel engine cores are dead"

    # ---- status -------------------------------------------------------------------------------
    @property
    def stats(self) -> SchedulerStats:
        """The sum over live engines (kv_usage: of all their blocks)."""
        live = [e.stats for e in self.engines if e.alive]
        total = sum(s.num_total_blocks for s in live)
        free = sum(s.num_free_blocks for s in live)
        return SchedulerStats(
            num_running=sum(s.num_running for s in live),
            num_waiting=sum(s.num_waiting for s in live),
            kv_usage=1.0 - free / total if total else 0.0, num_free_blocks=free,
            num_total_blocks=total, num_preemptions=sum(s.num_preemptions for s in live),
            num_prompt_tokens_computed=sum(s.num_prompt_tokens_computed for s in live),
            kv_sent_tokens=sum(s.kv_sent_tokens for s in live),
            kv_received_tokens=sum(s.kv_received_tokens for s in live),
            kv_sent_bytes=sum(s.kv_sent_bytes for s in live),
            kv_received_bytes=sum(s.kv_received_bytes for s in live),
            kv_transfer_seconds=sum(s.kv_transfer_seconds for s in live),
            kv_leases_expired=sum(s.kv_leases_expired for s in live),
            kv_pushes_expired=sum(s.kv_pushes_expired for s in live),
            kv_transfers_held=sum(s.kv_transfers_held for s in live),
            kv_overflow_transfers=sum(s.kv_overflow_transfers for s in live),
            kv_buffer_bytes=sum(s.kv_buffer_bytes for s in live),
            kv_overflow_bytes=sum(s.kv_overflow_bytes for s in live))

    def engine_states(self) -> list[EngineState]:
        return [EngineState(e.rank, e.alive, e.stats, e.num_routed, e.pid) for e in self.engines]

    def is_alive(self) -> bool:
        return any(e.alive for e in self.engines)

    # ---- shutdown -----------------------------------------------------------------------------
    def stop_engines(self) -> None:
        """Ask every live engine to stop, then reap the local processes (terminate, then kill,
        if they do not exit in time). Remote engines exit on the shutdown message, or when
        their connection drops."""
        told = set()
        for engine in self.engines:
            if engine.alive:
                with contextlib.suppress(zmq.ZMQError):
                    self.input_socket.send_multipart([engine.identity, KIND_SHUTDOWN, b""],
                                                     flags=zmq.NOBLOCK)
                    told.add(engine.rank)
            engine.alive = False
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        for engine in self.engines:
            process = engine.process
            if process is None or process.pid is None:
                continue
            # an engine never told to stop (never ready, say) is not waited for
            reap(process, max(0.0, deadline - time.monotonic()) if engine.rank in told else 0)

    def shutdown(self) -> None:
        """Stop the engines and close every socket. Idempotent."""
        if self._closed:
            return
        self.stop_engines()
        if self.launcher is not None:
            self.launcher.close()
            self.launcher = None
        self._closed = True
        for sock in (self.handshake_socket, self.input_socket, self.output_socket):
            if sock is not None:
                sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.term()
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
