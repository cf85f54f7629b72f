"""The engine side of KV transfer: a prefill instance lends its finished prompts' KV blocks, a
decode instance fetches them into its own blocks. Send type GET: the decoder pulls.

The engine thread calls only `before_step` and `after_step`; each socket lives in one background
thread of its own (the producer's KV endpoint, the consumer's fetcher), so the engine loop never
waits on a transfer. The two sides meet in thread-safe queues and one lock (around the lease
table and the reads of leased blocks, so an expiring lease never frees blocks being read).

Wire (msgspec, never pickle), on a DEALER -> ROUTER socket pair:

    D -> P   [PullKV]                 P -> D   [KVLayerHeader, K, V] per layer, or [PullDone]
    D -> P   [ConfirmKV]              (P frees the lease's blocks)
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import msgspec
import zmq

from engine_core.config import EngineConfig
from engine_core.disagg.compat import kv_compat_fields, kv_compat_hash
from engine_core.disagg.config import KVTransferConfig
from engine_core.disagg.leases import LeaseTable
from engine_core.disagg.transfer_params import KVTransferParams
from engine_core.messages import EngineCoreOutput
from engine_core.scheduler import Scheduler
from executors.kv_endpoint import KVFrameError, KVLayerHeader, decode_layer, encode_layer
from executors.stage_worker import StageWorker

__all__ = ["ConfirmKV", "KVConnector", "KVTransferStats", "PullDone", "PullKV"]

logger = logging.getLogger(__name__)


class PullKV(msgspec.Struct, tag=True):
    lease_id: str
    compat_hash: str


class ConfirmKV(msgspec.Struct, tag=True):
    lease_id: str


class PullDone(msgspec.Struct, tag=True):
    error: str | None = None


_control = msgspec.msgpack.Decoder(PullKV | ConfirmKV | PullDone)


class KVTransferStats(msgspec.Struct):
    sent_tokens: int = 0
    received_tokens: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    seconds: float = 0.0  # spent moving KV, both directions
    dropped_messages: int = 0


class KVConnector:
    """Owned by one `EngineCore`; `stages` are its in-process stage workers.

    Producer side: a finished `do_remote_decode` request's whole prompt blocks are leased
    (`lease_ttl_s`) and its final output carries `KVTransferParams`. Consumer side: a request with
    `kv_transfer_params` waits out of scheduling until its KV is fetched (or the fetch failed after
    `fetch_timeout_s`; then it computes the prompt itself)."""

    def __init__(self, config: EngineConfig, kv_config: KVTransferConfig,
                 stages: list[StageWorker], host: str = "127.0.0.1", lease_ttl_s: float = 30.0,
                 fetch_timeout_s: float = 10.0) -> None:
        self.config = config
        self.kv_config = kv_config
        self.stages = stages
        self.compat_fields = kv_compat_fields(config)
        self.compat_hash = kv_compat_hash(self.compat_fields)
        self.endpoint = f"tcp://{host}:{kv_config.kv_port}"
        self.lease_ttl_s = lease_ttl_s
        self.fetch_timeout_s = fetch_timeout_s
        self.stats = KVTransferStats()
        self.leases = LeaseTable(lease_ttl_s)
        self._lock = threading.Lock()  # the lease table and reads of leased blocks
        self._released: queue.SimpleQueue[str] = queue.SimpleQueue()  # lease ids D confirmed
        self._fetches: queue.SimpleQueue[tuple[str, KVTransferParams, list[int]] | None] = \
            queue.SimpleQueue()
        self._fetched: queue.SimpleQueue[tuple[str, bool]] = queue.SimpleQueue()
        self._fetching: set[str] = set()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._threads: list[threading.Thread] = []
        ready = threading.Event()
        if kv_config.is_producer:
            self._threads.append(threading.Thread(target=self._serve, args=(ready,),
                                                  name="kv-endpoint", daemon=True))
        if kv_config.is_consumer:
            self._threads.append(threading.Thread(target=self._fetch_loop, name="kv-fetcher",
                                                  daemon=True))
        for thread in self._threads:
            thread.start()
        if kv_config.is_producer and not ready.wait(10):
            raise RuntimeError(f"the KV endpoint did not start on {self.endpoint}")

    # ---- engine thread ------------------------------------------------------------------------
    def before_step(self, scheduler: Scheduler) -> None:
        """Apply what the background threads finished; start fetches for new waiters."""
        while not self._released.empty():
            lease_id = self._released.get()
            with self._lock:
                lease = self.leases.release(lease_id)
            if lease is not None:
                scheduler.free_held_kv(lease.request_id)
        with self._lock:
            expired = self.leases.expire()
        for lease in expired:
            logger.warning("KV lease %s of request %s expired", lease.lease_id, lease.request_id)
            scheduler.free_held_kv(lease.request_id)
        while not self._fetched.empty():
            request_id, ok = self._fetched.get()
            self._fetching.discard(request_id)
            scheduler.remote_kv_ready(request_id, ok)
        for request_id, request in scheduler.waiting_for_kv.items():
            if request_id not in self._fetching:
                self._fetching.add(request_id)
                block_ids = scheduler.block_manager.block_ids(request_id)
                self._fetches.put((request_id, request.remote_kv, block_ids))

    def after_step(self, scheduler: Scheduler, outputs: list[EngineCoreOutput]) -> None:
        """Lease the blocks of finished prefills; their final outputs carry the params."""
        if not scheduler.kv_held:
            return
        by_id = {out.request_id: out for out in outputs if out.finish_reason is not None}
        bs = self.config.cache.block_size
        with self._lock:
            leased = self.leases.request_ids()
        nothing_to_lend = []
        for request_id, request in scheduler.kv_held.items():
            if request_id in leased:
                continue
            num_blocks = (request.num_prompt_tokens - 1) // bs
            block_ids = scheduler.block_manager.block_ids(request_id)[:num_blocks]
            lease_id = ""
            if block_ids:
                with self._lock:
                    lease_id = self.leases.grant(request_id, block_ids, num_blocks * bs).lease_id
            else:  # a prompt of at most one block: D computes it all
                nothing_to_lend.append(request_id)
            if request_id in by_id:
                by_id[request_id].kv_transfer_params = KVTransferParams(
                    kv_endpoint=self.endpoint, block_ids=block_ids, num_tokens=num_blocks * bs,
                    compat_hash=self.compat_hash, lease_id=lease_id,
                    send_type=self.kv_config.send_type)
        for request_id in nothing_to_lend:
            scheduler.free_held_kv(request_id)

    def shutdown(self) -> None:
        self._stop.set()
        self._fetches.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        self._ctx.term()

    # ---- producer: the KV endpoint thread -----------------------------------------------------
    def _serve(self, ready: threading.Event) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                frames = sock.recv_multipart()
                if len(frames) != 2:
                    self.stats.dropped_messages += 1
                    logger.warning("dropped a KV control message of %d frames", len(frames))
                    continue
                identity, payload = frames
                try:
                    message = _control.decode(payload)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    self.stats.dropped_messages += 1
                    logger.warning("dropped a bad KV control message: %s", exc)
                    continue
                if isinstance(message, ConfirmKV):
                    self._released.put(message.lease_id)
                elif isinstance(message, PullKV):
                    self._send_lease(sock, identity, message)
        finally:
            sock.close()

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
                for stage in self.stages:
                    layers.extend(stage.read_kv_blocks(list(lease.block_ids)))
        if error is not None:
            self.stats.dropped_messages += 1
            logger.warning("refused a KV pull: %s", error)
            sock.send_multipart([identity, msgspec.msgpack.encode(PullDone(error))])
            return
        m = self.config.model
        for layer, k, v in layers:
            header = KVLayerHeader(lease.lease_id, self.compat_hash, layer, m.num_layers,
                                   lease.num_tokens, self.config.dtype, list(k.shape))
            frames = encode_layer(header, k, v)
            sock.send_multipart([identity, *frames], copy=False)
            self.stats.sent_bytes += sum(memoryview(f).nbytes for f in frames)
        sock.send_multipart([identity, msgspec.msgpack.encode(PullDone())])
        self.stats.sent_tokens += lease.num_tokens
        self.stats.seconds += time.perf_counter() - start

    # ---- consumer: the fetcher thread ---------------------------------------------------------
    def _fetch_loop(self) -> None:
        while True:
            job = self._fetches.get()
            if job is None:
                return
            request_id, params, block_ids = job
            ok = False
            try:
                ok = self._fetch(params, block_ids[:len(params.block_ids)])
            except Exception:
                logger.exception("fetching the KV of request %s failed", request_id)
            self._fetched.put((request_id, ok))

    def _fetch(self, params: KVTransferParams, block_ids: list[int]) -> bool:
        """Pull one lease's KV into `block_ids`; True once every layer was written."""
        if params.compat_hash != self.compat_hash:
            logger.warning("KV params with layout hash %s, ours is %s: not fetched",
                           params.compat_hash, self.compat_hash)
            return False
        start = time.perf_counter()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(params.kv_endpoint)
        try:
            sock.send(msgspec.msgpack.encode(PullKV(params.lease_id, self.compat_hash)))
            deadline = time.monotonic() + self.fetch_timeout_s
            written: set[int] = set()
            while True:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0 or not sock.poll(remaining_ms):
                    logger.warning("KV of lease %s did not arrive in %.1f s", params.lease_id,
                                   self.fetch_timeout_s)
                    return False
                frames = sock.recv_multipart(copy=False)
                if len(frames) == 1:
                    done = _control.decode(frames[0].bytes)
                    if not isinstance(done, PullDone) or done.error is not None:
                        logger.warning("KV pull refused: %s", getattr(done, "error", done))
                        return False
                    break
                try:
                    layer = decode_layer(frames)
                except KVFrameError as exc:
                    self.stats.dropped_messages += 1
                    logger.warning("dropped a KV message: %s", exc)
                    continue
                header = layer.header
                if (header.lease_id != params.lease_id or header.compat_hash != self.compat_hash
                        or header.shape[0] != len(block_ids)):
                    self.stats.dropped_messages += 1
                    logger.warning("dropped a KV layer of lease %s (hash %s, %d blocks)",
                                   header.lease_id, header.compat_hash, header.shape[0])
                    continue
                for stage in self.stages:
                    if stage.holds_layer(header.layer):
                        stage.write_kv_blocks(block_ids, header.layer, layer.k, layer.v)
                        written.add(header.layer)
                self.stats.received_bytes += sum(f.buffer.nbytes for f in frames)
            ok = written == set(range(self.config.model.num_layers))
            sock.send(msgspec.msgpack.encode(ConfirmKV(params.lease_id)))
            if ok:
                self.stats.received_tokens += params.num_tokens
            self.stats.seconds += time.perf_counter() - start
            return ok
        finally:
            sock.close()
