"""The instance side of prefill/decode disaggregation (`DisaggInstance`) shared by two proxies.

A real `DisaggInstance` (its OpenAI app replaced by a small ASGI app that streams the prompt back
word by word) registers with two in-process proxies. Checked: every response goes to the proxy
that accepted the request (the typed `reply_to`), never to the other; a request naming a proxy
the instance is not registered with is refused; a proxy that dies has its requests aborted on
the instance while the other proxy's streams run on; without the CurveZMQ keys nobody can send
the instance a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import msgspec
import pytest
import zmq

from engine_core.entrypoints.http.discovery_wire import Load
from engine_core.entrypoints.http.instance_wire import ProxyRequest
from engine_core.entrypoints.openai.instance import PROXY_TIMEOUT_S, DisaggInstance
from engine_core.entrypoints.openai.proxied import KVTransferRequest, KVTransferResult
from engine_core.kv_transfer_config import KVTransferConfig
from engine_core.transfer_params import KVTransferParams
from engine_core.transport import create_keys, load_client_keys, secure_client
from tests.servers import free_port
from tests.test_disagg_proxy import FIELDS, MODEL, eventually, proxy, run

pytestmark = pytest.mark.timeout(60)
BEATS = {"heartbeat_timeout_s": 3.0}  # a real instance beats every second


class EchoApp:
    """Stands in for the OpenAI serving (`proxied.ProxiedApp`): streams each word of the prompt
    as an SSE event, `delay_s` apart, then `[DONE]`, and returns one KV transfer param per word
    (`KVTransferParams` named after it). Records the prompts it started, the transfer side each
    came with, and those whose client went away (the instance turns an abort into an ASGI
    disconnect or a failing send)."""

    def __init__(self, delay_s: float = 0.01) -> None:
        self.delay_s = delay_s
        self.started: list[str] = []
        self.transfers: list[KVTransferRequest] = []
        self.disconnected: list[str] = []

    async def __call__(self, scope: dict, receive: Any, send: Any,
                       kv_transfer: KVTransferRequest) -> KVTransferResult:
        prompt = json.loads((await receive())["body"])["prompt"]
        self.started.append(prompt)
        self.transfers.append(kv_transfer)
        await self._stream(prompt, receive, send)
        return KVTransferResult(tuple(_params(word) for word in prompt.split()))

    async def _stream(self, prompt: str, receive: Any, send: Any) -> None:
        disconnect = asyncio.ensure_future(receive())
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for word in prompt.split():
                if disconnect.done():
                    self.disconnected.append(prompt)
                    return
                await send({"type": "http.response.body", "body": f"data: {word}\n\n".encode(),
                            "more_body": True})
                await asyncio.sleep(self.delay_s)  # paces the words, as a model would
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                        "more_body": False})
        except OSError:  # aborted while sending
            self.disconnected.append(prompt)
        finally:
            disconnect.cancel()


def _params(name: str, lease_id: str = "") -> KVTransferParams:
    return KVTransferParams(kv_endpoint=f"tcp://{name}:1", block_ids=[1], num_tokens=16,
                            compat_hash="h", lease_id=lease_id or name)


def _expected(prompt: str) -> bytes:
    return b"".join(f"data: {w}\n\n".encode() for w in prompt.split()) + b"data: [DONE]\n\n"


@contextlib.asynccontextmanager
async def instance(app: EchoApp, *harnesses, keys: str | None = None):
    """A kv_both DisaggInstance registered with every proxy of `harnesses` (asserted)."""
    addresses = ",".join(h.pool.discovery_address.removeprefix("tcp://") for h in harnesses)
    config = KVTransferConfig(kv_role="kv_both", kv_port=free_port(), proxy_address=addresses,
                              zmq_keys=keys)
    refused: list[str] = []
    inst = DisaggInstance(app, config, FIELDS, MODEL, 128, Load, refused.append)
    await inst.start()
    try:
        await eventually(lambda: all(link.proxy_id for link in inst.links), 5)
        assert {link.proxy_id for link in inst.links} == {h.pool.proxy_id for h in harnesses}
        yield inst
    finally:
        await inst.close()
    assert refused == []


async def _stream(harness, prompt: str) -> bytes:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream": True}
    async with harness.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        return b"".join([chunk async for chunk in r.aiter_raw()])


def test_each_proxy_gets_only_its_own_responses_and_forged_return_addresses_are_refused():
    async def scenario() -> None:
        app = EchoApp()
        async with proxy(**BEATS) as a, proxy(**BEATS) as b, instance(app, a, b) as inst:
            jobs = [(h, f"{name}{i} " + " ".join(f"w{i}.{k}" for k in range(6)))
                    for name, h in (("a", a), ("b", b)) for i in range(12)]
            answers = await asyncio.gather(*(_stream(h, p) for h, p in jobs))
            for (_, prompt), answer in zip(jobs, answers):
                assert answer == _expected(prompt)
            for h in (a, b):
                text = await h.metrics()
                assert "ppengine:proxy_unrouted_responses_total 0.0" in text
                series = f'instance="{inst.instance_id}",role="colocated"'
                assert f"ppengine:proxy_requests_total{{{series}}} 12.0" in text
            # a peer that names no registered proxy, or another one than itself, is refused
            ctx = zmq.asyncio.Context.instance()
            for routing_id, reply_to in ((b"proxy-forged", "proxy-forged"),
                                         (b"someone", a.pool.proxy_id)):
                rogue = ctx.socket(zmq.DEALER)
                rogue.setsockopt(zmq.LINGER, 0)
                rogue.setsockopt(zmq.ROUTING_ID, routing_id)
                rogue.connect(inst.request_address)
                body = json.dumps({"model": MODEL, "prompt": "forged"}).encode()
                await rogue.send(msgspec.msgpack.encode(ProxyRequest(
                    "x1", "/v1/completions", body, reply_to=reply_to)))
                assert not await rogue.poll(500)
                rogue.close()
            assert "forged" not in app.started
            assert len(app.started) == 24

    run(scenario())


def test_a_dead_proxy_has_its_requests_aborted_and_the_other_keeps_serving():
    async def scenario() -> None:
        app = EchoApp(delay_s=0.1)
        async with proxy(**BEATS) as b:
            stack = contextlib.AsyncExitStack()
            a = await stack.enter_async_context(proxy(**BEATS))
            async with instance(app, a, b) as inst:
                words = " ".join(f"w{k}" for k in range(60))  # 6 s of streaming each
                a_prompts = [f"a{i} {words}" for i in range(3)]
                b_prompts = [f"b{i} {words[:120]}" for i in range(3)]
                a_jobs = [asyncio.ensure_future(_stream(a, p)) for p in a_prompts]
                b_jobs = [asyncio.ensure_future(_stream(b, p)) for p in b_prompts]
                await eventually(lambda: len(app.started) == 6, 5)
                (a_link,) = [link for link in inst.links if link.proxy_id == a.pool.proxy_id]
                await stack.aclose()  # proxy a goes away, its clients with it
                await asyncio.gather(*a_jobs, return_exceptions=True)
                await eventually(lambda: a_link.proxy_id is None, PROXY_TIMEOUT_S + 2)
                await eventually(lambda: sorted(app.disconnected) == sorted(a_prompts), 3)
                for prompt, answer in zip(b_prompts, await asyncio.gather(*b_jobs)):
                    assert answer == _expected(prompt)
                assert inst.registered.is_set()  # still registered with b
                assert await _stream(b, "after the fall") == _expected("after the fall")

    run(scenario())


def test_without_the_keys_no_request_reaches_the_instance(tmp_path):
    keys = str(tmp_path / "keys")
    create_keys(keys)

    async def scenario() -> None:
        app = EchoApp()
        async with proxy(zmq_keys=keys, **BEATS) as a, instance(app, a, keys=keys) as inst:
            assert await _stream(a, "with keys") == _expected("with keys")
            ctx = zmq.asyncio.Context.instance()
            body = json.dumps({"model": MODEL, "prompt": "no keys"}).encode()
            for curve in (None, load_client_keys(keys)):  # plain, then the right client keys
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.ROUTING_ID, a.pool.proxy_id.encode() + b"-x")
                secure_client(sock, curve)
                sock.connect(inst.request_address)
                await sock.send(msgspec.msgpack.encode(ProxyRequest(
                    "x1", "/v1/completions", body, reply_to=a.pool.proxy_id)))
                assert not await sock.poll(500)
                sock.close()
            assert app.started == ["with keys"]  # neither got in (the second: a forged id)

    run(scenario())


def test_the_transfer_side_is_a_typed_argument_and_the_returned_params_end_the_answer():
    """A prefill leg: the app is called with the request's transfer side as a
    `KVTransferRequest` (nothing in the ASGI scope), and the last chunk of the answer carries
    the params the app returned; a decode leg's answer carries none."""

    async def scenario() -> None:
        app = EchoApp()
        async with proxy(**BEATS) as a, instance(app, a):
            (info,) = a.pool.instances()
            push_to = _params("decoder", lease_id="lease")
            sent_in = [_params("p0"), None]
            legs = [(ProxyRequest("r1", "/v1/completions", _body("x y"),
                                  do_remote_decode=True, push_to=push_to),
                     [_params("x"), _params("y")]),
                    (ProxyRequest("r2", "/v1/completions", _body("z"),
                                  kv_transfer_params=sent_in), [])]
            for message, returned in legs:
                leg = a.pool.open(info, message.request_id, "prefill")
                try:
                    leg.send(message)
                    head, chunks = await leg.read_all()
                finally:
                    leg.release()
                assert head.status == 200
                assert all(c.kv_transfer_params == [] for c in chunks[:-1])
                assert chunks[-1].kv_transfer_params == returned
            assert app.transfers == [
                KVTransferRequest(do_remote_decode=True, push_to=push_to),
                KVTransferRequest(params_in=tuple(sent_in))]
            assert app.transfers[0].params_for(1).lease_id == "lease-1"
            assert app.transfers[1].params_for(0) == sent_in[0]
            assert app.transfers[1].params_for(5) is None

    run(scenario())


def _body(prompt: str) -> bytes:
    return json.dumps({"model": MODEL, "prompt": prompt}).encode()
