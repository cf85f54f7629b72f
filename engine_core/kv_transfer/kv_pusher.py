"""A producer's pushes (PUT, PUT_ASYNC): offer each leased transfer to its decoder, wait
(bounded) for the answers, send the accepted ones. What is not accepted keeps its lease for a
pull (GET) or expiry: back-pressure never loses KV."""

from __future__ import annotations

import logging
import queue
import threading
import time

import msgspec
import zmq

from engine_core.kv_transfer.kv_wire import KVControl, PushDone, PushOffer, PushReply
from engine_core.kv_transfer.local_kv import LocalKV
from engine_core.kv_transfer.peer_sockets import PeerSockets
from engine_core.kv_transfer.transfer_stats import DroppedMessages
from engine_core.messages import KVTransferStats
from engine_core.transfer_params import KVTransferParams
from engine_core.transport import CurveKeys

__all__ = ["PUSH_REPLY_TIMEOUT_S", "KVPusher", "PushJob"]

logger = logging.getLogger(__name__)

PUSH_REPLY_TIMEOUT_S = 5.0  # how long P waits for D's answer to an offer

PushJob = tuple[str, KVTransferParams]  # (lease id, the decoder's params: its kv_endpoint)

_control = msgspec.msgpack.Decoder(KVControl)


class KVPusher:
    """`push` runs in the calling thread, on that thread's own `PeerSockets` (PUT: the engine
    thread); `run` is the PUT_ASYNC sender thread."""

    def __init__(self, local: LocalKV, stats: KVTransferStats, drop: DroppedMessages,
                 stop: threading.Event, ctx: zmq.Context, keys: CurveKeys | None) -> None:
        self.local = local
        self.stats = stats
        self.drop = drop
        self.stop = stop
        self.ctx, self.keys = ctx, keys

    def new_sockets(self) -> PeerSockets:
        """Sockets for one pushing thread: a decoder that leaves offers unanswered is skipped
        for PUSH_REPLY_TIMEOUT_S."""
        return PeerSockets(self.ctx, self.keys, PUSH_REPLY_TIMEOUT_S)

    def push(self, sockets: PeerSockets, jobs: list[PushJob]) -> list[str]:
        """Offer every job's transfer, wait (PUSH_REPLY_TIMEOUT_S at most) for the answers,
        send the accepted ones. Returns the lease ids pushed (the caller ends those leases and
        frees their blocks). The others keep their leases for a pull: D said hold, did not
        answer (then, or lately), a stage read failed, or the lease is gone."""
        start = time.perf_counter()
        offered: dict[str, str] = {}  # lease id -> endpoint
        for lease_id, target in jobs:
            lease = self.local.get_lease(lease_id)
            if lease is None:  # released (by D or the proxy) or expired meanwhile
                continue
            if sockets.is_silent(target.kv_endpoint):
                self._held(lease_id, target.kv_endpoint, "no answer lately")
                continue
            num_blocks = len(lease.block_ids)
            sockets.get(target.kv_endpoint).send(msgspec.msgpack.encode(PushOffer(
                lease_id, self.local.compat_hash, num_blocks,
                num_blocks * self.local.block_bytes)))
            offered[lease_id] = target.kv_endpoint
        replies = self._await_replies(sockets, offered)
        pushed = []
        for lease_id, endpoint in offered.items():
            reply = replies.get(lease_id)
            if reply is None or not reply.accepted:
                self._held(lease_id, endpoint, "no answer" if reply is None else reply.reason)
                continue
            try:
                leased = self.local.read_lease(lease_id)
            except RuntimeError:  # a stage died or timed out: D's reservation expires
                logger.exception("reading the KV of transfer %s failed", lease_id)
                continue
            if leased is None:
                continue
            lease, layers = leased
            sock = sockets.get(endpoint)
            for frames in self.local.encode(lease_id, lease.num_tokens, layers):
                sock.send_multipart(frames, copy=False)
                self.stats.sent_bytes += sum(memoryview(f).nbytes for f in frames)
            sock.send(msgspec.msgpack.encode(PushDone(lease_id, len(layers))))
            self.stats.sent_tokens += lease.num_tokens
            pushed.append(lease_id)
        self.stats.seconds += time.perf_counter() - start
        return pushed

    def run(self, jobs: queue.SimpleQueue[PushJob | None], pushed: queue.SimpleQueue[str]) -> None:
        """PUT_ASYNC: push what `jobs` holds, all that is queued at once, until None; put each
        lease id pushed on `pushed` (the engine thread ends the lease and frees the blocks:
        ending it here would let the engine lend the same request again)."""
        sockets = self.new_sockets()
        try:
            while True:
                batch: list[PushJob] = []  # all that is queued now, up to a None
                job = jobs.get()
                while job is not None:
                    batch.append(job)
                    try:
                        job = jobs.get_nowait()
                    except queue.Empty:
                        break
                if job is None:
                    return
                try:
                    for lease_id in self.push(sockets, batch):
                        pushed.put(lease_id)
                except Exception:
                    logger.exception("pushing the KV of transfers %s failed",
                                     [lease_id for lease_id, _ in batch])
        finally:
            sockets.close()

    def _held(self, lease_id: str, endpoint: str, reason: str | None) -> None:
        self.stats.transfers_held += 1
        logger.info("transfer %s not pushed to %s (%s): leased for a pull", lease_id, endpoint,
                    reason)

    def _await_replies(self, sockets: PeerSockets, offered: dict[str, str]
                       ) -> dict[str, PushReply]:
        """D's `PushReply` to each offer (lease id -> endpoint), within PUSH_REPLY_TIMEOUT_S;
        replies to earlier offers are skipped. A decoder that left offers unanswered is
        silenced (what is queued for it dropped)."""
        replies: dict[str, PushReply] = {}
        poller = zmq.Poller()
        for endpoint in set(offered.values()):
            poller.register(sockets.get(endpoint), zmq.POLLIN)
        deadline = time.monotonic() + PUSH_REPLY_TIMEOUT_S
        while len(replies) < len(offered) and not self.stop.is_set():
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            for sock, _ in poller.poll(min(remaining_ms, 100)):
                try:
                    reply = _control.decode(sock.recv())
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    self.drop(f"a bad answer to a push offer: {exc}")
                    continue
                if isinstance(reply, PushReply) and reply.lease_id in offered:
                    replies[reply.lease_id] = reply
        for endpoint in {e for lease_id, e in offered.items() if lease_id not in replies}:
            sockets.silence(endpoint)
        return replies
