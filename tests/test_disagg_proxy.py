"""`pp-engine proxy` against fake instances: small asyncio ZMQ peers that register and heartbeat
like an instance and answer ProxyRequests with canned ResponseHead/ResponseChunk messages,
recording what they received. The proxy runs in process (its app under uvicorn on the test's
event loop, on free ports); every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import msgspec
import pytest
import uvicorn
import zmq
import zmq.asyncio

from engine_core.entrypoints.cli import main as cli_main
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
from engine_core.entrypoints.http.setup import listen
from engine_core.entrypoints.proxy.config import ProxyConfig
from engine_core.entrypoints.proxy.instance_pool import InstancePool
from engine_core.entrypoints.proxy.server import build_proxy_app
from engine_core.kv_compat import kv_compat_hash
from engine_core.kv_transfer.kv_wire import ReleaseKV
from engine_core.transfer_params import KVTransferParams
from engine_core.transport import (
    CurveKeys,
    load_client_keys,
    load_server_keys,
    secure_client,
    secure_server,
)
from tests.servers import CliProcess, async_wait_for, free_port, wait_for

MODEL = "fake-model"
FIELDS = {"dtype": '"float32"', "block_size": "16", "num_kv_heads": "2"}
HEARTBEAT_TIMEOUT_S = 1.5  # fakes beat every 0.1 s; a loaded CI machine can stall a loop
pytestmark = pytest.mark.timeout(60)

JSON_CHUNKS = [b'{"id":"cmpl-d","object":"text_completion",', b'"choices":[]}']
SSE_CHUNKS = [b'data: {"n":1}\n\n', b'data: {"n":2}\n\n', b"data: [DONE]\n\n"]
ENCODER = msgspec.msgpack.Encoder()


def run(coro, timeout_s: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


class FakeInstance:
    """A registered instance: a DEALER to the proxy's discovery socket (heartbeating every
    0.1 s while `beating`) and a ROUTER serving requests as `mode` says:
    "ok" (canned answers), "silent" (never answers), "hang" (head and first chunk, then
    nothing), "reject" (a 400 from prefill)."""

    def __init__(self, ctx: zmq.asyncio.Context, discovery: str, instance_id: str, role: str,
                 *, send_type: str = "PUT", fields: dict[str, str] | None = None,
                 model_name: str = MODEL, keys: CurveKeys | None = None,
                 server_keys: CurveKeys | None = None) -> None:
        self.ctx, self.discovery, self.instance_id, self.role = ctx, discovery, instance_id, role
        self.send_type, self.fields = send_type, fields or FIELDS
        self.model_name, self.keys, self.server_keys = model_name, keys, server_keys
        self.mode = "ok"
        self.beating = True
        self.load = Load()
        self.received: list[ProxyRequest | ProxyAbort] = []
        self.kv_received: list[ReleaseKV] = []  # what came to its KV endpoint
        self._replies: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []

    @property
    def params(self) -> list[KVTransferParams]:
        """What it answers a prefill leg with: one prompt's KV, leased at its KV endpoint."""
        return [KVTransferParams(self.kv_endpoint, [3, 4], 32, "p-hash", "lease-x",
                                 self.send_type)]

    async def start(self, reply_timeout_s: float = 3.0) -> RegisterReply | None:
        """Bind, register (the reply, or None if none came), then heartbeat and serve."""
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        secure_server(self.router, self.server_keys)
        self.router.bind("tcp://127.0.0.1:*")
        self.address = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.kv_router = self.ctx.socket(zmq.ROUTER)
        self.kv_router.setsockopt(zmq.LINGER, 0)
        secure_server(self.kv_router, self.server_keys)
        self.kv_router.bind("tcp://127.0.0.1:*")
        self.kv_endpoint = self.kv_router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        secure_client(self.dealer, self.keys)
        self.dealer.connect(self.discovery)
        self._tasks = [asyncio.create_task(self._read_replies()),
                       asyncio.create_task(self._serve()),
                       asyncio.create_task(self._serve_kv())]
        await self.dealer.send(ENCODER.encode(Register(
            self.instance_id, self.role, self.address, self.kv_endpoint, self.fields,
            send_type=self.send_type, model_name=self.model_name, max_model_len=128,
            load=self.load)))
        try:
            reply = await asyncio.wait_for(self._replies.get(), reply_timeout_s)
        except asyncio.TimeoutError:
            return None
        if reply.error is None:
            self._tasks.append(asyncio.create_task(self._heartbeat()))
        return reply

    async def _read_replies(self) -> None:
        decoder = msgspec.msgpack.Decoder(RegisterReply | HeartbeatReply)
        while True:
            reply = decoder.decode(await self.dealer.recv())
            if isinstance(reply, RegisterReply):
                self._replies.put_nowait(reply)

    async def _heartbeat(self) -> None:
        while True:
            if self.beating:
                await self.dealer.send(ENCODER.encode(Heartbeat(self.instance_id, self.load)))
            await asyncio.sleep(0.1)  # the fake's heartbeat period (pacing, not a wait)

    async def _serve(self) -> None:
        decoder = msgspec.msgpack.Decoder(ProxyMessage)
        while True:
            identity, frame = await self.router.recv_multipart()
            message = decoder.decode(frame)
            self.received.append(message)
            if isinstance(message, ProxyRequest):
                self._tasks.append(asyncio.create_task(self._answer(identity, message)))

    async def _serve_kv(self) -> None:
        decoder = msgspec.msgpack.Decoder(ReleaseKV)
        while True:
            _, frame = await self.kv_router.recv_multipart()
            self.kv_received.append(decoder.decode(frame))

    async def _answer(self, identity: bytes, request: ProxyRequest) -> None:
        if self.mode == "silent":
            return
        rid = request.request_id

        async def send(message) -> None:
            await self.router.send_multipart([identity, ENCODER.encode(message)])

        if request.do_remote_decode:  # the prefill leg
            if self.mode == "reject":
                await send(ResponseHead(rid, 400, "application/json"))
                await send(ResponseChunk(rid, b'{"error":{"message":"too long"}}', last=True))
                return
            await send(ResponseHead(rid, 200, "application/json"))
            await send(ResponseChunk(rid, b'{"prefilled":1}', last=True,
                                     kv_transfer_params=self.params))
            return
        stream = json.loads(request.body).get("stream", False)
        chunks = SSE_CHUNKS if stream else JSON_CHUNKS
        await send(ResponseHead(rid, 200, "text/event-stream" if stream else "application/json"))
        for i, data in enumerate(chunks):
            await send(ResponseChunk(rid, data, last=i == len(chunks) - 1))
            if self.mode == "hang":
                return
            await asyncio.sleep(0.01)  # paces the fake's chunks, as a model would

    def requests(self) -> list[ProxyRequest]:
        return [m for m in self.received if isinstance(m, ProxyRequest)]

    def aborts(self) -> list[ProxyAbort]:
        return [m for m in self.received if isinstance(m, ProxyAbort)]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.router.close(linger=0)
        self.kv_router.close(linger=0)
        self.dealer.close(linger=0)


@dataclass
class Harness:
    pool: InstancePool
    http: httpx.AsyncClient
    ctx: zmq.asyncio.Context
    instances: list[FakeInstance]

    async def instance(self, instance_id: str, role: str, **kwargs) -> FakeInstance:
        """A fake instance, registered (asserted)."""
        fake = FakeInstance(self.ctx, self.pool.discovery_address, instance_id, role, **kwargs)
        self.instances.append(fake)
        reply = await fake.start()
        assert reply is not None and reply.error is None, reply
        return fake

    async def pair(self, send_type: str = "PUT") -> tuple[FakeInstance, FakeInstance]:
        return (await self.instance("p0", "kv_producer", send_type=send_type),
                await self.instance("d0", "kv_consumer"))

    async def metrics(self) -> str:
        return (await self.http.get("/metrics")).text


@contextlib.asynccontextmanager
async def proxy(**overrides) -> AsyncIterator[Harness]:
    settings = {"discovery_port": 0, "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
                "request_timeout_s": 5.0, **overrides}
    config = ProxyConfig(**settings)
    pool = InstancePool(config)
    await pool.start()
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(build_proxy_app(pool, config), log_level="warning",
                                           lifespan="off", timeout_graceful_shutdown=1))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    await async_wait_for(lambda: server.started, 10, "the proxy's HTTP server to start")
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    ctx = zmq.asyncio.Context()
    harness = Harness(pool, httpx.AsyncClient(base_url=url, timeout=10.0), ctx, [])
    try:
        yield harness
    finally:
        for fake in harness.instances:
            await fake.close()
        await harness.http.aclose()
        server.should_exit = True
        await serving
        sock.close()
        await pool.close()
        ctx.term()


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "def hello(world):", "max_tokens": 7, **fields}


async def eventually(check, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


# ---- no instances, bad requests ---------------------------------------------------------------
def test_missing_roles_are_503_at_once_and_health_names_them():
    async def scenario() -> None:
        async with proxy(api_key="sekrit") as h:
            auth = {"Authorization": "Bearer sekrit"}
            assert (await h.http.post("/v1/completions", json=completion())).status_code == 401
            start = time.monotonic()
            r = await h.http.post("/v1/completions", json=completion(), headers=auth)
            assert r.status_code == 503 and "prefill (kv_producer)" in r.json()["error"]["message"]
            assert time.monotonic() - start < 2
            health = await h.http.get("/health")
            assert health.status_code == 503 and "prefill" in health.text
            assert "decode" in health.text
            models = await h.http.get("/v1/models", headers=auth)
            assert models.json() == {"object": "list", "data": []}
            await h.instance("p0", "kv_producer")
            r = await h.http.post("/v1/chat/completions", headers=auth, json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 503
            assert "decode (kv_consumer)" in r.json()["error"]["message"]
            health = await h.http.get("/health")
            assert health.status_code == 503 and "prefill" not in health.text
            await h.instance("d0", "kv_consumer")
            assert (await h.http.get("/health")).status_code == 200
            (model,) = (await h.http.get("/v1/models", headers=auth)).json()["data"]
            assert model["id"] == MODEL and model["max_model_len"] == 128

    run(scenario())


def test_bad_requests_are_answered_by_the_proxy_without_any_instance():
    async def scenario() -> None:
        async with proxy(max_request_bytes=4096) as h:
            p, d = await h.pair()
            post = h.http.post
            r = await post("/v1/completions", content=b"{not json",
                           headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
            r = await post("/v1/completions", json=completion(max_tokens="seven"))
            assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
            r = await post("/v1/chat/completions", json={"model": MODEL, "messages": []})
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
            r = await post("/v1/completions", json=completion(logit_bias={"1": 1.0}))
            assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
            r = await post("/v1/completions", json=completion(model="other"))
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            r = await post("/v1/completions", json=completion(prompt="x" * 5000))
            assert r.status_code == 413
            # a good request last: it reaches each instance behind anything sent before it
            r = await post("/v1/completions", json=completion(prompt="the good one"))
            assert r.status_code == 200, r.text
            for instance in (p, d):
                assert [json.loads(m.body)["prompt"] for m in instance.received] == \
                    ["the good one"]
            assert 'reason="invalid_request"} 5.0' in await h.metrics()

    run(scenario())


# ---- the flow ---------------------------------------------------------------------------------
@pytest.mark.parametrize("send_type", ["PUT", "GET"])
def test_prefill_leg_is_rewritten_and_decode_leg_gets_the_original(send_type):
    async def scenario() -> None:
        async with proxy() as h:
            p, d = await h.pair(send_type)
            body = json.dumps(completion(n=2, min_tokens=3, best_of=2, temperature=0.5))
            r = await h.http.post("/v1/completions", content=body.encode(),
                                  headers={"Content-Type": "application/json"})
            assert r.status_code == 200 and r.content == b"".join(JSON_CHUNKS)
            (prefill,) = p.requests()
            assert prefill.route == "/v1/completions" and prefill.do_remote_decode
            sent = json.loads(prefill.body)
            expected = {**json.loads(body), "max_tokens": 1, "stream": False, "n": 1,
                        "min_tokens": 0}
            del expected["best_of"]  # best_of == n would no longer hold with n = 1
            assert sent == expected
            if send_type == "GET":
                assert prefill.push_to is None
            else:
                push = prefill.push_to
                assert push is not None and push.kv_endpoint == d.kv_endpoint
                assert push.compat_hash == kv_compat_hash(FIELDS) and push.send_type == "PUT"
                assert len(push.lease_id) == 32 and push.block_ids == []
            (decode,) = d.requests()
            assert decode.body == body.encode() and not decode.do_remote_decode
            assert decode.kv_transfer_params == p.params and decode.push_to is None
            assert decode.request_id == prefill.request_id
            assert decode.request_id.startswith("cmpl-")
            assert p.aborts() == [] and d.aborts() == []

    run(scenario())


def test_streaming_is_passed_through_byte_for_byte():
    async def scenario() -> None:
        async with proxy() as h:
            p, d = await h.pair()
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                    "stream": True, "stream_options": {"include_usage": True},
                    "max_completion_tokens": 9}
            async with h.http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                assert r.headers["cache-control"] == "no-cache"
                assert r.headers["x-accel-buffering"] == "no"
                data = b"".join([chunk async for chunk in r.aiter_raw()])
            assert data == b"".join(SSE_CHUNKS)
            (prefill,) = p.requests()
            sent = json.loads(prefill.body)
            assert sent["stream"] is False and "stream_options" not in sent
            assert sent["max_tokens"] == 1 and sent["max_completion_tokens"] == 1
            assert prefill.request_id.startswith("chatcmpl-")
            (decode,) = d.requests()
            assert json.loads(decode.body) == body
            text = await h.metrics()
            assert "ppengine:proxy_time_to_first_token_seconds_count 1.0" in text
            assert "ppengine:proxy_e2e_request_latency_seconds_count 1.0" in text

    run(scenario())


def test_kv_both_instances_run_requests_alone_unless_a_producer_is_less_loaded():
    """A pool of kv_both instances balances whole requests (one leg each, no KV transfer); a
    less loaded kv_producer prefills for a kv_both decoder; a lone kv_consumer gets its
    prefill from a kv_both instance."""
    async def scenario() -> None:
        async with proxy() as h:
            b0 = await h.instance("b0", "kv_both")
            b1 = await h.instance("b1", "kv_both")
            assert (await h.http.get("/health")).status_code == 200
            for _ in range(4):
                r = await h.http.post("/v1/completions", json=completion())
                assert r.status_code == 200 and r.content == b"".join(JSON_CHUNKS)
            for both in (b0, b1):  # two requests each, round robin, each a plain request
                assert len(both.requests()) == 2
                assert all(not q.do_remote_decode and q.push_to is None
                           and q.kv_transfer_params == [] for q in both.requests())
            assert 'role="colocated"' in await h.metrics()
            b0.load = b1.load = Load(num_running=5)
            p0 = await h.instance("p0", "kv_producer")
            await eventually(lambda: all(i.load.num_running == 5 for i in h.pool.instances()
                                         if i.instance_id != "p0"))
            r = await h.http.post("/v1/completions", json=completion())
            assert r.status_code == 200
            (prefill,) = p0.requests()
            assert prefill.do_remote_decode and prefill.push_to is not None
            decoder = b0 if len(b0.requests()) == 3 else b1
            assert decoder.requests()[-1].kv_transfer_params == p0.params
        async with proxy() as h:
            d0 = await h.instance("d0", "kv_consumer")
            b0 = await h.instance("b0", "kv_both")
            b0.load = Load(num_running=9)  # the lone consumer decodes all the same
            await eventually(lambda: h.pool.registry.instances["b0"].load.num_running == 9)
            r = await h.http.post("/v1/completions", json=completion())
            assert r.status_code == 200
            (prefill,) = b0.requests()
            assert prefill.do_remote_decode and d0.requests()[0].kv_transfer_params == b0.params

    run(scenario())


def test_routing_follows_reported_load_and_a_new_instance_takes_work_at_once():
    async def scenario() -> None:
        async with proxy() as h:
            p0 = await h.instance("p0", "kv_producer")
            d0 = await h.instance("d0", "kv_consumer")
            d1 = await h.instance("d1", "kv_consumer")
            d0.load = Load(num_running=3, num_free_blocks=10, num_total_blocks=100)
            d1.load = Load(num_running=1, num_waiting=4, num_free_blocks=90,
                           num_total_blocks=100)
            await eventually(lambda: h.pool.registry.instances["d1"].load.num_waiting == 4)
            r = await h.http.post("/v1/completions", json=completion())
            assert r.status_code == 200 and len(d0.requests()) == 1 and not d1.requests()
            d1.load = Load(num_running=3, num_free_blocks=90, num_total_blocks=100)
            registry = h.pool.registry
            await eventually(lambda: registry.instances["d1"].load.num_waiting == 0
                             and registry.instances["d0"].picked_since_beat == 0)
            r = await h.http.post("/v1/completions", json=completion())  # equal load: the
            assert r.status_code == 200 and len(d1.requests()) == 1  # emptier KV cache wins
            d2 = await h.instance("d2", "kv_consumer")  # joins idle: takes the next ones
            for _ in range(2):
                assert (await h.http.post("/v1/completions", json=completion())).status_code \
                    == 200
            assert len(d2.requests()) == 2
            assert len(p0.requests()) == 4
            text = await h.metrics()
            assert 'ppengine:proxy_instance_load{instance="d0",role="kv_consumer"} 3.0' in text
            assert "ppengine:proxy_unrouted_responses_total 0.0" in text

    run(scenario())


def test_prefill_error_is_passed_through_and_decode_never_asked():
    async def scenario() -> None:
        async with proxy() as h:
            p, d = await h.pair()
            p.mode = "reject"
            r = await h.http.post("/v1/completions", json=completion(stream=True))
            assert r.status_code == 400
            assert r.content == b'{"error":{"message":"too long"}}'
            assert len(p.requests()) == 1 and d.received == []

    run(scenario())


def test_registration_refuses_mismatches_and_survives_garbage():
    async def scenario() -> None:
        async with proxy() as h:
            await h.instance("p0", "kv_producer")
            junk = h.ctx.socket(zmq.DEALER)
            junk.setsockopt(zmq.LINGER, 0)
            junk.connect(h.pool.discovery_address)
            for frame in (b"\xff\x00garbage", ENCODER.encode({"type": "Nope"}), b""):
                await junk.send(frame)
            junk.close()
            bad = FakeInstance(h.ctx, h.pool.discovery_address, "d0", "kv_consumer",
                               fields={**FIELDS, "block_size": "32"})
            h.instances.append(bad)
            reply = await bad.start()
            assert reply is not None and reply.error is not None and "block_size" in reply.error
            other = FakeInstance(h.ctx, h.pool.discovery_address, "d1", "kv_consumer",
                                 model_name="another-model")
            h.instances.append(other)
            reply = await other.start()
            assert reply is not None and reply.error is not None
            assert "another-model" in reply.error
            nowhere = FakeInstance(h.ctx, h.pool.discovery_address, "d3", "kv_consumer")
            h.instances.append(nowhere)
            nowhere.router = h.ctx.socket(zmq.ROUTER)  # registers a bogus request address
            nowhere.kv_router = h.ctx.socket(zmq.ROUTER)
            nowhere.dealer = h.ctx.socket(zmq.DEALER)
            nowhere.dealer.setsockopt(zmq.LINGER, 0)
            nowhere.dealer.connect(h.pool.discovery_address)
            await nowhere.dealer.send(ENCODER.encode(Register(
                "d3", "kv_consumer", "not an endpoint", "tcp://x:1", FIELDS, model_name=MODEL)))
            reply = msgspec.msgpack.decode(await asyncio.wait_for(nowhere.dealer.recv(), 3),
                                           type=RegisterReply)
            assert reply.error is not None and "not an endpoint" in reply.error
            # without keys, an instance on another host is refused (its prompts would travel
            # in the clear): loopback only, unless the proxy runs with --insecure-tcp
            await nowhere.dealer.send(ENCODER.encode(Register(
                "d3", "kv_consumer", "tcp://10.9.8.7:5000", "tcp://127.0.0.1:1", FIELDS,
                model_name=MODEL)))
            reply = msgspec.msgpack.decode(await asyncio.wait_for(nowhere.dealer.recv(), 3),
                                           type=RegisterReply)
            assert reply.error is not None and "not on this host" in reply.error
            assert "10.9.8.7" in reply.error
            assert set(h.pool.registry.instances) == {"p0"}
            assert (await h.http.get("/health")).status_code == 503
            await h.instance("d2", "kv_consumer")  # a good one still gets in
            assert (await h.http.get("/health")).status_code == 200

    run(scenario())


# ---- faults -----------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["stops_heartbeating", "never_answers"])
def test_failed_prefill_is_retried_on_the_other_prefill_instance(how):
    async def scenario() -> None:
        async with proxy(request_timeout_s=1.0) as h:
            p0 = await h.instance("p0", "kv_producer")  # picked first (ties go by id)
            p1 = await h.instance("p1", "kv_producer")
            d = await h.instance("d0", "kv_consumer")
            p0.mode = "silent"
            if how == "stops_heartbeating":
                p0.beating = False
            start = time.monotonic()
            r = await h.http.post("/v1/completions", json=completion())
            assert r.status_code == 200 and r.content == b"".join(JSON_CHUNKS)
            assert time.monotonic() - start < 4
            (first,) = p0.requests()
            (second,) = p1.requests()
            (decode,) = d.requests()
            assert first.request_id != second.request_id == decode.request_id
            if how == "never_answers":  # still alive: told to drop the request
                await eventually(lambda: [a.request_id for a in p0.aborts()] == [
                    first.request_id])
            text = await h.metrics()
            assert "ppengine:proxy_retries_total 1.0" in text
            assert 'ppengine:proxy_requests_total{instance="p1",role="prefill"} 1.0' in text

    run(scenario())


def test_lone_decode_instance_failing_is_an_error_in_bounded_time():
    async def scenario() -> None:
        async with proxy() as h:
            _p, d = await h.pair()
            d.mode, d.beating = "silent", False
            start = time.monotonic()
            r = await h.http.post("/v1/completions", json=completion())
            assert time.monotonic() - start < 3
            assert r.status_code == 502
            error = r.json()["error"]
            assert "decode instance d0" in error["message"] and error["code"] == "instance_failed"
            assert len(d.requests()) == 1
            assert 'reason="instance_failed"} 1.0' in await h.metrics()

    run(scenario())


def test_reregistering_at_a_new_address_fails_requests_on_the_old_one_at_once():
    async def scenario() -> None:
        async with proxy() as h:
            _p, d = await h.pair()
            d.mode = "silent"
            request = asyncio.create_task(h.http.post("/v1/completions", json=completion()))
            await eventually(lambda: len(d.requests()) == 1)
            start = time.monotonic()
            await h.instance("d0", "kv_consumer")  # d0 restarted: a new request address
            r = await request
            assert time.monotonic() - start < 1
            assert r.status_code == 502 and "new request address" in r.json()["error"]["message"]
            r = await h.http.post("/v1/completions", json=completion())  # the new d0 serves
            assert r.status_code == 200 and r.content == b"".join(JSON_CHUNKS)

    run(scenario())


def test_many_concurrent_requests_all_complete_and_loads_return_to_zero():
    async def scenario() -> None:
        async with proxy() as h:
            await h.instance("p0", "kv_producer")
            await h.instance("p1", "kv_producer", send_type="GET")
            await h.instance("d0", "kv_consumer")
            await h.instance("d1", "kv_both")

            async def one(i: int) -> bytes:
                if i % 2:
                    r = await h.http.post("/v1/completions", json=completion())
                    assert r.status_code == 200
                    return r.content
                async with h.http.stream("POST", "/v1/completions",
                                         json=completion(stream=True)) as r:
                    return b"".join([c async for c in r.aiter_raw()])

            answers = await asyncio.gather(*(one(i) for i in range(60)))
            for i, answer in enumerate(answers):
                assert answer == b"".join(JSON_CHUNKS if i % 2 else SSE_CHUNKS)
            assert all(i.in_flight == 0 for i in h.pool.instances())
            legs = [q for f in h.instances for q in f.requests()]
            prefills = [q for q in legs if q.do_remote_decode]
            colocated = [q for q in legs if not q.do_remote_decode and not q.kv_transfer_params]
            assert len(legs) - len(prefills) == 60  # one decode (or colocated) leg each
            assert len(prefills) + len(colocated) == 60  # the rest were prefilled apart

    run(scenario())


def test_decode_timeout_is_504_and_aborted():
    async def scenario() -> None:
        async with proxy(request_timeout_s=0.5) as h:
            _p, d = await h.pair()
            d.mode = "silent"
            r = await h.http.post("/v1/completions", json=completion())
            assert r.status_code == 504 and r.json()["error"]["code"] == "instance_timeout"
            assert "decode instance d0" in r.json()["error"]["message"]
            await eventually(lambda: len(d.aborts()) == 1)
            # D never took the KV: P's lease on it ends now, and D drops what was pushed
            await eventually(lambda: _p.kv_received == [ReleaseKV("lease-x")]
                             and d.kv_received == [ReleaseKV("lease-x")])

    run(scenario())


def test_decode_dying_mid_stream_ends_the_stream_with_an_error_event():
    async def scenario() -> None:
        async with proxy() as h:
            _p, d = await h.pair()
            d.mode = "hang"
            start = time.monotonic()
            async with h.http.stream("POST", "/v1/completions",
                                     json=completion(stream=True)) as r:
                assert r.status_code == 200
                d.beating = False  # after the first chunk, D goes silent for good
                data = b"".join([chunk async for chunk in r.aiter_raw()])
            assert time.monotonic() - start < 4
            assert data.startswith(SSE_CHUNKS[0]) and data.endswith(b"data: [DONE]\n\n")
            events = [e for e in data.decode().split("\n\n") if e]
            error = json.loads(events[1].removeprefix("data: "))["error"]
            assert "decode instance d0" in error["message"] and len(events) == 3

    run(scenario())


@pytest.mark.parametrize("leg", ["prefill", "decode", "decode_stream"])
def test_client_disconnect_aborts_the_request_on_the_instance(leg):
    async def scenario() -> None:
        async with proxy() as h:
            p, d = await h.pair()
            if leg == "decode_stream":
                d.mode = "hang"
                async with h.http.stream("POST", "/v1/completions",
                                         json=completion(stream=True)) as r:
                    async for chunk in r.aiter_raw():
                        assert chunk == SSE_CHUNKS[0]
                        break
            else:
                (p if leg == "prefill" else d).mode = "silent"
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(h.http.post("/v1/completions", json=completion()),
                                           0.5)
            target = p if leg == "prefill" else d
            await eventually(lambda: len(target.aborts()) == 1)
            assert target.aborts()[0].request_id == target.requests()[0].request_id
            if leg == "prefill":
                assert d.received == []
            elif leg == "decode":  # gone before D took the KV: P's lease ends at once
                await eventually(lambda: p.kv_received == [ReleaseKV("lease-x")])
            assert p.aborts() == [] or leg == "prefill"
            await eventually(lambda: all(i.in_flight == 0 for i in h.pool.instances()))
            text = await h.metrics()
            assert 'reason="client_disconnected"} 1.0' in text
            if leg == "decode_stream":  # D was streaming: it had the KV, nothing to release.
                # A request whose decode leg is cut short releases its lease: on the proxy's
                # one KV socket to P, behind any release sent for the stream before it.
                d.mode = "silent"
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(h.http.post("/v1/completions", json=completion()),
                                           0.5)
                await eventually(lambda: p.kv_received != [])
                assert p.kv_received == [ReleaseKV("lease-x")]  # that one alone

    run(scenario())


def test_metrics_count_requests_per_instance_and_instances_per_role():
    async def scenario() -> None:
        async with proxy() as h:
            await h.pair()
            for _ in range(3):
                r = await h.http.post("/v1/completions", json=completion())
                assert r.status_code == 200
            text = await h.metrics()
            assert 'ppengine:proxy_requests_total{instance="p0",role="prefill"} 3.0' in text
            assert 'ppengine:proxy_requests_total{instance="d0",role="decode"} 3.0' in text
            assert 'ppengine:proxy_instances{role="kv_producer"} 1.0' in text
            assert 'ppengine:proxy_instances{role="kv_both"} 0.0' in text
            assert "ppengine:proxy_prefill_latency_seconds_count 3.0" in text
            assert all(i.in_flight == 0 for i in h.pool.instances())

    run(scenario())


# ---- security and the command line ------------------------------------------------------------
def test_curve_keys_admit_only_instances_with_the_client_key(tmp_path):
    keys_dir = str(tmp_path / "keys")
    assert cli_main(["keys", keys_dir]) == 0
    client, server = load_client_keys(keys_dir), load_server_keys(keys_dir)

    async def scenario() -> None:
        async with proxy(zmq_keys=keys_dir) as h:
            await h.instance("p0", "kv_producer", keys=client, server_keys=server)
            await h.instance("d0", "kv_consumer", keys=client, server_keys=server)
            r = await h.http.post("/v1/completions", json=completion())
            assert r.status_code == 200 and r.content == b"".join(JSON_CHUNKS)
            stranger = FakeInstance(h.ctx, h.pool.discovery_address, "x0", "kv_consumer")
            h.instances.append(stranger)
            assert await stranger.start(reply_timeout_s=1.0) is None
            assert "x0" not in h.pool.registry.instances

    run(scenario())


def test_proxy_command_refuses_tcp_without_keys_and_a_port_in_use(capsys):
    """Loopback discovery needs no keys; any other address needs keys or --insecure-tcp."""
    assert cli_main(["proxy", "--port", "0", "--discovery-port", "0",
                     "--discovery-host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--insecure-tcp" in err and "0.0.0.0" in err
    busy = listen("127.0.0.1", 0)
    busy.listen()
    try:
        port = str(busy.getsockname()[1])
        assert cli_main(["proxy", "--insecure-tcp", "--port", port, "--discovery-port", "0"]) == 2
        assert "cannot listen" in capsys.readouterr().err
    finally:
        busy.close()


def test_proxy_command_exits_0_on_sigterm(tmp_path):
    port = free_port()
    proxy = CliProcess(["proxy", "--insecure-tcp", "--port", str(port), "--discovery-port", "0",
                        "--uvicorn-log-level", "warning"], str(tmp_path / "proxy.log"))
    try:
        def up() -> bool:  # 503 while no instance is registered
            assert proxy.alive(), proxy.log()
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 503
            return False

        wait_for(up, 15, "the proxy to come up", proxy.log)
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(timeout=10) == 0, proxy.log()
    finally:
        proxy.stop()
