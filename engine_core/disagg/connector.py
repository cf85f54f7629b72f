"""The engine side of KV transfer: a prefill instance (P) lends its finished prompts' KV blocks,
a decode instance (D) fetches them into its own blocks. Send type GET: D pulls from P's
endpoint; PUT: P pushes to D's endpoint right after the prefill (from the engine thread);
PUT_ASYNC: the same from a background sender thread.

P always leases a finished prompt's blocks first (with PUT/PUT_ASYNC under the transfer id the
proxy chose), then, pushing, offers the transfer to D and waits (bounded) for D's answer. D
reserves room for it in its receive buffer or its overflow pool (`receive_buffer.py`), or tells
P to hold: back-pressure. Accepted: P pushes and frees its blocks. Held, or no answer: P keeps
the lease and D pulls the transfer (GET) when its request comes, or the lease expires. D's
request, once it has blocks, takes the pushed transfer, or pulls it if it was held, refused or
never came; if that fails too, D computes the prompt itself (same tokens).

The engine thread calls only `before_step` and `after_step` (and, with PUT, pushes); each
socket lives in one thread: the KV endpoint (P serves pulls, D receives pushes, both take
`ReleaseKV`), D's fetcher, P's PUT_ASYNC sender. They meet in thread-safe queues, the receive
buffer, and one lock (around the lease table and the reads of leased blocks, so an expiring
lease never frees blocks being read). Every wait is bounded.

Wire: msgspec control messages (`kv_wire.py`, its table) and layer messages
(`executors/kv_endpoint.py`), never pickle, DEALER -> ROUTER (the KV endpoint):

    D -> P   PullKV             P -> D   [KVLayerHeader, K, V] per layer, then PullDone
    D -> P   ReleaseKV          (after a pull, or giving up: P ends the lease, frees the blocks)
    P -> D   PushOffer          D -> P   PushReply (accepted, or hold / refused)
    P -> D   [KVLayerHeader, K, V] per layer, then PushDone        (only once accepted)
    any      ReleaseKV          (the proxy: the client request ended before D took the KV)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import msgspec
import torch
import zmq

from engine_core.config import EngineConfig
from engine_core.disagg.compat import kv_compat_fields, kv_compat_hash
from engine_core.disagg.config import KVTransferConfig
from engine_core.disagg.kv_wire import (
    KVControl,
    PullDone,
    PullKV,
    PushDone,
    PushOffer,
    PushReply,
    ReleaseKV,
)
from engine_core.disagg.leases import Lease, LeaseTable
from engine_core.disagg.receive_buffer import ReceiveBuffer, TransferState
from engine_core.disagg.transfer_params import KVTransferParams
from engine_core.executor import KVStage
from engine_core.messages import EngineCoreOutput
from engine_core.request import Request
from engine_core.scheduler import Scheduler
from engine_core.transport import (
    CurveAuthenticator,
    CurveKeys,
    WarningLimiter,
    load_client_keys,
    load_server_keys,
    secure_client,
    secure_server,
)
from executors.kv_endpoint import KVFrameError, KVLayer, KVLayerHeader, decode_layer, encode_layer

__all__ = ["KVConnector", "KVTransferStats"]

logger = logging.getLogger(__name__)

PUSH_REPLY_TIMEOUT_S = 5.0  # how long P waits for D's answer to an offer
SWEEP_INTERVAL_S = 0.5  # how often D's endpoint drops buffered KV past its TTL

_control = msgspec.msgpack.Decoder(KVControl)


class KVTransferStats(msgspec.Struct):
    """Counters since start (both sides; an instance counts what its role does) and two gauges.
    Written by the connector's threads, read by the engine's stats."""

    sent_tokens: int = 0
    received_tokens: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    seconds: float = 0.0  # spent moving KV, both directions
    dropped_messages: int = 0
    leases_expired: int = 0  # producer: leases whose decoder never took them
    pushes_expired: int = 0  # consumer: buffered pushes whose request never came
    transfers_held: int = 0  # back-pressure: pushes D told to hold / P was told to hold
    overflow_transfers: int = 0  # consumer: pushes that went to the overflow pool
    buffer_bytes: int = 0  # consumer, now: bytes reserved in the receive buffer
    overflow_bytes: int = 0  # consumer, now: bytes reserved in the overflow pool


@dataclass(frozen=True)
class _Fetch:
    """For the fetcher: get the KV of `params` into `block_ids` (a request's first blocks)."""

    request_id: str
    params: KVTransferParams
    block_ids: list[int]


@dataclass(frozen=True)
class _Release:
    """For the fetcher: tell the producer at `endpoint` that transfer `lease_id` is not needed."""

    endpoint: str
    lease_id: str


class _PeerSockets:
    """One thread's DEALER sockets to peers' KV endpoints, by endpoint. A peer that did not
    answer in time is `silenced`: its socket is closed (what was queued for it is dropped) and
    `is_silent` says so for `PUSH_REPLY_TIMEOUT_S`, so a dead decoder costs one wait, not one
    per request."""

    def __init__(self, ctx: zmq.Context, keys: CurveKeys | None) -> None:
        self.ctx, self.keys = ctx, keys
        self._sockets: dict[str, zmq.Socket] = {}
        self._silent_until: dict[str, float] = {}

    def get(self, endpoint: str) -> zmq.Socket:
        sock = self._sockets.get(endpoint)
        if sock is None:
            sock = self._sockets[endpoint] = self.ctx.socket(zmq.DEALER)
            secure_client(sock, self.keys)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(endpoint)
        return sock

    def silence(self, endpoint: str) -> None:
        self._sockets.pop(endpoint).close(linger=0)
        self._silent_until[endpoint] = time.monotonic() + PUSH_REPLY_TIMEOUT_S

    def is_silent(self, endpoint: str) -> bool:
        until = self._silent_until.get(endpoint)
        if until is not None and until <= time.monotonic():
            del self._silent_until[endpoint]
            until = None
        return until is not None

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()


class KVConnector:
    """Owned by one `EngineCore`; `stages` are its executor's `kv_stages()` (in-process stage
    workers, or adapters of Ray stage actors): the connector reads and writes KV only through
    them, by global layer index, so P and D may split the model differently.

    Producer side: a finished `do_remote_decode` request's whole prompt blocks are leased
    (`lease_ttl_s`), pushed when the send type says so, and its final output carries
    `KVTransferParams`. Consumer side: a request with `kv_transfer_params` that the scheduler has
    given blocks (`waiting_for_kv`) waits out of scheduling until its KV is in them, or the fetch
    failed (bounded by `fetch_timeout_s` per attempt; then it computes the prompt itself)."""

    def __init__(self, config: EngineConfig, kv_config: KVTransferConfig,
                 stages: list[KVStage], host: str = "127.0.0.1", lease_ttl_s: float = 30.0,
                 fetch_timeout_s: float = 10.0, zmq_keys: str | None = None) -> None:
        self.config = config
        self.kv_config = kv_config
        self.stages = stages
        self.compat_fields = kv_compat_fields(config)
        self.compat_hash = kv_compat_hash(self.compat_fields)
        self.endpoint = f"tcp://{host}:{kv_config.kv_port}"
        self.lease_ttl_s = lease_ttl_s
        self.fetch_timeout_s = fetch_timeout_s
        m = config.model
        itemsize = torch.empty((), dtype=getattr(torch, config.dtype)).element_size()
        self.block_bytes = (2 * m.num_layers * config.cache.block_size * m.num_kv_heads
                            * m.head_dim * itemsize)  # K and V of one block, every layer
        self.stats = KVTransferStats()
        self.leases = LeaseTable(lease_ttl_s)
        self._lock = threading.Lock()  # the lease table and reads of leased blocks
        self._released: queue.SimpleQueue[str] = queue.SimpleQueue()  # lease ids to end
        self._fetches: queue.SimpleQueue[_Fetch | _Release | None] = queue.SimpleQueue()
        self._fetched: queue.SimpleQueue[tuple[str, bool]] = queue.SimpleQueue()
        self._fetching: set[str] = set()
        self._received = ReceiveBuffer(kv_config.kv_buffer_size, kv_config.kv_overflow_size,
                                       lease_ttl_s, self.stats)
        self._sends: queue.SimpleQueue[tuple[str, KVTransferParams] | None] = \
            queue.SimpleQueue()  # PUT_ASYNC jobs (lease id, where to) for the sender thread
        self._sent: queue.SimpleQueue[str] = queue.SimpleQueue()  # their lease ids, once pushed
        self._bad_frames = WarningLimiter(logger)
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        # CurveZMQ: the endpoint is a CURVE server, every socket to a peer a CURVE client
        self._server_keys = load_server_keys(zmq_keys) if zmq_keys is not None else None
        self._client_keys = load_client_keys(zmq_keys) if zmq_keys is not None else None
        self._push_sockets = _PeerSockets(self._ctx, self._client_keys)  # the engine thread's
        self._auth = (CurveAuthenticator(self._ctx, self._server_keys)
                      if self._server_keys is not None else None)
        self._bind_error: str | None = None
        self._threads: list[threading.Thread] = []
        ready = threading.Event()
        self._threads.append(threading.Thread(target=self._serve, args=(ready,),
                                              name="kv-endpoint", daemon=True))
        if kv_config.is_consumer:
            self._threads.append(threading.Thread(target=self._fetch_loop, name="kv-fetcher",
                                                  daemon=True))
        if kv_config.is_producer and kv_config.send_type == "PUT_ASYNC":
            self._threads.append(threading.Thread(target=self._send_loop, name="kv-sender",
                                                  daemon=True))
        for thread in self._threads:
            thread.start()
        if not ready.wait(10) or self._bind_error is not None:
            self.shutdown()
            raise ValueError(f"the KV endpoint cannot listen on {self.endpoint}: "
                             f"{self._bind_error or 'timed out'} (kv_ip/kv_port in "
                             f"--kv-transfer-config)")

    # ---- engine thread ------------------------------------------------------------------------
    def before_step(self, scheduler: Scheduler) -> None:
        """Apply what the background threads finished (released, expired and pushed leases;
        fetched KV); start fetches for requests that got their blocks; give up the transfers of
        requests aborted before their fetch started."""
        self.set_free_blocks(scheduler.block_manager.num_free_blocks)
        ended = []
        while not self._released.empty():  # ReleaseKV from D or the proxy
            ended.append(self._released.get())
        while not self._sent.empty():  # pushed (PUT_ASYNC)
            ended.append(self._sent.get())
        for lease_id in ended:
            with self._lock:
                lease = self.leases.release(lease_id)
            if lease is not None:
                scheduler.free_held_kv(lease.request_id)
        with self._lock:
            expired = self.leases.expire()
        self.stats.leases_expired += len(expired)
        for lease in expired:
            logger.warning("KV lease %s of request %s expired", lease.lease_id, lease.request_id)
            scheduler.free_held_kv(lease.request_id)
        while not self._fetched.empty():
            request_id, ok = self._fetched.get()
            self._fetching.discard(request_id)
            scheduler.remote_kv_ready(request_id, ok)
        aborted: list[Request] = []
        started = False
        for request_id, request in scheduler.waiting_for_kv.items():
            if request_id in self._fetching:
                continue
            if request.is_finished:  # aborted before its fetch started
                aborted.append(request)
                continue
            self._fetching.add(request_id)
            block_ids = scheduler.block_manager.block_ids(request_id)
            self._fetches.put(_Fetch(request_id, request.remote_kv,
                                     block_ids[:len(request.remote_kv.block_ids)]))
            started = True
        for request in aborted:
            self._give_up(request.remote_kv)
            scheduler.remote_kv_ready(request.request_id, ok=False)
        if started or aborted:
            self._received.notify()  # wake the fetcher for its new jobs

    def set_free_blocks(self, num_free_blocks: int) -> None:
        """The engine's free KV blocks now: a pushed transfer goes to the receive buffer only if
        they (less those of buffered transfers not taken yet) can hold it."""
        self._received.set_free_blocks(num_free_blocks)

    def after_step(self, scheduler: Scheduler, outputs: list[EngineCoreOutput]) -> None:
        """Lease (and push) the blocks of finished prefills; their final outputs carry the
        params. A request released after the step of its final output (another of its steps
        was still in flight) is lent without params reaching anyone: its lease expires."""
        self.set_free_blocks(scheduler.block_manager.num_free_blocks)
        if not scheduler.kv_held:
            return
        by_id = {out.request_id: out for out in outputs if out.finish_reason is not None}
        with self._lock:
            leased = self.leases.request_ids()
        nothing_to_lend, to_push = [], []
        for request_id, request in scheduler.kv_held.items():
            if request_id in leased:
                continue
            params = self._lend(request, scheduler.block_manager.block_ids(request_id))
            if request_id in by_id:
                by_id[request_id].kv_transfer_params = params
            if not params.block_ids:  # a prompt of at most one block: D computes it all
                nothing_to_lend.append(request_id)
            elif params.send_type != "GET":
                to_push.append((params.lease_id, request.remote_kv))
        for request_id in nothing_to_lend:
            scheduler.free_held_kv(request_id)
        if self.kv_config.send_type == "PUT_ASYNC":
            for job in to_push:
                self._sends.put(job)
        elif to_push:  # PUT: push now, then free
            try:
                pushed = self._push(self._push_sockets, to_push)
            except Exception:  # the leases stay (a pull, or expiry); the engine goes on
                logger.exception("pushing KV failed")
                pushed = []
            for lease_id in pushed:
                with self._lock:
                    lease = self.leases.release(lease_id)
                if lease is not None:
                    scheduler.free_held_kv(lease.request_id)

    def shutdown(self) -> None:
        self._stop.set()
        self._received.notify()
        self._fetches.put(None)
        self._sends.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        self._push_sockets.close()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    # ---- producer: lending and pushing (PUT from the engine thread, PUT_ASYNC from the sender)
    def _lend(self, request: Request, block_ids: list[int]) -> KVTransferParams:
        """Lease the whole prompt blocks of a finished prefill (with a push target: under the
        proxy's transfer id); the params for its decoder. `send_type` "GET" unless pushed."""
        bs = self.config.cache.block_size
        num_blocks = (request.num_prompt_tokens - 1) // bs
        block_ids = block_ids[:num_blocks]
        target = request.remote_kv if self.kv_config.send_type != "GET" else None
        lease_id, send_type = "", "GET"
        if block_ids:
            lease = self._grant(request.request_id, block_ids, num_blocks * bs,
                                target.lease_id if target is not None else None)
            lease_id = lease.lease_id
            if target is not None and lease_id == target.lease_id:
                send_type = self.kv_config.send_type
        return KVTransferParams(kv_endpoint=self.endpoint, block_ids=block_ids,
                                num_tokens=num_blocks * bs, compat_hash=self.compat_hash,
                                lease_id=lease_id, send_type=send_type)

    def _grant(self, request_id: str, block_ids: list[int], num_tokens: int,
               lease_id: str | None) -> Lease:
        with self._lock:
            try:
                return self.leases.grant(request_id, block_ids, num_tokens, lease_id)
            except ValueError:  # a transfer id used twice: lend it under an id of our own
                logger.warning("transfer id %r of request %s is already leased; lent under "
                               "another id (not pushed)", lease_id, request_id)
                return self.leases.grant(request_id, block_ids, num_tokens)

    def _read_blocks(self, block_ids: list[int]) -> list:
        """(global layer, K, V) of `block_ids` from every stage (RuntimeError if one failed)."""
        layers = []
        for stage in self.stages:
            layers.extend(stage.read_kv_blocks(block_ids))
        return layers

    def _send_layers(self, sock: zmq.Socket, prefix: list[bytes], lease_id: str,
                     num_tokens: int, layers: list) -> None:
        """Send `layers` ((global layer, K, V)) on `sock` as transfer `lease_id`, one message
        per layer, each after `prefix` (a ROUTER's peer identity, or nothing)."""
        m = self.config.model
        for layer, k, v in layers:
            header = KVLayerHeader(lease_id, self.compat_hash, layer, m.num_layers, num_tokens,
                                   self.config.dtype, list(k.shape))
            frames = encode_layer(header, k, v)
            sock.send_multipart([*prefix, *frames], copy=False)
            self.stats.sent_bytes += sum(memoryview(f).nbytes for f in frames)

    def _push(self, sockets: _PeerSockets, jobs: list[tuple[str, KVTransferParams]]
              ) -> list[str]:
        """Push leased transfers, each job (lease id, target: the decoder's `kv_endpoint`): offer
        them all, wait (PUSH_REPLY_TIMEOUT_S at most) for the answers, send the accepted ones.
        Returns the lease ids pushed (the caller ends those leases and frees their blocks).
        The others keep their leases for a pull: D said hold, did not answer (then, or lately),
        a stage read failed, or the lease is gone. `sockets`: the calling thread's own."""
        start = time.perf_counter()
        offered: dict[str, str] = {}  # lease id -> endpoint
        for lease_id, target in jobs:
            with self._lock:
                lease = self.leases.get(lease_id)
            if lease is None:  # released (by D or the proxy) or expired meanwhile
                continue
            if sockets.is_silent(target.kv_endpoint):
                self._held(lease_id, target.kv_endpoint, "no answer lately")
                continue
            num_blocks = len(lease.block_ids)
            sockets.get(target.kv_endpoint).send(msgspec.msgpack.encode(PushOffer(
                lease_id, self.compat_hash, num_blocks, num_blocks * self.block_bytes)))
            offered[lease_id] = target.kv_endpoint
        replies = self._await_replies(sockets, offered)
        pushed = []
        for lease_id, endpoint in offered.items():
            reply = replies.get(lease_id)
            if reply is None or not reply.accepted:
                self._held(lease_id, endpoint, "no answer" if reply is None else reply.reason)
                continue
            try:
                with self._lock:
                    lease = self.leases.get(lease_id)
                    layers = self._read_blocks(list(lease.block_ids)) if lease else None
            except RuntimeError:  # a stage died or timed out: D's reservation expires
                logger.exception("reading the KV of transfer %s failed", lease_id)
                continue
            if lease is None:
                continue
            sock = sockets.get(endpoint)
            self._send_layers(sock, [], lease_id, lease.num_tokens, layers)
            sock.send(msgspec.msgpack.encode(PushDone(lease_id, len(layers))))
            self.stats.sent_tokens += lease.num_tokens
            pushed.append(lease_id)
        self.stats.seconds += time.perf_counter() - start
        return pushed

    def _held(self, lease_id: str, endpoint: str, reason: str | None) -> None:
        self.stats.transfers_held += 1
        logger.info("transfer %s not pushed to %s (%s): leased for a pull", lease_id, endpoint,
                    reason)

    def _await_replies(self, sockets: _PeerSockets, offered: dict[str, str]
                       ) -> dict[str, PushReply]:
        """D's `PushReply` to each offer (lease id -> endpoint), within PUSH_REPLY_TIMEOUT_S;
        replies to earlier offers are skipped. A decoder that left offers unanswered is
        silenced (what is queued for it dropped)."""
        replies: dict[str, PushReply] = {}
        poller = zmq.Poller()
        for endpoint in set(offered.values()):
            poller.register(sockets.get(endpoint), zmq.POLLIN)
        deadline = time.monotonic() + PUSH_REPLY_TIMEOUT_S
        while len(replies) < len(offered) and not self._stop.is_set():
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            for sock, _ in poller.poll(min(remaining_ms, 100)):
                try:
                    reply = _control.decode(sock.recv())
                except (msgspec.DecodeError, msgspec.ValidationError):
                    self.stats.dropped_messages += 1
                    continue
                if isinstance(reply, PushReply) and reply.lease_id in offered:
                    replies[reply.lease_id] = reply
        for endpoint in {e for lease_id, e in offered.items() if lease_id not in replies}:
            sockets.silence(endpoint)
        return replies

    def _send_loop(self) -> None:
        """PUT_ASYNC: push leased transfers, all that are queued at once; once pushed, the
        engine thread ends their leases and frees the blocks (ending them here would let the
        engine lend the same request again). A push not accepted leaves the lease for a pull."""
        sockets = _PeerSockets(self._ctx, self._client_keys)
        try:
            while True:
                jobs = [self._sends.get()]
                while True:
                    try:
                        jobs.append(self._sends.get_nowait())
                    except queue.Empty:
                        break
                if None in jobs:
                    return
                try:
                    for lease_id in self._push(sockets, jobs):
                        self._sent.put(lease_id)
                except Exception:
                    logger.exception("pushing the KV of transfers %s failed",
                                     [lease_id for lease_id, _ in jobs])
        finally:
            sockets.close()

    # ---- the KV endpoint thread (both sides) --------------------------------------------------
    def _serve(self, ready: threading.Event) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        secure_server(sock, self._server_keys)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            self._bind_error = str(exc)
            sock.close()
            return
        finally:
            ready.set()
        last_sweep = time.monotonic()
        try:
            while not self._stop.is_set():
                if time.monotonic() - last_sweep >= SWEEP_INTERVAL_S:
                    self._received.expire()  # buffered KV whose request never came
                    last_sweep = time.monotonic()
                if not sock.poll(100):
                    continue
                frames = sock.recv_multipart(copy=False)
                if len(frames) == 4:  # a pushed layer: identity, header, K, V
                    self._receive_layer(frames[1:])
                    continue
                if len(frames) != 2:
                    self._drop_message(f"a KV control message of {len(frames)} frames")
                    continue
                identity, payload = frames[0].bytes, frames[1].bytes
                try:
                    message = _control.decode(payload)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    self._drop_message(f"a bad KV control message: {exc}")
                    continue
                self._handle_control(sock, identity, message)
        finally:
            sock.close()

    def _handle_control(self, sock: zmq.Socket, identity: bytes, message: KVControl) -> None:
        if isinstance(message, ReleaseKV):  # from any authenticated peer (D, the proxy)
            if self.kv_config.is_producer:
                self._released.put(message.lease_id)  # the engine thread ends it
            if self.kv_config.is_consumer:
                self._received.drop(message.lease_id)
        elif isinstance(message, PullKV):
            self._send_lease(sock, identity, message)
        elif isinstance(message, PushOffer):
            reply = self._answer_offer(message)
            sock.send_multipart([identity, msgspec.msgpack.encode(reply)])
        elif isinstance(message, PushDone):
            if not self._received.done(message.lease_id):
                self._drop_message(f"PushDone of {message.lease_id!r}, no such push arriving")
        else:
            self._drop_message(f"an unexpected {type(message).__name__}")

    def _drop_message(self, what: str) -> None:
        self.stats.dropped_messages += 1
        self._bad_frames.warning("dropped %s", what)

    # ---- consumer: pushes arriving at the endpoint --------------------------------------------
    def _answer_offer(self, offer: PushOffer) -> PushReply:
        """Reserve room for a push (buffer, else overflow), or say hold, or refuse it."""
        reason = None
        if not self.kv_config.is_consumer:
            reason = f"this instance is a {self.kv_config.kv_role}, it takes no KV"
        elif offer.compat_hash != self.compat_hash:
            reason = f"KV layout hash {offer.compat_hash} differs from {self.compat_hash}"
        elif offer.num_bytes != offer.num_blocks * self.block_bytes:
            reason = (f"{offer.num_bytes} bytes offered for {offer.num_blocks} blocks of "
                      f"{self.block_bytes} bytes")
        if reason is not None:
            self._drop_message(f"a push offer of {offer.lease_id!r}: {reason}")
            if self.kv_config.is_consumer:
                self._received.refuse(offer.lease_id)
            return PushReply(offer.lease_id, False, reason)
        accepted, reason = self._received.offer(offer.lease_id, offer.num_blocks,
                                                offer.num_bytes)
        if not accepted:
            logger.info("push of %s not accepted: %s", offer.lease_id, reason)
        return PushReply(offer.lease_id, accepted, reason)

    def _receive_layer(self, frames: list) -> None:
        """Keep a pushed layer for its accepted transfer; drop it (counted) otherwise."""
        try:
            layer = decode_layer(frames)
        except KVFrameError as exc:
            self._drop_message(f"a pushed KV message: {exc}")
            return
        header = layer.header
        if header.compat_hash != self.compat_hash:
            error = f"KV layout hash {header.compat_hash}, ours is {self.compat_hash}"
        else:
            error = self._received.add_layer(layer)
        if error is not None:
            self._drop_message(f"a pushed KV layer of {header.lease_id!r}: {error}")
            return
        self.stats.received_bytes += 2 * layer.k.numel() * layer.k.element_size()

    # ---- producer: serving a pull -------------------------------------------------------------
    def _send_lease(self, sock: zmq.Socket, identity: bytes, pull: PullKV) -> None:
        start = time.perf_counter()
        with self._lock:
            lease = self.leases.get(pull.lease_id)
            error = None
            if lease is None:
                error = f"unknown KV lease {pull.lease_id!r}"
            elif pull.compat_hash != self.compat_hash:
                error = f"KV layout hash {pull.compat_hash} differs from {self.compat_hash}"
            layers = []
            if error is None:
                try:  # a stage that died or timed out must not end the endpoint thread
                    layers = self._read_blocks(list(lease.block_ids))
                except RuntimeError as exc:
                    error = f"reading the KV of lease {pull.lease_id!r} failed: {exc}"
        if error is not None:
            self._drop_message(f"a KV pull: {error}")
            sock.send_multipart([identity, msgspec.msgpack.encode(PullDone(error))])
            return
        self._send_layers(sock, [identity], lease.lease_id, lease.num_tokens, layers)
        sock.send_multipart([identity, msgspec.msgpack.encode(PullDone())])
        self.stats.sent_tokens += lease.num_tokens
        self.stats.seconds += time.perf_counter() - start

    # ---- consumer: the fetcher thread ---------------------------------------------------------
    def _give_up(self, params: KVTransferParams) -> None:
        """The request of `params` no longer wants its KV: drop what D buffered for it and,
        unless D had it all (P already freed it), tell P to end its lease."""
        if self._received.drop(params.lease_id) is not TransferState.COMPLETE:
            self._fetches.put(_Release(params.kv_endpoint, params.lease_id))

    def _fetch_loop(self) -> None:
        """Run the fetch jobs, several at once: a GET pull at once; a pushed transfer once it
        is complete, or pulled when it was held, refused or dropped, or did not arrive within
        `fetch_timeout_s`. Tell producers about transfers given up."""
        awaiting: dict[str, tuple[_Fetch, float]] = {}  # request id -> (job, deadline)
        sockets = _PeerSockets(self._ctx, self._client_keys)  # for ReleaseKV
        try:
            while not self._stop.is_set():
                version = self._received.version
                for job in self._take_jobs(block=not awaiting):
                    if job is None:
                        return
                    if isinstance(job, _Release):
                        self._send_release(sockets, job.endpoint, job.lease_id)
                    else:
                        awaiting[job.request_id] = (job, time.monotonic() + self.fetch_timeout_s)
                for request_id, (job, deadline) in list(awaiting.items()):
                    ok = self._advance(job, deadline)
                    if ok is not None:
                        del awaiting[request_id]
                        self._fetched.put((request_id, ok))
                if awaiting:  # until a transfer completes, is held or dropped, or a new job
                    self._received.wait(version, timeout=0.1)
        finally:
            sockets.close()

    def _take_jobs(self, block: bool) -> list[_Fetch | _Release | None]:
        jobs = [self._fetches.get()] if block else []
        while True:
            try:
                jobs.append(self._fetches.get_nowait())
            except queue.Empty:
                return jobs

    def _advance(self, job: _Fetch, deadline: float) -> bool | None:
        """Move one fetch on: True/False once it is over (every layer written, or not), None
        while its pushed KV may still come."""
        try:
            if job.params.compat_hash != self.compat_hash:
                logger.warning("KV params with layout hash %s, ours is %s: not fetched",
                               job.params.compat_hash, self.compat_hash)
                return False
            if job.params.send_type == "GET":
                return self._pull(job)
            return self._take_pushed(job, deadline)
        except Exception:
            logger.exception("fetching the KV of request %s failed", job.request_id)
            return False

    def _take_pushed(self, job: _Fetch, deadline: float) -> bool | None:
        """A pushed transfer: written into the request's blocks once complete (True if every
        layer was); pulled if it was held, refused or dropped, or at `deadline`; None: wait."""
        lease_id = job.params.lease_id
        state = self._received.state(lease_id)
        if state is TransferState.COMPLETE:
            layers = self._received.take(lease_id)
            if layers is not None:
                return self._write_layers(job, layers)
        if self._stop.is_set():
            return False
        if state in (TransferState.HELD, TransferState.GONE) or time.monotonic() >= deadline:
            if state in (TransferState.UNKNOWN, TransferState.ARRIVING):
                logger.warning("pushed KV of %s did not arrive in %.1f s; pulling it", lease_id,
                               self.fetch_timeout_s)
            self._received.drop(lease_id)  # late layers are dropped
            return self._pull(job)
        return None

    def _write_layers(self, job: _Fetch, layers: list[KVLayer]) -> bool:
        """Write a taken transfer into the request's blocks; True if every layer was."""
        start = time.perf_counter()
        block_ids = job.block_ids
        written = set()
        for stage in self.stages:  # one call per stage (one remote call for a Ray stage)
            mine = [(la.header.layer, la.k, la.v) for la in layers
                    if la.header.shape[0] == len(block_ids) and stage.holds_layer(la.header.layer)]
            if mine:
                stage.write_kv_layers(block_ids, mine)
                written.update(layer for layer, _, _ in mine)
        ok = written == set(range(self.config.model.num_layers))
        if ok:
            self.stats.received_tokens += job.params.num_tokens
        self.stats.seconds += time.perf_counter() - start
        return ok

    def _pull(self, job: _Fetch) -> bool:
        """GET: pull one lease's KV from its producer into the request's blocks; True once every
        layer was written. The producer is then told to end the lease (also after a failure)."""
        params, block_ids = job.params, job.block_ids
        start = time.perf_counter()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        secure_client(sock, self._client_keys)
        sock.connect(params.kv_endpoint)
        try:
            sock.send(msgspec.msgpack.encode(PullKV(params.lease_id, self.compat_hash)))
            deadline = time.monotonic() + self.fetch_timeout_s
            written: set[int] = set()
            while True:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0 or self._stop.is_set():
                    logger.warning("KV of lease %s did not arrive in %.1f s", params.lease_id,
                                   self.fetch_timeout_s)
                    return False
                if not sock.poll(min(remaining_ms, 100)):
                    continue
                frames = sock.recv_multipart(copy=False)
                if len(frames) == 1:
                    try:
                        done = _control.decode(frames[0].bytes)
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        self._drop_message(f"a bad answer to a KV pull: {exc}")
                        return False
                    if not isinstance(done, PullDone) or done.error is not None:
                        logger.warning("KV pull refused: %s", getattr(done, "error", done))
                        return False
                    break
                try:
                    layer = decode_layer(frames)
                except KVFrameError as exc:
                    self._drop_message(f"a pulled KV message: {exc}")
                    continue
                header = layer.header
                if (header.lease_id != params.lease_id or header.compat_hash != self.compat_hash
                        or header.shape[0] != len(block_ids)):
                    self._drop_message(f"a pulled KV layer of lease {header.lease_id} (hash "
                                       f"{header.compat_hash}, {header.shape[0]} blocks)")
                    continue
                for stage in self.stages:
                    if stage.holds_layer(header.layer):
                        stage.write_kv_blocks(block_ids, header.layer, layer.k, layer.v)
                        written.add(header.layer)
                self.stats.received_bytes += sum(f.buffer.nbytes for f in frames)
            ok = written == set(range(self.config.model.num_layers))
            if ok:
                self.stats.received_tokens += params.num_tokens
            self.stats.seconds += time.perf_counter() - start
            return ok
        finally:
            sock.send(msgspec.msgpack.encode(ReleaseKV(params.lease_id)))
            sock.close()

    def _send_release(self, sockets: _PeerSockets, endpoint: str, lease_id: str) -> None:
        sockets.get(endpoint).send(msgspec.msgpack.encode(ReleaseKV(lease_id)))
