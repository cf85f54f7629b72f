"""Disaggregated prefill/decode end to end: `pp-engine proxy` and `pp-engine serve
--kv-transfer-config` processes on 127.0.0.1, driven by the official `openai` client.

Greedy outputs through the proxy must equal a single `pp-engine serve`'s, streaming and not, for
every send type; the decode instance must have computed only the tail of each prompt (the rest
came over the wire); every KV block returns to the pool on both sides; a dead instance fails or
reroutes requests in bounded time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from tests.checkpoints import make_checkpoint
from tests.servers import (
    CliProcess,
    ServerProcess,
    free_port,
    group_gone,
    metric_sum,
    stop_processes,
    wait_for,
)
from tests.text_checkpoint import add_tokenizer

MODEL = "tiny-llama"
MAX_MODEL_LEN = 1024
BLOCK = 16
TIMEOUT = 60.0
MAX_TOKENS = 12
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
PROMPTS = ["hi", "def hello(world):", WORDS[:40], WORDS * 6, (WORDS * 20)[:1500]]
MESSAGES = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": WORDS * 3}]


def wait_idle(urls: list[str], logs: Callable[[], str], timeout_s: float = 20.0) -> None:
    """Until every instance at `urls` runs no request and has every KV block back in the pool
    (leases released or expired, pushed KV dropped); AssertionError with `logs()` if not."""
    pending: list[str] = []

    def idle() -> bool:
        pending.clear()
        for url in urls:
            text = httpx.get(url + "/metrics", timeout=5).text
            free = metric_sum(text, "ppengine:num_free_kv_blocks")
            busy = (metric_sum(text, "ppengine:num_requests_running")
                    + metric_sum(text, "ppengine:num_requests_waiting"))
            if free != metric_sum(text, "ppengine:num_kv_blocks") or busy:
                pending.append(f"{url}: {free} free, {busy} requests")
        return not pending

    wait_for(idle, timeout_s, "every KV block to return",
             lambda: f"not returned: {pending}\n{logs()}", interval_s=0.2)



class Cluster:
    """A proxy and its prefill/decode instances on this host."""

    def __init__(self, model_dir: str, tmp: str, send_type: str, num_prefill: int = 1,
                 num_decode: int = 1, keys_dir: str | None = None, lease_ttl_s: float = 30.0,
                 heartbeat_timeout_s: float = 3.0) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.discovery_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        security = ["--zmq-keys", keys_dir] if keys_dir else ["--insecure-tcp"]
        self.procs: list[CliProcess] = []
        try:  # a start that fails stops what it started, then raises
            self.proxy = self._start(
                ["proxy", "--port", str(self.port), "--discovery-port", str(self.discovery_port),
                 "--heartbeat-timeout-s", str(heartbeat_timeout_s), *security], "proxy")
            self.prefill: list[tuple[CliProcess, str]] = []
            self.decode: list[tuple[CliProcess, str]] = []
            self.kv_endpoints: list[str] = []
            roles = ["kv_producer"] * num_prefill + ["kv_consumer"] * num_decode
            for i, role in enumerate(roles):
                http_port = free_port()
                config = {"kv_role": role, "kv_port": free_port(), "send_type": send_type,
                          "proxy_address": f"127.0.0.1:{self.discovery_port}",
                          "lease_ttl_s": lease_ttl_s}
                proc = self._start(
                    ["serve", model_dir, "--port", str(http_port), "--dtype", "float32",
                     "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
                     "--block-size", str(BLOCK), "--kv-transfer-config", json.dumps(config),
                     *security], f"{role}-{i}")
                self.kv_endpoints.append(f"tcp://127.0.0.1:{config['kv_port']}")
                group = self.prefill if role == "kv_producer" else self.decode
                group.append((proc, f"http://127.0.0.1:{http_port}"))
            self.wait_registered(num_prefill, num_decode)
            self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused",
                                        max_retries=0, timeout=TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def _start(self, args: list[str], name: str) -> CliProcess:
        proc = CliProcess(args, os.path.join(self.tmp, f"{name}.log"))
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"==== {p.log_path}\n{p.log()}" for p in self.procs)

    def wait_registered(self, num_prefill: int, num_decode: int, timeout_s: float = 120.0
                        ) -> None:
        def registered() -> bool:
            for proc in self.procs:
                if not proc.alive():
                    raise RuntimeError(f"{proc.log_path} exited:\n{self.logs()}")
            with contextlib.suppress(httpx.HTTPError):
                text = httpx.get(self.url + "/metrics", timeout=2).text
                return (metric_sum(text, 'ppengine:proxy_instances{role="kv_producer"}')
                        >= num_prefill
                        and metric_sum(text, 'ppengine:proxy_instances{role="kv_consumer"}')
                        >= num_decode)
            return False

        wait_for(registered, timeout_s, "the instances to register", self.logs, interval_s=0.25)

    def instance_metrics(self, url: str) -> str:
        return httpx.get(url + "/metrics", timeout=5).text

    def wait_blocks_free(self, timeout_s: float = 20.0) -> None:
        """Every live instance's KV blocks back in the pool (leases released or expired)."""
        wait_idle([url for proc, url in self.prefill + self.decode if proc.alive()],
                  self.logs, timeout_s)

    def stop(self) -> None:
        stop_processes(self.procs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("disagg-model")
    return add_tokenizer(make_checkpoint(str(root), "llama"), str(root / "llama-tok"))


def _complete(client: openai.OpenAI, prompt: str, stream: bool) -> tuple[str, list[int] | None]:
    kwargs = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
              "extra_body": {"return_token_ids": True, "ignore_eos": True}}
    if not stream:
        choice = client.completions.create(**kwargs).choices[0]
        return choice.text, (choice.model_extra or {}).get("token_ids")
    text, ids = "", []
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.text
            ids.extend((choice.model_extra or {}).get("token_ids") or [])
    return text, ids


def _chat(client: openai.OpenAI, stream: bool) -> str:
    kwargs = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS,
              "temperature": 0.0}
    if not stream:
        return client.chat.completions.create(**kwargs).choices[0].message.content
    return "".join(chunk.choices[0].delta.content or ""
                   for chunk in client.chat.completions.create(stream=True, **kwargs)
                   if chunk.choices)


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                          "zip": {"type": "integer", "minimum": 0,
                                                  "maximum": 99999}},
          "required": ["city", "zip"]}


def _constrained_chat(client: openai.OpenAI, stream: bool) -> str:
    """A chat under a JSON schema (response_format): P's one token and D's obey it."""
    kwargs = {"model": MODEL, "messages": MESSAGES, "max_tokens": 120, "temperature": 0.0,
              "response_format": {"type": "json_schema",
                                  "json_schema": {"name": "place", "schema": SCHEMA}}}
    if not stream:
        text = client.chat.completions.create(**kwargs).choices[0].message.content
    else:
        text = "".join(chunk.choices[0].delta.content or ""
                       for chunk in client.chat.completions.create(stream=True, **kwargs)
                       if chunk.choices)
    assert set(json.loads(text)) == {"city", "zip"}, text
    return text


def _num_tokens(url: str, text: str) -> int:
    """Prompt tokens of `text`, as the server counts them (its usage block)."""
    body = httpx.post(url + "/v1/completions", json={
        "model": MODEL, "prompt": text, "max_tokens": 1}, timeout=TIMEOUT).json()
    return body["usage"]["prompt_tokens"]


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory) -> dict:
    """Every prompt through one plain `pp-engine serve`: the outputs a proxy must reproduce."""
    log = str(tmp_path_factory.mktemp("disagg-ref") / "serve.log")
    server = ServerProcess(model_dir, log, "--max-model-len", str(MAX_MODEL_LEN),
                           "--block-size", str(BLOCK))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                               timeout=TIMEOUT)
        return {"completions": [_complete(client, p, False) for p in PROMPTS],
                "chat": _chat(client, False),
                "constrained": _constrained_chat(client, False),
                "prompt_tokens": [_num_tokens(server.url, p) for p in PROMPTS]}
    finally:
        server.stop()


@contextlib.contextmanager
def cluster(model_dir: str, tmp_path_factory, send_type: str, **kwargs) -> Iterator[Cluster]:
    c = Cluster(model_dir, str(tmp_path_factory.mktemp(f"disagg-{send_type}")), send_type,
                **kwargs)
    try:
        yield c
    finally:
        c.stop()


def _check_outputs(c: Cluster, reference: dict) -> None:
    for prompt, expected in zip(PROMPTS, reference["completions"]):
        assert _complete(c.client, prompt, stream=False) == expected, prompt[:30]
        assert _complete(c.client, prompt, stream=True) == expected, prompt[:30]
    assert _chat(c.client, stream=False) == reference["chat"]
    assert _chat(c.client, stream=True) == reference["chat"]
    assert _constrained_chat(c.client, stream=False) == reference["constrained"]
    assert _constrained_chat(c.client, stream=True) == reference["constrained"]


def _send_garbage_kv(endpoints: list[str]) -> None:
    """Malformed, truncated and unknown-lease KV messages at every instance's KV endpoint."""
    import msgspec
    import zmq
    from engine_core.executors.kv_endpoint import KVLayerHeader

    from engine_core.kv_transfer.kv_wire import PullKV

    header = msgspec.msgpack.encode(KVLayerHeader("no-such-lease", "0" * 16, 0, 2, 16,
                                                  "float32", [1, 16, 4, 8]))
    ctx = zmq.Context()
    try:
        for endpoint in endpoints:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(endpoint)
            for frames in ([b"\xff\x00garbage"], [header, b"short", b"short"],
                           [header, bytes(2048), bytes(2048)],
                           [msgspec.msgpack.encode(PullKV("no-such-lease", "0" * 16))]):
                sock.send_multipart(frames)
            sock.close()
    finally:
        ctx.term()


@pytest.mark.parametrize("send_type", ["GET", "PUT", "PUT_ASYNC"])
def test_1p1d_is_token_identical_and_moves_the_kv(model_dir, reference, tmp_path_factory,
                                                  send_type):
    with cluster(model_dir, tmp_path_factory, send_type) as c:
        _send_garbage_kv(c.kv_endpoints)  # dropped and logged; the instances keep serving
        _check_outputs(c, reference)
        (_, p_url), (_, d_url) = c.prefill[0], c.decode[0]
        d_metrics, p_metrics = c.instance_metrics(d_url), c.instance_metrics(p_url)
        # 2 x each completion prompt and 2 x each chat went through D; it ran at most
        # the last partial block (plus the last token) of each, the rest came over the wire
        num_requests = 2 * len(PROMPTS) + 4
        computed = metric_sum(d_metrics, "ppengine:prompt_tokens_computed_total")
        assert 0 < computed <= num_requests * BLOCK
        received = metric_sum(d_metrics, "ppengine:kv_transfer_received_tokens_total")
        expected = 2 * sum((n - 1) // BLOCK * BLOCK for n in reference["prompt_tokens"])
        assert received >= expected > 0
        assert metric_sum(p_metrics, "ppengine:kv_transfer_sent_tokens_total") == received
        # P ran the prompts (what its prefix cache did not hold)
        assert metric_sum(p_metrics, "ppengine:prompt_tokens_computed_total") > computed
        c.wait_blocks_free()
        proxy_metrics = httpx.get(c.url + "/metrics", timeout=5).text
        assert metric_sum(proxy_metrics, "ppengine:proxy_requests_total") >= 2 * num_requests


def test_2p2d_with_curve_keys_is_token_identical_and_spreads_load(model_dir, reference,
                                                                  tmp_path_factory):
    keys = str(tmp_path_factory.mktemp("disagg-keys") / "keys")
    from engine_core.transport import create_keys

    create_keys(keys)
    with cluster(model_dir, tmp_path_factory, "PUT_ASYNC", num_prefill=2, num_decode=2,
                 keys_dir=keys) as c:
        _check_outputs(c, reference)
        c.wait_blocks_free()
        for _, url in c.prefill + c.decode:  # least loaded routing used every instance
            text = c.instance_metrics(url)
            assert metric_sum(text, "ppengine:request_success_total") > 0, url


def test_no_decode_instance_is_503_naming_the_role(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("disagg-503"))
    port, discovery = free_port(), free_port()
    proxy = CliProcess(["proxy", "--port", str(port), "--discovery-port", str(discovery),
                        "--insecure-tcp"], os.path.join(tmp, "proxy.log"))
    try:
        url = f"http://127.0.0.1:{port}"

        def answer() -> httpx.Response | None:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.post(url + "/v1/completions", timeout=10,
                                  json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
            return None

        response = wait_for(answer, 60, "the proxy to answer", proxy.log, interval_s=0.25)
        assert response.status_code == 503
        assert "prefill" in response.json()["error"]["message"]
    finally:
        proxy.stop()
    assert group_gone(proxy.proc.pid)


def test_dead_prefill_reroutes_and_dead_decode_fails_fast(model_dir, reference,
                                                          tmp_path_factory):
    """Two prefill instances, one decode: a killed P is routed around (retried on the other
    before anything streamed); a killed D fails its requests in bounded time, not a hang; no
    block of a surviving instance leaks."""
    with cluster(model_dir, tmp_path_factory, "GET", num_prefill=2, num_decode=1,
                 lease_ttl_s=3.0, heartbeat_timeout_s=3.0) as c:
        c.prefill[0][0].kill()
        for prompt, expected in zip(PROMPTS[:3], reference["completions"][:3]):
            assert _complete(c.client, prompt, stream=False) == expected
        c.wait_blocks_free()
        c.decode[0][0].kill()
        start = time.monotonic()
        with pytest.raises(openai.APIError):
            _complete(c.client, PROMPTS[3], stream=False)
        assert time.monotonic() - start < 30
        c.wait_blocks_free()  # the surviving P's lease for the dead D expired
        text = httpx.get(c.url + "/health", timeout=5)
        assert text.status_code == 503 and re.search("decode", text.text)


def test_instance_with_another_kv_layout_is_refused_and_exits(model_dir, tmp_path_factory):
    """A second instance whose KV layout differs (block size 8 vs 16) is refused at
    registration with a message naming the field, and its server exits with code 1."""
    tmp = str(tmp_path_factory.mktemp("disagg-refused"))
    with cluster(model_dir, tmp_path_factory, "GET", num_prefill=0, num_decode=1) as c:
        config = {"kv_role": "kv_producer", "kv_port": free_port(), "send_type": "GET",
                  "proxy_address": f"127.0.0.1:{c.discovery_port}"}
        odd = CliProcess(["serve", model_dir, "--port", str(free_port()), "--dtype",
                          "float32", "--served-model-name", MODEL, "--max-model-len",
                          str(MAX_MODEL_LEN), "--block-size", "8", "--kv-transfer-config",
                          json.dumps(config), "--insecure-tcp"], os.path.join(tmp, "odd.log"))
        try:
            assert odd.proc.wait(120) == 1, odd.log()
            assert "refused" in odd.log() and "block_size" in odd.log()
        finally:
            odd.stop()
        assert group_gone(odd.proc.pid)
