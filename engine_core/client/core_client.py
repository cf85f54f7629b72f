"""`EngineCoreClient`: the front-end's asyncio client of its engine cores, one or N.

Every engine is a full engine-core process (`core_process.run_engine_core`: its own scheduler,
KV blocks and pipeline stages); one engine is the case N = 1 of data parallelism (DESIGN
section 6). `launcher.py` starts them and shakes hands (sockets, routing ids, CurveZMQ, spawn or
Ray, remote ranks from `pp-engine serve --headless`, reaping); this client talks to them. The
front-end binds a ROUTER for input and one for output; it sends each engine only what is its
own (addressed by the engine's secret routing id) and attributes outputs to their engine by the
sender's routing id, dropping frames from anyone else. Everything on the wire is msgspec, every
frame is decoded inside a try (a bad one is logged, capped, and dropped), every wait is bounded.

Routing: every user request (all its n sequences) goes to the live engine with the lowest
`waiting * 4 + running + sends since its last report` (with `routing="prefix"`, to the engine
that was sent the most of its prompt's leading blocks, unless that one is much busier: see
`prefix_router.py`); engines report their stats with every output batch (and, remote or Ray
ones, at least once a second when idle). The client remembers which engine owns each request,
so aborts reach it.

Failures: an engine that dies (its process exits, it reports an error, a remote one is silent
for `REMOTE_SILENCE_S` or its connection dropped) is noticed within about a second and fails
only its own requests (finish_reason "error", with its error text); routing skips it. A remote
engine restarted with the rank of a dead one rejoins. Once no engine is left the client is dead:
`get_outputs` raises RuntimeError naming why the last one died, and the requests still open are
the caller's to fail (for one engine: every request, with the engine's own error text).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from engine_core.client.base import EngineState
from engine_core.client.core_process import KIND_ABORT, KIND_ADD, KIND_PING, KIND_SHUTDOWN
from engine_core.client.launcher import (
    LIVENESS_POLL_S,
    EngineLauncher,
    EngineLink,
    new_identity,
)
from engine_core.client.prefix_router import PrefixIndex
from engine_core.config import DataParallelConfig, EngineArgs
from engine_core.messages import (
    AbortRequests,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    SchedulerStats,
)
from engine_core.transport import WarningLimiter

__all__ = ["EngineCoreClient"]

logger = logging.getLogger(__name__)

REMOTE_SILENCE_S = 10.0  # a remote engine that sent nothing (not even a heartbeat) is dead
WAITING_WEIGHT = 4  # a waiting request weighs this many running ones in the load score
PREFIX_LOAD_SLACK = 8  # prefix routing yields to load when the holder is this much busier


@dataclass
class _Engine(EngineLink):
    """One engine core as the client tracks it: the launcher's link plus its load."""

    sends_since_report: int = 0
    num_routed: int = 0
    last_seen: float = 0.0
    requests: set[str] = field(default_factory=set)
    failure: str | None = None  # why it was last declared dead

    def score(self) -> int:
        return (self.stats.num_waiting * WAITING_WEIGHT + self.stats.num_running
                + self.sends_since_report)


class EngineCoreClient:
    """asyncio client of the front-end's engine cores (implements `base.AsyncEngineClient`).

    Make one with `factory.make_client(...)` (ValueError for bad flags, tcp without keys or an
    unreadable key directory), then `await client.start(timeout_s)`: ValueError if an engine
    rejected its arguments or a socket cannot bind (port in use), RuntimeError if an engine
    failed or exited during startup, TimeoutError (naming the ranks and the address) if they
    were not all ready in time; the client is shut down after any of these. `shutdown()` when
    done, always."""

    def __init__(self, engine_args: EngineArgs, dp: DataParallelConfig, *,
                 transport: str = "ipc", zmq_keys: str | None = None,
                 insecure_tcp: bool = False) -> None:
        self.dp = dp
        self.engines = [_Engine(rank, new_identity()) for rank in range(dp.size)]
        self.bad_frames = WarningLimiter(logger)
        self.launcher = EngineLauncher(engine_args, dp, self.engines, self.bad_frames,
                                       transport=transport, zmq_keys=zmq_keys,
                                       insecure_tcp=insecure_tcp)
        config = self.launcher.config
        self.prefix_index = (PrefixIndex(dp.size, config.cache.block_size)
                             if dp.routing == "prefix" and config.cache.enable_prefix_caching
                             else None)
        self._owner: dict[str, _Engine] = {}
        self._failed: list[EngineCoreOutput] = []
        self._last_failure: str | None = None
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self.ctx = zmq.asyncio.Context()
        self.sync_ctx: zmq.Context = zmq.Context.shadow(self.ctx.underlying)
        # inputs go out on a plain (sync, never blocking) ROUTER; outputs arrive on an asyncio one
        self.input_socket = self.sync_ctx.socket(zmq.ROUTER)
        self.output_socket = self.ctx.socket(zmq.ROUTER)
        self._closed = False

    async def start(self, timeout_s: float = 600.0) -> None:
        """Bind, start the engines and wait until every one is ready (see the class)."""
        try:
            self.launcher.bind(self.sync_ctx, self.input_socket, self.output_socket)
            await asyncio.to_thread(self.launcher.launch, timeout_s)
        except BaseException:
            self.shutdown()
            raise
        now = time.monotonic()
        for engine in self.engines:
            engine.last_seen = now

    # ---- what tests and /metrics look at ------------------------------------------------------
    @property
    def input_address(self) -> str:
        return self.launcher.input_address

    @property
    def output_address(self) -> str:
        return self.launcher.output_address

    def engine_identity(self, rank: int = 0) -> bytes:
        """Engine `rank`'s routing id on both sockets (a secret: whoever holds it can pose as
        that engine)."""
        return self.engines[rank].identity

    def owner_of(self, request_id: str) -> int | None:
        """The rank of the engine that holds this unfinished request (None: none does)."""
        engine = self._owner.get(request_id)
        return engine.rank if engine is not None else None

    def engine_states(self) -> list[EngineState]:
        return [EngineState(e.rank, e.alive, e.stats, e.num_routed, e.pid) for e in self.engines]

    def is_alive(self) -> bool:
        return any(e.alive for e in self.engines)

    def has_unfinished_requests(self) -> bool:
        return bool(self._owner) or bool(self._failed)

    def dead_message(self) -> str:
        """Why the client is dead: for one engine, why it died."""
        if len(self.engines) == 1:
            return self.engines[0].failure or "the engine core is not running"
        last = f" (the last: {self._last_failure})" if self._last_failure else ""
        return f"all {len(self.engines)} data-parallel engine cores are dead{last}"

    # ---- requests -----------------------------------------------------------------------------
    def add_requests(self, requests: Sequence[EngineCoreRequest]) -> None:
        """Send the sequences of one user request to one live engine (the least loaded, or
        with prefix routing the one holding most of their prompt)."""
        if not requests:
            return
        live = [e for e in self.engines if e.alive]
        if not live:
            raise RuntimeError(self.dead_message())
        engine = self._route(live, requests[0])
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
            self._fail(engine, f"the engine core is not reachable ({exc})")

    def add_request(self, request: EngineCoreRequest) -> None:
        self.add_requests([request])

    def _route(self, live: list[_Engine], request: EngineCoreRequest) -> _Engine:
        engine = min(live, key=lambda e: (e.score(), e.num_routed))
        index = self.prefix_index
        if index is not None:
            hashes = index.hashes(request.prompt_token_ids)
            best = max(live, key=lambda e: (index.match(e.rank, hashes), -e.score()))
            if (index.match(best.rank, hashes) > 0
                    and best.score() - engine.score() <= PREFIX_LOAD_SLACK):
                engine = best
            index.record(engine.rank, hashes)
        return engine

    def abort_requests(self, request_ids: list[str]) -> None:
        """Each id reaches the engine that owns it; unknown ids are ignored."""
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

    # ---- outputs ------------------------------------------------------------------------------
    async def get_outputs(self, timeout_s: float | None = None) -> EngineCoreOutputs:
        """The next batch from any engine (plus the failures of engines found dead).
        RuntimeError once every engine is dead; TimeoutError if `timeout_s` passes without a
        batch (None: wait as long as some engine lives)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            for engine in self.launcher.serve_rejoins():
                self._rejoined(engine)
            self._check_engines()
            if not self.is_alive():
                self._failed.clear()  # the caller fails every open request
                raise RuntimeError(self.dead_message())
            if self._failed:
                failed, self._failed = self._failed, []
                return EngineCoreOutputs(outputs=failed)
            wait_s = LIVENESS_POLL_S
            if deadline is not None:
                wait_s = min(wait_s, max(0.0, deadline - time.monotonic()))
            if await self.output_socket.poll(int(wait_s * 1000)):
                batch = self._received(await self.output_socket.recv_multipart())
                if batch is not None and self.is_alive():
                    return batch
            elif deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no output from the engine cores in {timeout_s:g} s")

    def _decode_output(self, frames: list[bytes]) -> tuple[_Engine, EngineCoreOutputs] | None:
        """One message from the output ROUTER, [sender, payload], with the engine that sent it.
        None (logged, capped) unless it comes from one of our engines and decodes; never
        raises."""
        link = self.launcher.find(frames[0]) if len(frames) == 2 else None
        if link is None:
            self.bad_frames.warning("dropped an output of %d frame(s) (sizes %s) from no engine "
                                    "of ours", len(frames), [len(f) for f in frames][:8])
            return None
        engine = self.engines[link.rank]
        try:
            return engine, self.decoder.decode(frames[1])
        except msgspec.DecodeError as exc:
            self.bad_frames.warning("dropped an undecodable output of engine %d (%d bytes): %s",
                                    engine.rank, len(frames[1]), exc)
            return None

    def _received(self, frames: list[bytes]) -> EngineCoreOutputs | None:
        """Apply one output message: the engine's stats, its requests' outputs, its death."""
        decoded = self._decode_output(frames)
        if decoded is None:
            return None
        engine, batch = decoded
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
        return EngineCoreOutputs(outputs=outputs + failed)

    def _rejoined(self, engine: EngineLink) -> None:
        rejoined = self.engines[engine.rank]
        rejoined.last_seen = time.monotonic()
        rejoined.sends_since_report = 0  # its stats: those of its READY
        rejoined.failure = None

    def _check_engines(self) -> None:
        now = time.monotonic()
        for engine in self.engines:
            if not engine.alive:
                continue
            if engine.process is not None and not engine.process.is_alive():
                self._fail(engine, f"the engine-core process died (pid {engine.pid}, exit "
                                   f"code {engine.process.exitcode})")
            elif engine.process is None and now - engine.last_seen > REMOTE_SILENCE_S:
                self._fail(engine, f"nothing heard from the engine core ({engine.host}, pid "
                                   f"{engine.pid}) for {REMOTE_SILENCE_S:g} s")
            elif engine.process is None and now - engine.last_seen > LIVENESS_POLL_S:
                try:  # its connection is gone (the ROUTER forgot its id) if this fails
                    self.input_socket.send_multipart([engine.identity, KIND_PING, b""],
                                                     flags=zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    self._fail(engine, f"the connection to the engine core dropped "
                                       f"({engine.host}, pid {engine.pid}: {exc})")

    def _fail(self, engine: _Engine, reason: str) -> None:
        """Declare `engine` dead: each of its requests ends with finish_reason "error" and the
        reason (prefixed with the engine's rank when there are several)."""
        engine.alive = engine.accepted = engine.greeted = False
        message = reason if len(self.engines) == 1 else \
            f"data-parallel engine {engine.rank} failed: {reason}"
        engine.failure = self._last_failure = message
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

    # ---- status -------------------------------------------------------------------------------
    def stats(self) -> SchedulerStats:
        """The sum over live engines (`SchedulerStats.sum`; kv_usage: of all their blocks)."""
        return SchedulerStats.sum(e.stats for e in self.engines if e.alive)

    # ---- shutdown -----------------------------------------------------------------------------
    def stop_engines(self) -> None:
        """Ask every live engine to stop, then reap the local processes (terminate, then kill,
        if they do not exit in time). Remote engines exit on the shutdown message, or when
        their connection drops. Blocking; safe off the event loop."""
        told = set()
        for engine in self.engines:
            if engine.alive:
                with contextlib.suppress(zmq.ZMQError):
                    self.input_socket.send_multipart([engine.identity, KIND_SHUTDOWN, b""],
                                                     flags=zmq.NOBLOCK)
                    told.add(engine.rank)
            engine.alive = False
        self.launcher.reap(told)

    def shutdown(self) -> None:
        """Stop the engines and close every socket. Idempotent."""
        if self._closed:
            return
        self.stop_engines()
        self._closed = True
        self.input_socket.close(linger=0)
        self.output_socket.close(linger=0)
        self.launcher.close()
        self.ctx.term()
