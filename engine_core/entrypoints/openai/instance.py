"""The instance side of disaggregated prefill/decode: what `pp-engine serve --kv-transfer-config`
adds to a server.

- **Registration**, with every proxy of `proxy_address` (a comma-separated list): a DEALER to
  each proxy's discovery socket sends `Register` (role, the address of the request socket below,
  the KV endpoint, the KV layout fields, the load) until that proxy answers with its id, then a
  `Heartbeat` with the engine's load every second. A proxy that has forgotten the instance (it
  restarted) gets a `Register` again. A proxy that refuses the instance (its KV layout differs
  from the instances already there) stops the server with the proxy's message.
- **Requests**: a ROUTER, bound on a free port of `kv_ip`, takes `ProxyRequest`s
  (`instance_wire.py`) and serves each through the server's own OpenAI serving as an
  in-process ASGI-style call (`proxied.ProxiedApp`), so the answer is what the HTTP route
  gives; the request's transfer side is a typed argument of that call (`KVTransferRequest`,
  never in the JSON body) and the params the engine returned its typed result
  (`KVTransferResult`). Each response message goes back as it is produced (one chunk per SSE
  event; the last one, with the returned params, once the call is over) to the request's
  `reply_to`: the proxy that accepted it, which must be one this instance is registered with.
- **Faults**: a `ProxyAbort`, or a proxy that is gone, is a client disconnect to the app: the
  request is aborted and its KV blocks freed. A proxy that answers no heartbeat for
  `PROXY_TIMEOUT_S` is dropped: the requests it sent are aborted, its return address is
  forgotten (a request naming it is refused), and the instance keeps trying to register there,
  so a restarted proxy gets it back.

Every socket here is tcp, CurveZMQ with the instance's key directory (the proxies and the
instances share it, like `pp-engine keys` for data parallelism); `serve` runs them without keys
only when every address is loopback, or with `--insecure-tcp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine, MutableMapping
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from engine_core.entrypoints.http.discovery_wire import (
    Heartbeat,
    HeartbeatReply,
    Load,
    Register,
    RegisterReply,
)
from engine_core.entrypoints.http.instance_wire import (
    ProxyAbort,
    ProxyMessage,
    ProxyRequest,
    ResponseChunk,
    ResponseHead,
)
from engine_core.entrypoints.openai.proxied import (
    KVTransferRequest,
    KVTransferResult,
    ProxiedApp,
)
from engine_core.kv_compat import kv_compat_fields
from engine_core.kv_transfer_config import KVTransferConfig
from engine_core.transport import (
    CurveAuthenticator,
    WarningLimiter,
    load_client_keys,
    load_server_keys,
    prepare_router,
    secure_client,
)

__all__ = ["DisaggInstance"]

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
REGISTER_RETRY_S = 1.0
PROXY_TIMEOUT_S = 3.0  # three unanswered heartbeats: the proxy is gone
MAX_PROXY_MESSAGE_BYTES = 64 << 20  # a request body is far smaller (the proxy caps bodies)


@dataclass
class ProxyLink:
    """This instance's standing with one proxy: `proxy_id` (its return address) while
    registered, and when that proxy last answered."""

    address: str  # host:port of its discovery socket
    proxy_id: str | None = None
    last_reply: float = 0.0


class DisaggInstance:
    """Serves `app` (the OpenAI serving's `serve_proxied`) to the proxies of
    `kv_config.proxy_address`. Start with `start()` on the event loop, stop with `close()`.
    `load()` gives the engine's load for the heartbeats; `on_refused(message)` is called if a
    proxy refuses us."""

    def __init__(self, app: ProxiedApp, kv_config: KVTransferConfig,
                 compat_fields: dict[str, str], model_name: str, max_model_len: int,
                 load: Callable[[], Load], on_refused: Callable[[str], None]) -> None:
        self.app = app
        self.kv_config = kv_config
        self.compat_fields = compat_fields
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.load = load
        self.on_refused = on_refused
        self.instance_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.kv_endpoint = f"tcp://{kv_config.kv_ip}:{kv_config.kv_port}"
        self.request_address = ""
        self.links = [ProxyLink(address) for address in kv_config.proxy_addresses]
        self.registered = asyncio.Event()  # set while registered with at least one proxy
        self.bad_frames = WarningLimiter(logger)
        keys_dir = kv_config.zmq_keys
        self._server_keys = load_server_keys(keys_dir) if keys_dir is not None else None
        self._client_keys = load_client_keys(keys_dir) if keys_dir is not None else None
        self._ctx = zmq.asyncio.Context()
        self._auth: CurveAuthenticator | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self._aborts: dict[tuple[str, str], asyncio.Event] = {}  # (proxy id, request id)
        self._encoder = msgspec.msgpack.Encoder()

    @classmethod
    def for_engine(cls, app: ProxiedApp, llm: Any, model_name: str,
                   on_refused: Callable[[str], None]) -> DisaggInstance:
        """The instance of a server over `llm` (an AsyncLLM with a KV transfer config)."""
        config = llm.config

        def load() -> Load:
            stats = llm.stats
            return Load(stats.num_running, stats.num_waiting, stats.num_free_blocks,
                        stats.num_total_blocks)

        return cls(app, config.kv_transfer, kv_compat_fields(config), model_name,
                   config.scheduler.max_model_len, load, on_refused)

    async def start(self) -> None:
        """Bind the request socket and start registering (in the background: the proxy may
        come up later)."""
        if self._server_keys is not None:
            self._auth = CurveAuthenticator(zmq.Context.shadow(self._ctx.underlying),
                                            self._server_keys)
        router = self._ctx.socket(zmq.ROUTER)
        prepare_router(router, self._server_keys, MAX_PROXY_MESSAGE_BYTES)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a proxy that reconnects takes its id back
        try:
            router.bind(f"tcp://{self.kv_config.kv_ip}:*")
        except zmq.ZMQError as exc:
            router.close()
            raise ValueError(f"cannot bind the proxy request socket on {self.kv_config.kv_ip}: "
                             f"{exc}") from None
        self._router = router
        self.request_address = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._spawn(self._serve_requests())
        for link in self.links:
            self._spawn(self._register_and_heartbeat(link))

    async def close(self) -> None:
        """Stop serving: abort the requests in progress, close every socket."""
        for event in self._aborts.values():
            event.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._router is not None:
            self._router.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.destroy(linger=0)  # also any socket a stuck task still holds

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- registration -------------------------------------------------------------------------
    def _register_message(self) -> Register:
        return Register(self.instance_id, self.kv_config.kv_role, self.request_address,
                        self.kv_endpoint, self.compat_fields, self.kv_config.send_type,
                        self.model_name, self.max_model_len, self.load())

    async def _register_and_heartbeat(self, link: ProxyLink) -> None:
        """Register with one proxy, then heartbeat to it; drop it when it stops answering and
        register again when it is back."""
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDHWM, 16)
        secure_client(dealer, self._client_keys)
        dealer.connect(f"tcp://{link.address}")
        decoder = msgspec.msgpack.Decoder(RegisterReply | HeartbeatReply)
        loop = asyncio.get_running_loop()
        try:
            while True:
                if link.proxy_id is None:
                    message: Register | Heartbeat = self._register_message()
                    wait_s = REGISTER_RETRY_S
                else:
                    message = Heartbeat(self.instance_id, self.load())
                    wait_s = HEARTBEAT_S
                with contextlib.suppress(zmq.Again):  # no proxy (yet): the next round retries
                    await dealer.send(self._encoder.encode(message), zmq.NOBLOCK)
                deadline = loop.time() + wait_s
                while (remaining := deadline - loop.time()) > 0:
                    if not await dealer.poll(remaining * 1000):
                        break
                    try:
                        reply = decoder.decode(await dealer.recv())
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        self.bad_frames.warning("dropped a bad discovery reply: %s", exc)
                        continue
                    link.last_reply = time.monotonic()
                    if isinstance(reply, RegisterReply):
                        if reply.error is not None:
                            logger.error("the proxy at %s refused this instance: %s",
                                         link.address, reply.error)
                            self.on_refused(reply.error)
                            return
                        if link.proxy_id is None and reply.proxy_id:
                            logger.info("registered with the proxy %s at %s as %s (%s)",
                                        reply.proxy_id, link.address, self.instance_id,
                                        self.kv_config.kv_role)
                            link.proxy_id = reply.proxy_id
                            self.registered.set()
                    elif not reply.known and link.proxy_id is not None:  # it restarted
                        self._drop_proxy(link, "forgot this instance (it restarted)")
                        break
                if (link.proxy_id is not None
                        and time.monotonic() - link.last_reply > PROXY_TIMEOUT_S):
                    self._drop_proxy(link, f"answered no heartbeat for {PROXY_TIMEOUT_S:g} s")
        finally:
            dealer.close(linger=0)

    def _drop_proxy(self, link: ProxyLink, reason: str) -> None:
        """Forget a proxy's return address and abort the requests it sent; registering with
        it again starts at once."""
        proxy_id, link.proxy_id = link.proxy_id, None
        aborted = [event for (sender, _), event in self._aborts.items() if sender == proxy_id]
        for event in aborted:
            event.set()
        logger.warning("the proxy %s at %s %s: dropped it, %d of its request(s) aborted; "
                       "registering again", proxy_id, link.address, reason, len(aborted))
        if not any(other.proxy_id is not None for other in self.links):
            self.registered.clear()

    def _is_live_proxy(self, proxy_id: str) -> bool:
        return any(link.proxy_id == proxy_id for link in self.links)

    # ---- requests -----------------------------------------------------------------------------
    async def _serve_requests(self) -> None:
        assert self._router is not None
        decoder = msgspec.msgpack.Decoder(ProxyMessage)
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) != 2:
                self.bad_frames.warning("dropped a proxy message of %d frames", len(frames))
                continue
            identity, payload = frames
            try:
                message = decoder.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.bad_frames.warning("dropped a bad proxy message (%d bytes): %s",
                                        len(payload), exc)
                continue
            sender = identity.decode(errors="replace")
            if isinstance(message, ProxyAbort):
                event = self._aborts.get((sender, message.request_id))
                if event is not None:
                    event.set()
            elif message.reply_to != sender or not self._is_live_proxy(sender):
                self.bad_frames.warning("dropped request %r: its return address %r is not a "
                                        "proxy this instance is registered with",
                                        message.request_id[:64], message.reply_to[:64])
            elif (sender, message.request_id) in self._aborts:
                self.bad_frames.warning("dropped a duplicate request id %r",
                                        message.request_id[:64])
            else:
                self._aborts[(sender, message.request_id)] = asyncio.Event()
                self._spawn(self._serve_request(message))

    async def _serve_request(self, request: ProxyRequest) -> None:
        """Serve one proxied request, sending its response back to the proxy that sent it
        (`reply_to`) as it comes; the last chunk carries the KV transfer params the serving
        returned (prefill leg)."""
        assert self._router is not None
        router = self._router
        request_id = request.request_id
        key = (request.reply_to, request_id)
        aborted = self._aborts[key]
        return_address = request.reply_to.encode()
        transfer = KVTransferRequest(request.do_remote_decode, request.push_to,
                                     tuple(request.kv_transfer_params))
        head_sent = False
        last_body: bytes | None = None  # held until the call returns the transfer params
        result: KVTransferResult | None = None

        async def reply(message: ResponseHead | ResponseChunk) -> None:
            try:
                await router.send_multipart([return_address, self._encoder.encode(message)])
            except zmq.ZMQError as exc:  # the proxy is gone: stop the work
                logger.warning("cannot answer the proxy for %s (%s); aborting it", request_id,
                               exc)
                aborted.set()

        body_read = False

        async def receive() -> dict[str, Any]:
            nonlocal body_read
            if not body_read:
                body_read = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await aborted.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal head_sent, last_body
            if aborted.is_set():
                raise OSError("the proxy aborted the request")
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                media_type = headers.get(b"content-type", b"application/json").decode()
                head_sent = True
                await reply(ResponseHead(request_id, message["status"], media_type))
            elif message["type"] == "http.response.body" and last_body is None:
                body = bytes(message.get("body", b""))
                if not message.get("more_body", False):
                    last_body = body
                elif body:
                    await reply(ResponseChunk(request_id, body))

        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(request.body)).encode())]
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": request.route, "raw_path": request.route.encode(), "root_path": "",
            "query_string": b"", "headers": headers, "client": ("proxy", 0),
            "server": (self.kv_config.kv_ip, 0),
        }
        try:
            result = await self.app(scope, receive, send, transfer)
        except Exception as exc:
            if not aborted.is_set():
                logger.exception("serving proxied request %s failed", request_id)
            if not head_sent and not aborted.is_set():
                body = msgspec.json.encode({"error": {
                    "message": f"internal server error: {type(exc).__name__}", "type":
                    "server_error", "param": None, "code": "internal_error"}})
                await reply(ResponseHead(request_id, 500, "application/json"))
                await reply(ResponseChunk(request_id, body, True))
        finally:
            if head_sent and not aborted.is_set():  # the last chunk; never leave it hanging
                params = list(result.params) if result is not None and \
                    request.do_remote_decode else []
                await reply(ResponseChunk(request_id, last_body or b"", True, params))
            self._aborts.pop(key, None)
