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
socket lives in one thread: the KV endpoint (`kv_server.py`: P serves pulls, D receives pushes,
both take `ReleaseKV`), D's fetcher (`kv_fetcher.py`), P's PUT_ASYNC sender (`kv_pusher.py`).
They meet in thread-safe queues, the receive buffer, and `local_kv.LocalKV` (this instance's
blocks, layout and leases, under one lock). Every wait is bounded.

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

import msgspec
import zmq

from engine_core.config import EngineConfig
from engine_core.executor import KVStage
from engine_core.kv_connector import KVConnectorBase, KVTransferView
from engine_core.kv_transfer.kv_fetcher import FetchJob, KVFetcher, ReleaseJob
from engine_core.kv_transfer.kv_pusher import KVPusher, PushJob
from engine_core.kv_transfer.kv_server import KVServer
from engine_core.kv_transfer.local_kv import LocalKV
from engine_core.kv_transfer.receive_buffer import ReceiveBuffer, TransferState
from engine_core.kv_transfer.transfer_stats import DroppedMessages
from engine_core.kv_transfer_config import KVTransferConfig
from engine_core.messages import EngineCoreOutput, KVTransferStats
from engine_core.request import Request
from engine_core.transfer_params import KVTransferParams
from engine_core.transport import CurveAuthenticator, load_client_keys, load_server_keys

__all__ = ["KVConnector"]

logger = logging.getLogger(__name__)


class KVConnector(KVConnectorBase):
    """Owned by one `EngineCore`; `stages` are its executor's `kv_stages()` (in-process stage
    workers, or adapters of Ray stage actors).

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
        self.local = LocalKV(config, stages, lease_ttl_s)
        self.compat_hash = self.local.compat_hash
        self.leases = self.local.leases
        self.endpoint = f"tcp://{host}:{kv_config.kv_port}"
        self.counters = KVTransferStats()
        drop = DroppedMessages(self.counters, logger)
        self._stop = threading.Event()
        self._released: queue.SimpleQueue[str] = queue.SimpleQueue()  # lease ids to end
        self._fetches: queue.SimpleQueue[FetchJob | ReleaseJob | None] = queue.SimpleQueue()
        self._fetched: queue.SimpleQueue[tuple[str, bool]] = queue.SimpleQueue()
        self._fetching: set[str] = set()
        self._received = ReceiveBuffer(kv_config.kv_buffer_size, kv_config.kv_overflow_size,
                                       lease_ttl_s, self.counters)
        self._sends: queue.SimpleQueue[PushJob | None] = queue.SimpleQueue()  # PUT_ASYNC jobs
        self._sent: queue.SimpleQueue[str] = queue.SimpleQueue()  # their lease ids, once pushed
        self._ctx = zmq.Context()
        # CurveZMQ: the endpoint is a CURVE server, every socket to a peer a CURVE client
        server_keys = load_server_keys(zmq_keys) if zmq_keys is not None else None
        client_keys = load_client_keys(zmq_keys) if zmq_keys is not None else None
        self._auth = (CurveAuthenticator(self._ctx, server_keys)
                      if server_keys is not None else None)
        self._pusher = KVPusher(self.local, self.counters, drop, self._stop, self._ctx,
                                client_keys)
        self._push_sockets = self._pusher.new_sockets()  # the engine thread's (PUT)
        self._server = KVServer(self.endpoint, kv_config, self.local, self._received,
                                self.counters, drop, self._released, self._stop)
        ready = threading.Event()
        self._threads = [threading.Thread(target=self._server.run,
                                          args=(self._ctx, server_keys, ready),
                                          name="kv-endpoint", daemon=True)]
        self.fetcher: KVFetcher | None = None  # consumer
        if kv_config.is_consumer:
            self.fetcher = KVFetcher(self.local, self._received, self.counters, drop,
                                     fetch_timeout_s, self._fetches, self._fetched, self._stop,
                                     self._ctx, client_keys)
            self._threads.append(threading.Thread(target=self.fetcher.run, name="kv-fetcher",
                                                  daemon=True))
        if kv_config.is_producer and kv_config.send_type == "PUT_ASYNC":
            self._threads.append(threading.Thread(target=self._pusher.run,
                                                  args=(self._sends, self._sent),
                                                  name="kv-sender", daemon=True))
        for thread in self._threads:
            thread.start()
        if not ready.wait(10) or self._server.bind_error is not None:
            self.shutdown()
            raise ValueError(f"the KV endpoint cannot listen on {self.endpoint}: "
                             f"{self._server.bind_error or 'timed out'} (kv_ip/kv_port in "
                             f"--kv-transfer-config)")

    def before_step(self, scheduler: KVTransferView) -> None:
        """Apply what the background threads finished (released, expired and pushed leases;
        fetched KV); start fetches for requests that got their blocks; give up the transfers of
        requests aborted before their fetch started."""
        self.set_free_blocks(scheduler.num_free_blocks())
        ended = []
        while not self._released.empty():  # ReleaseKV from D or the proxy
            ended.append(self._released.get())
        while not self._sent.empty():  # pushed (PUT_ASYNC)
            ended.append(self._sent.get())
        for lease_id in ended:
            lease = self.local.release(lease_id)
            if lease is not None:
                scheduler.free_held_kv(lease.request_id)
        expired = self.local.expire()
        self.counters.leases_expired += len(expired)
        for lease in expired:
            logger.warning("KV lease %s of request %s expired", lease.lease_id, lease.request_id)
            scheduler.free_held_kv(lease.request_id)
        while not self._fetched.empty():
            request_id, ok = self._fetched.get()
            self._fetching.discard(request_id)
            scheduler.remote_kv_ready(request_id, ok)
        aborted: list[tuple[str, KVTransferParams]] = []  # (request id, its params)
        started = False
        for request in scheduler.requests_awaiting_kv():
            request_id = request.request_id
            if request_id in self._fetching:
                continue
            remote = request.remote_kv
            if remote is None:
                raise RuntimeError(f"request {request_id!r} awaits KV without transfer params")
            if request.is_finished:  # aborted before its fetch started
                aborted.append((request_id, remote))
                continue
            self._fetching.add(request_id)
            block_ids = scheduler.block_ids(request_id)
            self._fetches.put(FetchJob(request_id, remote, block_ids[:len(remote.block_ids)]))
            started = True
        for request_id, remote in aborted:
            self._give_up(remote)
            scheduler.remote_kv_ready(request_id, ok=False)
        if started or aborted:
            self._received.notify()  # wake the fetcher for its new jobs

    def set_free_blocks(self, num_free_blocks: int) -> None:
        """The engine's free KV blocks now: a pushed transfer goes to the receive buffer only if
        they (less those of buffered transfers not taken yet) can hold it."""
        self._received.set_free_blocks(num_free_blocks)

    def after_step(self, scheduler: KVTransferView, outputs: list[EngineCoreOutput]) -> None:
        """Lease (and push) the blocks of finished prefills; their final outputs carry the
        params. A request released after the step of its final output (another of its steps
        was still in flight) is lent without params reaching anyone: its lease expires."""
        self.set_free_blocks(scheduler.num_free_blocks())
        held = scheduler.requests_holding_kv()
        if not held:
            return
        by_id = {out.request_id: out for out in outputs if out.finish_reason is not None}
        leased = self.local.leased_request_ids()
        nothing_to_lend: list[str] = []
        to_push: list[PushJob] = []
        for request in held:
            request_id = request.request_id
            if request_id in leased:
                continue
            params = self._lend(request, scheduler.block_ids(request_id))
            if request_id in by_id:
                by_id[request_id].kv_transfer_params = params
            if not params.block_ids:  # a prompt of at most one block: D computes it all
                nothing_to_lend.append(request_id)
            elif params.send_type != "GET":  # lent for a push: to the decoder of its params
                if request.remote_kv is None:
                    raise RuntimeError(f"request {request_id!r} lent for a push without a target")
                to_push.append((params.lease_id, request.remote_kv))
        for request_id in nothing_to_lend:
            scheduler.free_held_kv(request_id)
        if self.kv_config.send_type == "PUT_ASYNC":
            for job in to_push:
                self._sends.put(job)
        elif to_push:  # PUT: push now, then free
            try:
                pushed = self._pusher.push(self._push_sockets, to_push)
            except Exception:  # the leases stay (a pull, or expiry); the engine goes on
                logger.exception("pushing KV failed")
                pushed = []
            for lease_id in pushed:
                lease = self.local.release(lease_id)
                if lease is not None:
                    scheduler.free_held_kv(lease.request_id)

    def stats(self) -> KVTransferStats:
        return msgspec.structs.replace(self.counters)

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

    def _lend(self, request: Request, block_ids: list[int]) -> KVTransferParams:
        """Lease the whole prompt blocks of a finished prefill (with a push target: under the
        proxy's transfer id); the params for its decoder. `send_type` "GET" unless pushed."""
        bs = self.config.cache.block_size
        num_blocks = (request.num_prompt_tokens - 1) // bs
        block_ids = block_ids[:num_blocks]
        target = request.remote_kv if self.kv_config.send_type != "GET" else None
        lease_id, send_type = "", "GET"
        if block_ids:
            lease = self.local.grant(request.request_id, block_ids, num_blocks * bs,
                                     target.lease_id if target is not None else None)
            lease_id = lease.lease_id
            if target is not None and lease_id == target.lease_id:
                send_type = self.kv_config.send_type
        return KVTransferParams(kv_endpoint=self.endpoint, block_ids=block_ids,
                                num_tokens=num_blocks * bs, compat_hash=self.compat_hash,
                                lease_id=lease_id, send_type=send_type)

    def _give_up(self, params: KVTransferParams) -> None:
        """The request of `params` no longer wants its KV: drop what D buffered for it and,
        unless D had it all (P already freed it), tell P to end its lease."""
        if self._received.drop(params.lease_id) is not TransferState.COMPLETE:
            self._fetches.put(ReleaseJob(params.kv_endpoint, params.lease_id))
