"""A consumer's fetcher thread: gets each request's KV into the blocks the scheduler gave it.

A pushed transfer (PUT, PUT_ASYNC) is written once complete; it is pulled instead (GET) when
the producer was told to hold, it was refused or dropped, or it did not arrive within
`fetch_timeout_s`. Pulls run side by side, one DEALER each, all on one poller: a slow or dead
producer delays only its own requests, each by `fetch_timeout_s` at most. Every pull ends
with `ReleaseKV` to its producer (also after a failure), so the lease ends at once."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import msgspec
import zmq

from engine_core.executors.kv_endpoint import KVFrameError, KVLayer, decode_layer
from engine_core.kv_transfer.kv_wire import KVControl, PullDone, PullKV, ReleaseKV
from engine_core.kv_transfer.local_kv import LocalKV
from engine_core.kv_transfer.peer_sockets import PeerSockets
from engine_core.kv_transfer.receive_buffer import ReceiveBuffer, TransferState
from engine_core.kv_transfer.transfer_stats import DroppedMessages
from engine_core.messages import KVTransferStats
from engine_core.transfer_params import KVTransferParams
from engine_core.transport import CurveKeys, secure_client

__all__ = ["FetchJob", "KVFetcher", "ReleaseJob"]

logger = logging.getLogger(__name__)

PULL_POLL_MS = 5  # how often, while pulls run, the fetcher also looks for new jobs

_control = msgspec.msgpack.Decoder(KVControl)


@dataclass(frozen=True)
class FetchJob:
    """Get the KV of `params` into `block_ids` (a request's first blocks)."""

    request_id: str
    params: KVTransferParams
    block_ids: list[int]


@dataclass(frozen=True)
class ReleaseJob:
    """Tell the producer at `endpoint` that transfer `lease_id` is not needed."""

    endpoint: str
    lease_id: str


@dataclass
class _Pull:
    job: FetchJob
    sock: zmq.Socket
    deadline: float
    start: float
    written: set[int] = field(default_factory=set)  # layers in the request's blocks
    ok: bool | None = None  # the result, once over


class KVFetcher:
    """`run` is the thread: it takes jobs from `jobs` (None stops it) and puts (request id,
    whether every layer was written) on `fetched` once a fetch is over."""

    def __init__(self, local: LocalKV, received: ReceiveBuffer, stats: KVTransferStats,
                 drop: DroppedMessages, fetch_timeout_s: float,
                 jobs: queue.SimpleQueue[FetchJob | ReleaseJob | None],
                 fetched: queue.SimpleQueue[tuple[str, bool]], stop: threading.Event,
                 ctx: zmq.Context, keys: CurveKeys | None) -> None:
        self.local = local
        self.received = received
        self.stats = stats
        self.drop = drop
        self.fetch_timeout_s = fetch_timeout_s
        self.jobs = jobs
        self.fetched = fetched
        self.stop = stop
        self.ctx, self.keys = ctx, keys
        self._awaiting: dict[str, tuple[FetchJob, float]] = {}  # pushed: id -> (job, deadline)
        self._pulls: dict[zmq.Socket, _Pull] = {}
        self._poller = zmq.Poller()

    def run(self) -> None:
        releases = PeerSockets(self.ctx, self.keys, silent_s=0.0)  # ReleaseKV of given-up KV
        try:
            while not self.stop.is_set():
                try:
                    if not self._step(releases):
                        return
                except Exception:  # a bug, not a peer: fail what is in flight, keep serving
                    logger.exception("the KV fetcher failed; the fetches in flight fail")
                    self._fail_all()
        finally:
            self._fail_all()
            releases.close()

    def _step(self, releases: PeerSockets) -> bool:
        """Take new jobs, move every fetch on, wait a little (bounded) for news; False once
        told to stop."""
        version = self.received.version
        for job in self._take_jobs(block=not self._awaiting and not self._pulls):
            if job is None:
                return False
            if isinstance(job, ReleaseJob):
                self._release(releases, job)
            elif job.params.compat_hash != self.local.compat_hash:
                logger.warning("KV params with layout hash %s, ours is %s: not fetched",
                               job.params.compat_hash, self.local.compat_hash)
                self.fetched.put((job.request_id, False))
            elif job.params.send_type == "GET":
                self._start_pull(job)
            else:
                deadline = time.monotonic() + self.fetch_timeout_s
                self._awaiting[job.request_id] = (job, deadline)
        for request_id, (job, deadline) in list(self._awaiting.items()):
            if self._advance_push(job, deadline):
                del self._awaiting[request_id]
        if self._pulls:
            for sock, _ in self._poller.poll(PULL_POLL_MS):
                self._receive(self._pulls[sock])
            for pull in list(self._pulls.values()):
                ok = self._pull_result(pull)
                if ok is not None:
                    self._end_pull(pull, ok)
        elif self._awaiting:  # until a push completes, is held or dropped, or a new job
            self.received.wait(version, timeout=0.1)
        return True

    def _fail_all(self) -> None:
        for pull in list(self._pulls.values()):
            self._end_pull(pull, ok=False)
        for job, _ in self._awaiting.values():
            self.received.drop(job.params.lease_id)
            self.fetched.put((job.request_id, False))
        self._awaiting.clear()

    def _release(self, releases: PeerSockets, job: ReleaseJob) -> None:
        try:
            releases.get(job.endpoint).send(msgspec.msgpack.encode(ReleaseKV(job.lease_id)))
        except zmq.ZMQError as exc:  # not a ZMQ address: the lease expires
            logger.warning("cannot release transfer %s at %r: %s", job.lease_id, job.endpoint,
                           exc)

    def _take_jobs(self, block: bool) -> list[FetchJob | ReleaseJob | None]:
        jobs = [self.jobs.get()] if block else []
        while True:
            try:
                jobs.append(self.jobs.get_nowait())
            except queue.Empty:
                return jobs

    # ---- pushed transfers ---------------------------------------------------------------------
    def _advance_push(self, job: FetchJob, deadline: float) -> bool:
        """Move a pushed transfer on; True once it left the push path: written into the
        request's blocks (result reported), or pulled instead because it was held, refused or
        dropped, or did not arrive by `deadline`. False: its layers may still come."""
        lease_id = job.params.lease_id
        state = self.received.state(lease_id)
        if state is TransferState.COMPLETE:
            layers = self.received.take(lease_id)
            if layers is not None:
                self.fetched.put((job.request_id, self._write(job, layers)))
                return True
        if state not in (TransferState.HELD, TransferState.GONE):
            if time.monotonic() < deadline:
                return False
            logger.warning("pushed KV of %s did not arrive in %.1f s; pulling it", lease_id,
                           self.fetch_timeout_s)
        self.received.drop(lease_id)  # late layers are dropped
        self._start_pull(job)
        return True

    def _write(self, job: FetchJob, layers: list[KVLayer]) -> bool:
        """Write a taken transfer into the request's blocks; True if every layer was."""
        start = time.perf_counter()
        try:
            ok = self.local.is_whole(self.local.write(job.block_ids, layers))
        except Exception:  # a stage died or timed out: the request computes its prompt
            logger.exception("writing the KV of request %s failed", job.request_id)
            ok = False
        if ok:
            self.stats.received_tokens += job.params.num_tokens
        self.stats.seconds += time.perf_counter() - start
        return ok

    # ---- pulls (GET) --------------------------------------------------------------------------
    def _start_pull(self, job: FetchJob) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        secure_client(sock, self.keys)
        try:
            sock.connect(job.params.kv_endpoint)
        except zmq.ZMQError as exc:  # not a ZMQ address: the request computes its prompt
            logger.warning("cannot pull the KV of request %s from %r: %s", job.request_id,
                           job.params.kv_endpoint, exc)
            sock.close(linger=0)
            self.fetched.put((job.request_id, False))
            return
        sock.send(msgspec.msgpack.encode(PullKV(job.params.lease_id, self.local.compat_hash)))
        now = time.monotonic()
        self._pulls[sock] = _Pull(job, sock, now + self.fetch_timeout_s, time.perf_counter())
        self._poller.register(sock, zmq.POLLIN)

    def _receive(self, pull: _Pull) -> None:
        """Take what the producer sent so far: layers are written as they come; `PullDone`
        (or a failure) sets the pull's result."""
        params, block_ids = pull.job.params, pull.job.block_ids
        while pull.ok is None:
            try:
                frames = pull.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) == 1:
                try:
                    done = _control.decode(frames[0].bytes)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    self.drop(f"a bad answer to a KV pull: {exc}")
                    pull.ok = False
                    return
                if not isinstance(done, PullDone) or done.error is not None:
                    logger.warning("KV pull refused: %s", getattr(done, "error", done))
                    pull.ok = False
                else:
                    pull.ok = self.local.is_whole(pull.written)
                return
            try:
                layer = decode_layer(frames)
            except KVFrameError as exc:
                self.drop(f"a pulled KV message: {exc}")
                continue
            header = layer.header
            if (header.lease_id != params.lease_id or header.compat_hash != self.local.compat_hash
                    or header.shape[0] != len(block_ids)):
                self.drop(f"a pulled KV layer of lease {header.lease_id} (hash "
                          f"{header.compat_hash}, {header.shape[0]} blocks)")
                continue
            try:
                if self.local.write_layer(block_ids, layer):
                    pull.written.add(header.layer)
            except Exception:  # a stage died or timed out
                logger.exception("writing the KV of request %s failed", pull.job.request_id)
                pull.ok = False
                return
            self.stats.received_bytes += sum(f.buffer.nbytes for f in frames)

    def _pull_result(self, pull: _Pull) -> bool | None:
        if pull.ok is None and time.monotonic() >= pull.deadline:
            logger.warning("KV of lease %s did not arrive in %.1f s", pull.job.params.lease_id,
                           self.fetch_timeout_s)
            pull.ok = False
        return pull.ok

    def _end_pull(self, pull: _Pull, ok: bool) -> None:
        """Report the pull's result and tell the producer to end the lease (also after a
        failure: it has nothing more to give)."""
        del self._pulls[pull.sock]
        self._poller.unregister(pull.sock)
        pull.sock.send(msgspec.msgpack.encode(ReleaseKV(pull.job.params.lease_id)))
        pull.sock.close()
        if ok:
            self.stats.received_tokens += pull.job.params.num_tokens
        self.stats.seconds += time.perf_counter() - pull.start
        self.fetched.put((pull.job.request_id, ok))
