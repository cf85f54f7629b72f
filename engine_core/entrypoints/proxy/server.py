"""`pp-engine proxy`: the OpenAI-compatible front door of disaggregated prefill/decode.

Instances (`pp-engine serve --kv-transfer-config ...`) register with the proxy's discovery
socket and heartbeat every second (`instance_pool.py`). A client request then goes:

    1. validate   the body, with the same pydantic models as `pp-engine serve`: a bad one is a
                  400 from the proxy itself, no instance is contacted
    2. pick       D = the least loaded decode instance, P = the least loaded prefill instance
                  (by the load each reports in its heartbeats, plus what this proxy sent it
                  since; 503 naming the missing role if there is none). If P is D (a kv_both
                  instance no producer is less loaded than), the request runs there alone,
                  as on a plain server: steps 3-4 become one leg with no KV transfer.
    3. prefill    P gets the body with max_tokens 1 and streaming off, `do_remote_decode`, and
                  (PUT/PUT_ASYNC) `push_to` = D's KV endpoint and a fresh lease id. P's answer
                  ends with the KV transfer params of each prompt. A non-200 answer from P
                  (say a 400 for a prompt too long) goes back to the client unchanged.
    4. decode     D gets the original body and P's KV transfer params; its answer (JSON, or SSE
                  events as they come) goes back to the client byte for byte.

Faults: every wait on an instance is bounded (`--request-timeout-s` per message), and fails at
once when the instance stops heartbeating. A failure before anything reached the client is
retried once on another pair (without the failed instance; if it was the only one of its role,
the client gets the error: 502 instance failed, 504 timeout). A failure in the middle of a
stream ends it with an SSE error event and `data: [DONE]`. A client that disconnects gets its
request aborted (`ProxyAbort`) on the instance working on it; if D had not taken the KV yet,
P's leases on it end at once (`ReleaseKV` to P's KV endpoint) instead of at their expiry.

Several proxies may share one pool of instances: each has its own id, which instances learn at
registration and each request carries (`reply_to`), so every response goes to the proxy that
accepted the request.

In process (tests):

    pool = InstancePool(config)
    await pool.start()                 # binds the discovery socket (port 0: a free one)
    app = build_proxy_app(pool, config)
    ...                                # serve `app` (uvicorn), register instances with
    await pool.close()                 #   pool.discovery_address
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from engine_core.entrypoints.http.disconnect import ClientDisconnected, unless_disconnected
from engine_core.entrypoints.http.errors import RequestError, error_body, validation_error
from engine_core.entrypoints.http.instance_wire import ProxyRequest, ResponseChunk, ResponseHead
from engine_core.entrypoints.http.limits import RequestBodyLimit
from engine_core.entrypoints.http.protocol import ChatCompletionRequest, CompletionRequest
from engine_core.entrypoints.http.setup import (
    ClosingStreamingResponse,
    add_error_handlers,
    api_key_check,
    exit_on_sigterm,
    listen,
)
from engine_core.entrypoints.proxy.config import ProxyConfig
from engine_core.entrypoints.proxy.discovery import InstanceInfo, NoInstanceError
from engine_core.entrypoints.proxy.instance_pool import InstancePool, Leg, LegFailed
from engine_core.entrypoints.proxy.metrics import ProxyMetrics
from engine_core.kv_compat import kv_compat_hash
from engine_core.transfer_params import KVTransferParams
from engine_core.transport import require_keys_for_hosts

__all__ = ["build_proxy_app", "prefill_body", "run_proxy"]

logger = logging.getLogger("engine_core.entrypoints.proxy.server")

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
_SSE = "text/event-stream"
_DONE_EVENT = b"data: [DONE]\n\n"
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def prefill_body(body: bytes) -> bytes:
    """The prefill leg's body: the client's, computing the prompt and one token only."""
    data = json.loads(body)
    data["max_tokens"] = 1
    if "max_completion_tokens" in data:
        data["max_completion_tokens"] = 1
    data["stream"] = False
    data.pop("stream_options", None)
    data.pop("best_of", None)
    if "n" in data:
        data["n"] = 1
    if "min_tokens" in data:
        data["min_tokens"] = 0
    return json.dumps(data).encode()


@dataclass
class _Stream:
    """A decode answer being streamed: what arrived so far and the leg still reading."""

    head: ResponseHead
    chunks: list[ResponseChunk]
    leg: Leg
    arrival: float
    done: bool = False  # ran to its end (or to an error event): not a client disconnect


def _release_stream(answer: Response | _Stream) -> None:
    """An answer that came after its client left: let go of the decode leg it holds open."""
    if isinstance(answer, _Stream):
        answer.leg.release()


class _DecodeStreamResponse(ClosingStreamingResponse):
    """A StreamingResponse that releases the decode leg however the response ends (a client
    that disconnects before the first byte included)."""

    def __init__(self, stream: _Stream, content: AsyncIterator[bytes],
                 on_disconnect: Callable[[], None]) -> None:
        super().__init__(content, status_code=stream.head.status,
                         media_type=stream.head.media_type, headers=_STREAM_HEADERS)
        self._stream, self._on_disconnect = stream, on_disconnect

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._stream.done:
                self._on_disconnect()
            self._stream.leg.release()


class ProxyServing:
    """The request flow behind the routes (module docstring), over an `InstancePool`."""

    def __init__(self, pool: InstancePool, config: ProxyConfig, metrics: ProxyMetrics) -> None:
        self.pool, self.config, self.metrics = pool, config, metrics
        self.created = int(time.time())

    async def serve(self, raw: Request, route: str) -> Response:
        """POST /v1/completions or /v1/chat/completions; every error an OpenAI error body."""
        arrival = time.perf_counter()
        try:
            body = await raw.body()
            model = CompletionRequest if route == COMPLETIONS else ChatCompletionRequest
            try:
                request = model.model_validate_json(body)
            except ValidationError as exc:
                raise validation_error(exc) from None
            self._check_model(request.model)
            request.check_supported()
            prefix = "cmpl" if route == COMPLETIONS else "chatcmpl"
            answer = await unless_disconnected(raw, self._answer(route, body, prefix, arrival),
                                               discard=_release_stream)
        except Exception as exc:
            return self._error_response(exc)
        if isinstance(answer, Response):
            return answer
        return _DecodeStreamResponse(answer, self._events(answer), self._count_disconnect)

    def _check_model(self, model: str | None) -> None:
        served = self.pool.model_name()
        if model is not None and served is not None and model != served:
            raise RequestError(f"The model `{model}` does not exist; this server serves "
                               f"`{served}`", param="model", status=404,
                               type="NotFoundError", code="model_not_found")

    async def _answer(self, route: str, body: bytes, prefix: str, arrival: float
                      ) -> Response | _Stream:
        """Prefill then decode, retried once on another pair if an instance fails before the
        client got anything."""
        exclude: set[str] = set()
        try:
            return await self._attempt(route, body, prefix, arrival, exclude)
        except LegFailed as exc:
            exclude.add(exc.instance_id)
            if not (self.pool.has_instance(True, exclude)
                    and self.pool.has_instance(False, exclude)):
                raise
            logger.warning("%s; retrying on another pair", exc.message)
            self.metrics.retries.inc()
        return await self._attempt(route, body, prefix, arrival, exclude)

    async def _attempt(self, route: str, body: bytes, prefix: str, arrival: float,
                       exclude: set[str]) -> Response | _Stream:
        p_info, d_info = self.pool.pick_pair(exclude)
        request_id = f"{prefix}-{uuid.uuid4().hex}"  # a retry gets a new id
        if p_info is d_info:  # a kv_both instance runs it alone: no KV to move
            leg = self.pool.open(d_info, request_id, "colocated")
            try:
                return await self._decode(leg, route, body, [], arrival)
            except BaseException:
                leg.release()
                raise
        prefill = self.pool.open(p_info, request_id, "prefill")
        decode = self.pool.open(d_info, request_id, "decode")
        try:
            params = await self._prefill(prefill, route, body, d_info)
        except BaseException:
            prefill.release()
            decode.release()
            raise
        if isinstance(params, Response):  # P refused the request: the client sees why
            decode.release()
            self.metrics.e2e.observe(time.perf_counter() - arrival)
            return params
        try:
            answer = await self._decode(decode, route, body, params, arrival)
        except BaseException:  # D never took the KV: P need not hold it any longer
            decode.release()
            self.pool.release_kv(params, d_info)
            raise
        status = answer.head.status if isinstance(answer, _Stream) else answer.status_code
        if status != 200:  # D refused the request: it took no KV either
            self.pool.release_kv(params, d_info)
        return answer

    async def _prefill(self, leg: Leg, route: str, body: bytes, d_info: InstanceInfo
                       ) -> list[KVTransferParams | None] | Response:
        """Run the prefill leg: the KV transfer params of each prompt, or P's non-200
        answer as the response."""
        start = time.perf_counter()
        send_type = leg.info.register.send_type
        push_to = None
        if send_type != "GET":
            d = d_info.register
            push_to = KVTransferParams(kv_endpoint=d.kv_endpoint, block_ids=[], num_tokens=0,
                                       compat_hash=kv_compat_hash(d.compat_fields),
                                       lease_id=uuid.uuid4().hex, send_type=send_type)
        leg.send(ProxyRequest(leg.request_id, route, prefill_body(body), do_remote_decode=True,
                              push_to=push_to))
        self.metrics.requests.labels(leg.instance_id, "prefill").inc()
        head, chunks = await leg.read_all()
        leg.release()
        self.metrics.prefill.observe(time.perf_counter() - start)
        if head.status != 200:
            return Response(b"".join(c.data for c in chunks), status_code=head.status,
                            media_type=head.media_type)
        return chunks[-1].kv_transfer_params

    async def _decode(self, leg: Leg, route: str, body: bytes,
                      params: list[KVTransferParams | None], arrival: float
                      ) -> Response | _Stream:
        """Start the decode leg: a whole response (JSON), or the stream once its first chunk
        is here (until then a failure may still be retried)."""
        leg.send(ProxyRequest(leg.request_id, route, body, kv_transfer_params=params))
        self.metrics.requests.labels(leg.instance_id, leg.role).inc()
        head = await leg.head()
        chunks = [await leg.chunk()]
        self.metrics.ttft.observe(time.perf_counter() - arrival)
        if head.media_type.startswith(_SSE):
            return _Stream(head, chunks, leg, arrival)
        while not chunks[-1].last:
            chunks.append(await leg.chunk())
        leg.release()
        self.metrics.e2e.observe(time.perf_counter() - arrival)
        return Response(b"".join(c.data for c in chunks), status_code=head.status,
                        media_type=head.media_type)

    async def _events(self, stream: _Stream) -> AsyncIterator[bytes]:
        """D's SSE chunks as they come; an error event and [DONE] if D fails midway."""
        for chunk in stream.chunks:
            yield chunk.data
        last = stream.chunks[-1].last
        while not last:
            try:
                chunk = await stream.leg.chunk()
            except LegFailed as exc:
                logger.warning("%s in the middle of a stream", exc.message)
                self.metrics.errors.labels(exc.code).inc()
                stream.done = True
                yield f"data: {json.dumps(exc.body())}\n\n".encode()
                yield _DONE_EVENT
                return
            last = chunk.last
            yield chunk.data
        stream.done = True
        self.metrics.e2e.observe(time.perf_counter() - stream.arrival)

    def _count_disconnect(self) -> None:
        self.metrics.errors.labels("client_disconnected").inc()

    def _error_response(self, exc: Exception) -> Response:
        if isinstance(exc, ClientDisconnected):
            self._count_disconnect()
            return Response(status_code=499)
        error: RequestError
        if isinstance(exc, LegFailed):
            logger.warning("%s", exc.message)
            error, reason = exc, str(exc.code)
        elif isinstance(exc, RequestError):
            error, reason = exc, "invalid_request"
        elif isinstance(exc, NoInstanceError):
            error = RequestError(str(exc), status=503, type="server_error", code="no_instance")
            reason = "no_instance"
        else:
            logger.error("internal error while proxying a request", exc_info=exc)
            error = RequestError(f"internal proxy error: {type(exc).__name__}: {exc}",
                                 status=500, type="server_error", code="internal_error")
            reason = "internal_error"
        self.metrics.errors.labels(reason).inc()
        return JSONResponse(error.body(), status_code=error.status)

    def models(self) -> dict[str, Any]:
        """GET /v1/models: the registered model (an empty list before any instance)."""
        infos = [i for i in self.pool.instances() if i.register.model_name]
        if not infos:
            return {"object": "list", "data": []}
        name = infos[0].register.model_name
        max_model_len = min((i.register.max_model_len for i in infos
                             if i.register.max_model_len), default=None)
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": self.created, "owned_by": "pp-engine",
            "root": name, "max_model_len": max_model_len}]}

    def health(self) -> Response:
        """200 once a prefill and a decode instance are registered, else 503 naming the
        missing role(s)."""
        missing = self.pool.missing_roles()
        if not missing:
            return Response(status_code=200)
        return JSONResponse(error_body("; ".join(missing), "server_error", code="no_instance"),
                            status_code=503)


def build_proxy_app(pool: InstancePool, config: ProxyConfig) -> FastAPI:
    """The proxy's OpenAI-compatible app over a started `pool` (which the caller owns and
    closes). With `config.api_key`, the /v1 routes need `Authorization: Bearer <key>`;
    /health and /metrics stay open. A body over `config.max_request_bytes` gets a 413."""
    metrics = ProxyMetrics(pool)
    serving = ProxyServing(pool, config, metrics)
    app = FastAPI(title="pp-engine prefill/decode proxy")
    app.add_middleware(RequestBodyLimit, max_bytes=config.max_request_bytes)
    app.state.serving = serving

    auth = [Depends(api_key_check(config.api_key))] if config.api_key else []
    v1 = APIRouter(prefix="/v1", dependencies=auth)

    @v1.post("/completions")
    async def create_completion(request: Request) -> Response:
        return await serving.serve(request, COMPLETIONS)

    @v1.post("/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        return await serving.serve(request, CHAT)

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return serving.models()

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        return serving.health()

    @app.get("/metrics")
    async def show_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    add_error_handlers(app)

    return app


# ---- pp-engine proxy ---------------------------------------------------------------------------
def _config(args: argparse.Namespace) -> ProxyConfig:
    return ProxyConfig(discovery_host=args.discovery_host, discovery_port=args.discovery_port,
                       zmq_keys=args.zmq_keys, insecure_tcp=args.insecure_tcp,
                       heartbeat_timeout_s=args.heartbeat_timeout_s,
                       request_timeout_s=args.request_timeout_s, api_key=args.api_key,
                       max_request_bytes=args.max_request_bytes)


async def _serve(config: ProxyConfig, args: argparse.Namespace, sock: socket.socket) -> None:
    import uvicorn

    pool = InstancePool(config)
    try:
        await pool.start()
        app = build_proxy_app(pool, config)
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.uvicorn_log_level,
                                               loop="uvloop", timeout_graceful_shutdown=5))
        logger.info("proxy on http://%s:%d, instances register at %s", args.host, args.port,
                    pool.discovery_address)
        await server.serve(sockets=[sock])
    finally:
        await pool.close()


def run_proxy(args: argparse.Namespace) -> int:
    """`pp-engine proxy`: serve until SIGINT/SIGTERM (exit code 0). ValueError (bad
    arguments, no keys for the tcp discovery socket, a port in use) before serving."""
    import uvloop

    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key must not be empty (omit it to serve without a key)")
    config = _config(args)
    # the discovery socket is tcp: keys, or loopback only, or an explicit --insecure-tcp
    require_keys_for_hosts("the discovery socket", [args.discovery_host], args.zmq_keys,
                           args.insecure_tcp)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("engine_core").addHandler(handler)
    logging.getLogger("engine_core").setLevel(args.uvicorn_log_level.upper()
                                              if args.uvicorn_log_level != "trace" else "DEBUG")
    sock = listen(args.host, args.port)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        uvloop.run(_serve(config, args, sock))
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0
