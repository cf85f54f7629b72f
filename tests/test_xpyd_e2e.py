"""xPyD end to end: two `pp-engine proxy` processes sharing two prefill and two decode
instances (`pp-engine serve --kv-transfer-config`), driven by the official `openai` client.

- 64 concurrent streams, half through each proxy, over CurveZMQ: every greedy output equals a
  single `pp-engine serve`'s, each proxy answers only its own requests, the decode instances
  computed only the tails of the prompts, and every KV block comes back.
- One decode instance has no room to buffer pushed KV: every push to it is held and it pulls
  the KV instead (GET).
- Garbage at every socket is dropped; a process without the keys can neither register, nor send
  an instance a request, nor pull KV; a client that disconnects mid-stream frees everything.
- A proxy killed mid-stream: the instances drop its return address and abort its requests, the
  other proxy's streams run to their end.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import openai
import pytest
import zmq

from engine_core.entrypoints.http.discovery_wire import Register
from engine_core.entrypoints.http.instance_wire import ProxyRequest
from engine_core.kv_transfer.kv_wire import PullKV, PushOffer, PushReply
from engine_core.transport import create_keys, load_client_keys, secure_client
from tests.servers import ServerProcess, connect_and_handshake
from tests.test_disagg_e2e import MAX_TOKENS, MODEL, WORDS, _complete, model_dir  # noqa: F401
from tests.xpyd_cluster import BLOCK, MAX_MODEL_LEN, XPyDCluster, xpyd_cluster

PROMPTS = [(WORDS * 20)[:n] for n in (3, 24, 70, 160, 330, 520, 800, 1200)]
NUM_STREAMS = 64


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory) -> dict[str, tuple[str, list[int]]]:  # noqa: F811
    """Each prompt's greedy completion from one plain `pp-engine serve`."""
    log = str(tmp_path_factory.mktemp("xpyd-ref") / "serve.log")
    server = ServerProcess(model_dir, log, "--max-model-len", str(MAX_MODEL_LEN),
                           "--block-size", str(BLOCK))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                               timeout=60)
        return {p: _complete(client, p, stream=False) for p in PROMPTS}
    finally:
        server.stop()


async def stream(client: openai.AsyncOpenAI, prompt: str, max_tokens: int = MAX_TOKENS,
                 on_chunk=None) -> tuple[str, list[int]]:
    """A streamed greedy completion: (text, token ids)."""
    text, ids = "", []
    response = await client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
        extra_body={"return_token_ids": True, "ignore_eos": True})
    async for chunk in response:
        for choice in chunk.choices:
            text += choice.text
            ids.extend((choice.model_extra or {}).get("token_ids") or [])
        if on_chunk is not None:
            on_chunk(len(ids))
    return text, ids


class Progress:
    """How many tokens each tracked stream has received so far."""

    def __init__(self) -> None:
        self.tokens: dict[int, int] = {}

    def track(self, key: int):
        """The `on_chunk` callback of stream `key`."""
        return lambda n: self.tokens.__setitem__(key, n)

    async def until_streaming(self, count: int, min_tokens: int = 3,
                              timeout_s: float = 60.0) -> None:
        """Until `count` streams have each received at least `min_tokens` tokens."""
        deadline = time.monotonic() + timeout_s
        while len(self.tokens) < count or min(self.tokens.values()) < min_tokens:
            assert time.monotonic() < deadline, self.tokens
            await asyncio.sleep(0.05)


async def many_streams(c: XPyDCluster, count: int) -> list[tuple[str, tuple[str, list[int]]]]:
    """`count` concurrent streams spread over every live proxy: (prompt, result) each."""
    clients = [p.async_client() for p in c.live_proxies()]
    jobs = [(clients[i % len(clients)], PROMPTS[i % len(PROMPTS)]) for i in range(count)]
    try:
        results = await asyncio.gather(*(stream(client, p) for client, p in jobs))
    finally:
        for client in clients:
            await client.close()
    return [(prompt, result) for (_, prompt), result in zip(jobs, results)]


def _replied(ctx: zmq.Context, messages: list[tuple[str, list[bytes], object]]) -> list[str]:
    """Send each (address, frames, client keys or None) from a fresh DEALER; the addresses
    that answered. Each connection's CURVE handshake is waited for first: with the keys it must
    succeed (the frames reach the peer, which then has 1.5 s to answer: nothing marks a dropped
    frame at every kind of socket), without them it must fail (nothing can be read)."""
    sockets = []
    try:
        for address, frames, keys in messages:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            secure_client(sock, keys)
            sockets.append((address, sock))
            attached = connect_and_handshake(sock, address)
            assert attached == (keys is not None), (address, keys is not None)
            if attached:
                sock.send_multipart(frames)
        time.sleep(1.5)  # the window to answer, opened by each handshake above
        return [address for address, sock in sockets if sock.poll(0)]
    finally:
        for _, sock in sockets:
            sock.close()


def _hostile_peers(c: XPyDCluster, keys_dir: str) -> None:
    """Garbage with the right keys at every socket, then honest messages without them."""
    keys = load_client_keys(keys_dir)
    encode = msgspec.msgpack.encode
    discovery = [f"tcp://{p.discovery}" for p in c.proxies]
    requests = [a for p in c.proxies for a in p.request_addresses().values()]
    kv = [i.kv_endpoint for i in c.instances]
    assert len(requests) == 2 * len(c.instances)
    garbage = ([b"\xff\x00garbage"], [b""], [encode({"type": "Nope"})], [b"a", b"b", b"c"])
    ctx = zmq.Context()
    try:
        assert _replied(ctx, [(address, frames, keys) for address in discovery + requests + kv
                              for frames in garbage]) == []
        for address in kv:  # a push offer of another KV layout is refused, not buffered
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            secure_client(sock, keys)
            sock.connect(address)
            sock.send(encode(PushOffer("rogue", "0" * 16, 1, 1024)))
            assert sock.poll(5000), address
            reply = msgspec.msgpack.decode(sock.recv(), type=PushReply)
            assert not reply.accepted and reply.lease_id == "rogue"
            sock.close()
        # without the keys the CURVE handshake fails: nothing is read, nothing answered
        register = encode(Register("intruder", "kv_consumer", requests[0], kv[0], {},
                                   model_name=MODEL))
        body = encode(ProxyRequest("x1", "/v1/completions", b'{"model": "m", "prompt": "x"}',
                                   reply_to="intruder"))
        pull = encode(PullKV("lease", "0" * 16))
        assert _replied(ctx, [(a, [register], None) for a in discovery]
                        + [(a, [body], None) for a in requests]
                        + [(a, [pull], None) for a in kv]) == []
    finally:
        ctx.destroy(linger=0)
    for proxy in c.proxies:
        assert proxy.metric('ppengine:proxy_instances{role="kv_consumer"}') == 2


def test_two_proxies_share_2p2d_under_64_streams_over_curvezmq(model_dir, reference,  # noqa: F811
                                                               tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xpyd-2p2d")
    keys = str(tmp / "keys")
    create_keys(keys)
    with xpyd_cluster(model_dir, str(tmp), num_proxies=2, keys_dir=keys) as c:
        c.add("kv_producer", "PUT_ASYNC")
        c.add("kv_producer", "PUT")
        c.add("kv_consumer")
        tight = c.add("kv_consumer", kv_buffer_size=1, kv_overflow_size=1)  # pushes held
        c.wait_registered()

        results = asyncio.run(many_streams(c, NUM_STREAMS))
        for prompt, result in results:
            assert result == reference[prompt], prompt[:30]
        for proxy in c.proxies:  # each proxy got back exactly its own 32 streams
            assert proxy.metric("ppengine:proxy_unrouted_responses_total") == 0
            text = proxy.metrics()
            assert sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("ppengine:proxy_requests_total{")
                       and 'role="decode"' in line) == NUM_STREAMS // 2
        decoders = [i for i in c.instances if i.role == "kv_consumer"]
        computed = sum(d.metric("ppengine:prompt_tokens_computed_total") for d in decoders)
        assert 0 < computed <= NUM_STREAMS * BLOCK  # the rest of each prompt came as KV
        assert all(d.metric("ppengine:kv_transfer_received_tokens_total") > 0 for d in decoders)
        assert tight.metric("ppengine:kv_transfer_held_total") > 0  # it pulled instead
        c.wait_blocks_free()

        _hostile_peers(c, keys)
        for proxy in c.proxies:
            assert asyncio.run(stream(proxy.async_client(), PROMPTS[3])) == reference[PROMPTS[3]]

        # a client that goes away mid-stream: D aborts it, every block comes back
        client = c.proxies[0].client()
        response = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=400,
                                             temperature=0.0, stream=True,
                                             extra_body={"ignore_eos": True})
        for i, _ in enumerate(response):
            if i == 2:
                break
        response.close()
        c.wait_blocks_free(timeout_s=10)
        c.check_alive()


def test_a_killed_proxy_is_dropped_and_the_other_serves_on(model_dir, reference,  # noqa: F811
                                                          tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xpyd-proxies")
    with xpyd_cluster(model_dir, str(tmp), num_proxies=2) as c:
        c.add("kv_producer", "PUT")
        decode = c.add("kv_consumer")
        c.wait_registered()
        doomed, survivor = c.proxies
        progress = Progress()

        async def scenario() -> tuple[float, list, list]:
            a, b = doomed.async_client(), survivor.async_client()
            prompt = PROMPTS[2]
            on_a = [asyncio.ensure_future(stream(a, prompt, 900, progress.track(i)))
                    for i in range(4)]
            on_b = [asyncio.ensure_future(stream(b, prompt, 150, progress.track(10 + i)))
                    for i in range(4)]
            await progress.until_streaming(8)
            doomed.proc.kill()
            killed_at = time.monotonic()
            a_results = await asyncio.gather(*on_a, return_exceptions=True)
            b_results = await asyncio.gather(*on_b)
            await a.close()
            await b.close()
            return killed_at, a_results, b_results

        killed_at, a_results, b_results = asyncio.run(scenario())
        assert all(isinstance(r, openai.APIError) for r in a_results), a_results
        _, expected_ids = reference[PROMPTS[2]]
        for _, ids in b_results:  # the survivor's streams ran to their end, unchanged
            assert len(ids) == 150 and ids[:MAX_TOKENS] == expected_ids
        # the instances dropped the dead proxy's return address and aborted its requests
        deadline = killed_at + 10
        while "answered no heartbeat" not in decode.proc.log(full=True):
            assert time.monotonic() < deadline, decode.proc.log()
            time.sleep(0.2)
        c.wait_blocks_free(timeout_s=10)
        assert asyncio.run(stream(survivor.async_client(), PROMPTS[4])) == reference[PROMPTS[4]]
        assert survivor.metric("ppengine:proxy_unrouted_responses_total") == 0
