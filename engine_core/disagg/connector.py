"""The engine side of KV transfer: a prefill instance lends its finished prompts' KV blocks, a
decode instance fetches them into its own blocks. Send type GET: the decoder pulls from the
producer's endpoint; PUT: the producer pushes to the decoder's endpoint right after the prefill
(from the engine thread); PUT_ASYNC: the same from a background sender thread. Pushed KV waits in
the decoder's buffer (at most `kv_buffer_size` bytes) until its request arrives.

The engine thread calls only `before_step` and `after_step`; each socket lives in one background
thread of its own (the producer's KV endpoint, the consumer's fetcher), so the engine loop never
waits on a transfer. The two sides meet in thread-safe queues and one lock (around the lease
table and the reads of leased blocks, so an expiring lease never frees blocks being read).

Wire (msgspec, never pickle), on a DEALER -> ROUTER socket pair:

    D -> P   [PullKV]                 P -> D   [KVLayerHeader, K, V] per layer, or [PullDone]
    D -> P   [ConfirmKV]              (P frees the lease's blocks)
    P -> D   [KVLayerHeader, K, V] per layer, then [PushDone]          (PUT, PUT_ASYNC)
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
from engine_core.executor import KVStage
from engine_core.messages import EngineCoreOutput
from engine_core.scheduler import Scheduler
from engine_core.transport import (
    CurveAuthenticator,
    load_client_keys,
    load_server_keys,
    secure_client,
    secure_server,
)
from executors.kv_endpoint import (
    KVFrameError,
    KVLayer,
    KVLayerHeader,
    decode_layer,
    encode_layer,
)

__all__ = ["ConfirmKV", "KVConnector", "KVTransferStats", "PullDone", "PullKV"]

logger = logging.getLogger(__name__)


class PullKV(msgspec.Struct, tag=True):
    lease_id: str
    compat_hash: str


class ConfirmKV(msgspec.Struct, tag=True):
    lease_id: str


class PullDone(msgspec.Struct, tag=True):
    error: str | None = None


class PushDone(msgspec.Struct, tag=True):
    lease_id: str
    num_layers: int


_control = msgspec.msgpack.Decoder(PullKV | ConfirmKV | PullDone | PushDone)


class KVTransferStats(msgspec.Struct):
    sent_tokens: int = 0
    received_tokens: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    seconds: float = 0.0  # spent moving KV, both directions
    dropped_messages: int = 0


class KVConnector:
    """Owned by one `EngineCore`; `stages` are its executor's `kv_stages()` (in-process stage
    workers, or adapters of Ray stage actors): the connector reads and writes KV only through
    them, by global layer index, so P and D may split the model differently.

    Producer side: a finished `do_remote_decode` request's whole prompt blocks are leased
    (`lease_ttl_s`) and its final output carries `KVTransferParams`. Consumer side: a request with
    `kv_transfer_params` waits out of scheduling until its KV is fetched (or the fetch failed after
    `fetch_timeout_s`; then it computes the prompt itself)."""

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
        self.stats = KVTransferStats()
        self.leases = LeaseTable(lease_ttl_s)
        self._lock = threading.Lock()  # the lease table and reads of leased blocks
        self._released: queue.SimpleQueue[str] = queue.SimpleQueue()  # lease ids D confirmed
        self._fetches: queue.SimpleQueue[tuple[str, KVTransferParams, list[int]] | None] = \
            queue.SimpleQueue()
        self._fetched: queue.SimpleQueue[tuple[str, bool]] = queue.SimpleQueue()
        self._fetching: set[str] = set()
        # pushed KV (PUT, PUT_ASYNC) waiting for its request: lease id -> layers; done ones
        self._buffer_cond = threading.Condition()
        self._buffer: dict[str, list[KVLayer]] = {}
        self._buffer_done: set[str] = set()
        self._buffer_bytes = 0
        self._buffer_since: dict[str, float] = {}  # first arrival; unclaimed ones expire
        self._sends: queue.SimpleQueue[tuple[str, KVTransferParams, str, int] | None] = \
            queue.SimpleQueue()  # PUT_ASYNC jobs for the sender thread
        self._sent: queue.SimpleQueue[str] = queue.SimpleQueue()  # their lease ids, once sent
        self._push_sockets: dict[str, zmq.Socket] = {}  # the engine thread's (PUT)
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        # CurveZMQ: the endpoint is a CURVE server, every socket to a peer a CURVE client
        self._server_keys = load_server_keys(zmq_keys) if zmq_keys is not None else None
        self._client_keys = load_client_keys(zmq_keys) if zmq_keys is not None else None
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
        while not self._sent.empty():
            with self._lock:
                lease = self.leases.release(self._sent.get())
            if lease is not None:
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
        """Lease (or push) the blocks of finished prefills; their final outputs carry the
        params. A request released after the step of its final output (another of its steps
        was still in flight) is lent without params reaching anyone: its lease expires."""
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
            target = request.remote_kv  # with PUT/PUT_ASYNC: the decoder to push to
            if target is not None and self.kv_config.send_type != "GET":
                if request_id in by_id:
                    by_id[request_id].kv_transfer_params = KVTransferParams(
                        kv_endpoint=self.endpoint, block_ids=block_ids,
                        num_tokens=num_blocks * bs, compat_hash=self.compat_hash,
                        lease_id=target.lease_id, send_type=self.kv_config.send_type)
                if not block_ids:  # a prompt of at most one block: D computes it all
                    nothing_to_lend.append(request_id)
                elif self.kv_config.send_type == "PUT":  # push now, then free
                    self._push(self._push_sockets, target, self._read_blocks(block_ids),
                               num_blocks * bs)
                    nothing_to_lend.append(request_id)
                else:  # PUT_ASYNC: leased until the sender thread has pushed it
                    with self._lock:
                        lease = self.leases.grant(request_id, block_ids, num_blocks * bs)
                    self._sends.put((request_id, target, lease.lease_id, num_blocks * bs))
                continue
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
        with self._buffer_cond:
            self._buffer_cond.notify_all()
        self._fetches.put(None)
        self._sends.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        for sock in self._push_sockets.values():
            sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    # ---- producer: pushing (PUT from the engine thread, PUT_ASYNC from the sender) ------------
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

    def _push(self, sockets: dict[str, zmq.Socket], target: KVTransferParams, layers: list,
              num_tokens: int) -> None:
        """Send `layers` ((global layer, K, V) of the request's blocks) to `target.kv_endpoint`
        as `target.lease_id`. `sockets`: the calling thread's own DEALER sockets, by endpoint."""
        start = time.perf_counter()
        sock = sockets.get(target.kv_endpoint)
        if sock is None:
            sock = sockets[target.kv_endpoint] = self._ctx.socket(zmq.DEALER)
            secure_client(sock, self._client_keys)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(target.kv_endpoint)
        self._send_layers(sock, [], target.lease_id, num_tokens, layers)
        sock.send(msgspec.msgpack.encode(PushDone(target.lease_id, len(layers))))
        self.stats.sent_tokens += num_tokens
        self.stats.seconds += time.perf_counter() - start

    def _send_loop(self) -> None:
        """PUT_ASYNC: copy a leased request's blocks (under the lock, so an expiring lease never
        frees blocks being read) and push them; the engine thread then ends the lease and frees
        the blocks (ending it here would let the engine lend the same request again)."""
        sockets: dict[str, zmq.Socket] = {}
        try:
            while True:
                job = self._sends.get()
                if job is None:
                    return
                request_id, target, lease_id, num_tokens = job
                try:
                    with self._lock:
                        lease = self.leases.get(lease_id)
                        layers = self._read_blocks(list(lease.block_ids)) if lease else None
                    if layers is not None:
                        self._push(sockets, target, layers, num_tokens)
                except Exception:
                    logger.exception("pushing the KV of request %s failed", request_id)
                self._sent.put(lease_id)  # the engine thread ends the lease and frees
        finally:
            for sock in sockets.values():
                sock.close(linger=0)

    # ---- producer: the KV endpoint thread -----------------------------------------------------
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
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                frames = sock.recv_multipart(copy=False)
                if len(frames) == 4:  # a pushed layer: identity, header, K, V
                    self._buffer_layer(frames[1:])
                    continue
                frames = [f.bytes for f in frames]
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
                elif isinstance(message, PushDone):
                    with self._buffer_cond:
                        self._buffer_done.add(message.lease_id)
                        self._buffer_cond.notify_all()
                elif isinstance(message, PullKV):
                    self._send_lease(sock, identity, message)
        finally:
            sock.close()

    def _buffer_layer(self, frames: list) -> None:
        """Keep a pushed layer until its request comes; drop it if malformed, of another KV
        layout, or over `kv_buffer_size`."""
        try:
            layer = decode_layer(frames)
        except KVFrameError as exc:
            self.stats.dropped_messages += 1
            logger.warning("dropped a pushed KV message: %s", exc)
            return
        nbytes = 2 * layer.k.numel() * layer.k.element_size()
        with self._buffer_cond:
            self._expire_buffer()
            error = None
            if layer.header.compat_hash != self.compat_hash:
                error = f"KV layout hash {layer.header.compat_hash}, ours is {self.compat_hash}"
            elif self._buffer_bytes + nbytes > self.kv_config.kv_buffer_size:
                error = f"the KV buffer is full ({self._buffer_bytes} bytes)"
            if error is None:
                self._buffer_since.setdefault(layer.header.lease_id, time.monotonic())
                self._buffer.setdefault(layer.header.lease_id, []).append(layer)
                self._buffer_bytes += nbytes
                self.stats.received_bytes += nbytes
        if error is not None:
            self.stats.dropped_messages += 1
            logger.warning("dropped a pushed KV layer of %s: %s", layer.header.lease_id, error)

    def _expire_buffer(self) -> None:
        """Drop pushed KV whose request has not come within the lease TTL (holds the cond)."""
        cutoff = time.monotonic() - self.lease_ttl_s
        for lease_id in [k for k, since in self._buffer_since.items() if since < cutoff]:
            logger.warning("dropped pushed KV of %s: its request never came", lease_id)
            self._pop_buffer(lease_id)

    def _pop_buffer(self, lease_id: str) -> list[KVLayer]:
        layers = self._buffer.pop(lease_id, [])
        self._buffer_since.pop(lease_id, None)
        self._buffer_done.discard(lease_id)
        self._buffer_bytes -= sum(2 * la.k.numel() * la.k.element_size() for la in layers)
        return layers

    def _take_pushed(self, params: KVTransferParams, block_ids: list[int]) -> bool:
        """Wait (bounded) for a pushed transfer to complete, then write it into `block_ids`."""
        start = time.perf_counter()
        with self._buffer_cond:
            arrived = self._buffer_cond.wait_for(
                lambda: params.lease_id in self._buffer_done or self._stop.is_set(),
                timeout=self.fetch_timeout_s) and params.lease_id in self._buffer_done
            layers = self._pop_buffer(params.lease_id)
        if not arrived:
            logger.warning("pushed KV of %s did not arrive in %.1f s", params.lease_id,
                           self.fetch_timeout_s)
            return False
        written = set()
        for stage in self.stages:  # one call per stage (one remote call for a Ray stage)
            mine = [(la.header.layer, la.k, la.v) for la in layers
                    if la.header.shape[0] == len(block_ids) and stage.holds_layer(la.header.layer)]
            if mine:
                stage.write_kv_layers(block_ids, mine)
                written.update(layer for layer, _, _ in mine)
        ok = written == set(range(self.config.model.num_layers))
        if ok:
            self.stats.received_tokens += params.num_tokens
        self.stats.seconds += time.perf_counter() - start
        return ok

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
            self.stats.dropped_messages += 1
            logger.warning("refused a KV pull: %s", error)
            sock.send_multipart([identity, msgspec.msgpack.encode(PullDone(error))])
            return
        self._send_layers(sock, [identity], lease.lease_id, lease.num_tokens, layers)
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
        if params.send_type != "GET":
            return self._take_pushed(params, block_ids)
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
