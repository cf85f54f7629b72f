"""Data parallelism: N engine cores behind one front-end (issue 9), offline and served, local
and headless over tcp with CurveZMQ keys."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import msgspec
import pytest
import zmq
import zmq.auth

from engine_core import LLM, SamplingParams
from engine_core.messages import EngineCoreRequest, HandshakeHello
from tests.servers import (
    REPO,
    CliProcess,
    ServerProcess,
    free_port,
    pid_gone,
    spawned_children,
)
from tests.text_checkpoint import add_tokenizer


@pytest.fixture(scope="module")
def text_model(checkpoint_factory, tmp_path_factory):
    return add_tokenizer(checkpoint_factory("llama"), str(tmp_path_factory.mktemp("dp-tok")))


PROMPTS = [f"def f{i}(x):" + " return x" * (i % 3) for i in range(16)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_offline_dp2_matches_dp1_and_balances(text_model):
    single = LLM(text_model, dtype="float32")
    expected = single.generate(PROMPTS, GREEDY, use_tqdm=False)
    single.shutdown()
    llm = LLM(text_model, dtype="float32", data_parallel_size=2)
    pids = [s.pid for s in llm.engine.engine_states()]
    try:
        got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        for a, b in zip(expected, got):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            assert a.outputs[0].text == b.outputs[0].text
        routed = [s.num_routed for s in llm.engine.engine_states()]
        assert sum(routed) == len(PROMPTS)
        assert min(routed) >= 0.8 * max(routed), routed  # within ~20 %
        # n > 1: every sequence of one request goes to one engine
        before = [s.num_routed for s in llm.engine.engine_states()]
        out = llm.generate("def g(y):", SamplingParams(n=3, temperature=0.8, seed=1,
                                                        max_tokens=4), use_tqdm=False)
        assert len(out[0].outputs) == 3
        grown = [s.num_routed - b for s, b in zip(llm.engine.engine_states(), before)]
        assert sorted(grown) == [0, 3]
    finally:
        llm.shutdown()
    assert all(pid_gone(pid) for pid in pids)



def test_offline_dp_startup_error_is_a_value_error(text_model):
    start = time.monotonic()
    with pytest.raises(ValueError, match="KV cache"):
        LLM(text_model, dtype="float32", data_parallel_size=2, num_kv_blocks=3)
    assert time.monotonic() - start < 60


def shared_prefix_workload(num_groups: int = 3, per_group: int = 4, prefix_blocks: int = 6,
                           block_size: int = 16) -> list[dict]:
    """Groups of prompts that share a long prefix, interleaved (A1 B1 C1 A2 ...): with an odd
    number of groups, alternating load routing spreads every group over both engines."""
    prompts = []
    for i in range(per_group):
        for g in range(num_groups):
            prefix = [(7 * g + 3 * j) % 200 + 10 for j in range(prefix_blocks * block_size)]
            prompts.append({"prompt_token_ids": [*prefix, 300 + g, 400 + i, 500 + i]})
    return prompts


def _prefix_hit_rate(text_model: str, routing: str) -> float:
    llm = LLM(text_model, dtype="float32", data_parallel_size=2, dp_routing=routing)
    try:
        prompts = shared_prefix_workload()
        outputs = []
        for prompt in prompts:  # one at a time: each request sees the cache of the ones before
            outputs += llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        llm.shutdown()
    cached = sum(o.num_cached_tokens for o in outputs)
    return cached / sum(len(p["prompt_token_ids"]) for p in prompts)


def test_prefix_routing_beats_load_routing_on_shared_prefixes(text_model):
    load, prefix = _prefix_hit_rate(text_model, "load"), _prefix_hit_rate(text_model, "prefix")
    assert prefix > load, (load, prefix)
    assert prefix > 0.6, prefix

def _step_until(client, condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition(client.engine_states()):
        assert time.monotonic() < deadline, client.engine_states()
        client.step()


def test_offline_abort_reaches_the_owning_engine(text_model):
    llm = LLM(text_model, dtype="float32", data_parallel_size=2)
    client = llm.engine
    try:
        params = SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True)
        for i in range(2):
            client.add_requests([EngineCoreRequest(f"r{i}", [1, 5, 9, 7] * 8, params)])
        owners = [client.client.owner_of(f"r{i}") for i in range(2)]
        assert sorted(owners) == [0, 1]
        _step_until(client, lambda states: all(s.stats.num_running == 1 for s in states))
        client.abort_requests(["r0"])
        # r0's engine frees every block; the other keeps running r1
        _step_until(client, lambda states: states[owners[0]].stats.num_running == 0
                    and states[owners[0]].stats.num_free_blocks
                    == states[owners[0]].stats.num_total_blocks)
        assert client.engine_states()[owners[1]].stats.num_running == 1
        client.abort_requests(["r1"])
        _step_until(client, lambda states: all(
            s.stats.num_running == 0 and s.stats.num_free_blocks == s.stats.num_total_blocks
            for s in states))
        assert not client.has_unfinished_requests()
    finally:
        llm.shutdown()


# ---- served -----------------------------------------------------------------------------------
def _engine_children(server) -> list[int]:
    """The multiprocessing-spawned children of a server (a ServerProcess or a Popen)."""
    return spawned_children(getattr(server, "proc", server).pid)


async def _both_engines_running(http: httpx.AsyncClient, url: str) -> None:
    """Wait (at most 30 s) until each of the two engines is running a request."""
    deadline = time.monotonic() + 30
    while True:
        metrics = (await http.get(url + "/metrics")).text
        if all(_gauge(metrics, "engine_num_requests_running", e) >= 1 for e in "01"):
            return
        assert time.monotonic() < deadline, metrics
        await asyncio.sleep(0.05)


def _gauge(metrics: str, name: str, engine: str | None = None) -> float:
    label = f'engine="{engine}",' if engine is not None else ""
    pattern = rf'^ppengine:{name}\{{{label}model_name="[^"]*"\}} (\S+)$'
    match = re.search(pattern, metrics, re.M) or re.search(
        rf'^ppengine:{name}\{{model_name="[^"]*"(?:,engine="{engine}")?\}} (\S+)$', metrics,
        re.M)
    assert match, f"no {name} {engine} in\n{metrics}"
    return float(match.group(1))


def test_served_dp2_matches_offline_and_survives_one_engine_death(text_model, tmp_path):
    from tests.test_server import MODEL

    offline = LLM(text_model, dtype="float32", max_model_len=1024)
    prompts = PROMPTS[:4]
    expected = [o.outputs[0].text for o in offline.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)]
    offline.shutdown()
    server = ServerProcess(text_model, str(tmp_path / "server.log"), "-dp", "2",
                           "--max-model-len", "1024")
    try:
        pids = _engine_children(server)
        assert len(pids) == 2
        url = server.url + "/v1/completions"
        for prompt, want in zip(prompts, expected):
            r = httpx.post(url, json={"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                      "temperature": 0.0}, timeout=60)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        long = {"model": MODEL, "prompt": "x", "max_tokens": 400, "ignore_eos": True}

        async def in_flight() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=150) as http:
                tasks = [asyncio.create_task(http.post(url, json=long)) for _ in range(4)]
                await _both_engines_running(http, server.url)  # then kill one
                os.kill(pids[0], signal.SIGKILL)
                return await asyncio.gather(*tasks)

        start = time.monotonic()
        results = asyncio.run(asyncio.wait_for(in_flight(), 180))
        codes = sorted(r.status_code for r in results)
        assert codes == [200, 200, 500, 500], [r.text[:200] for r in results]
        failed = [r for r in results if r.status_code == 500]
        assert all("data-parallel engine" in r.json()["error"]["message"] for r in failed)
        assert time.monotonic() - start < 60
        # the survivor serves new requests; /health stays 200; /metrics counts one engine
        r = httpx.post(url, json={"model": MODEL, "prompt": prompts[0], "max_tokens": 12,
                                  "temperature": 0.0}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[0]
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert _gauge(metrics, "engines_alive") == 1.0
        assert server.proc.poll() is None
    finally:
        server.stop()
    assert all(pid_gone(pid) for pid in pids)


# ---- two "nodes" on loopback ------------------------------------------------------------------
def _headless(model: str, log_path: str, port: int, keys: str, *extra: str) -> subprocess.Popen:
    return CliProcess(["serve", model, "--headless", "-dp", "2", "-dpl", "1", "-dpr", "1",
                       "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port",
                       str(port), "--zmq-keys", keys, "--dtype", "float32", *extra],
                      log_path).proc


def _head_args(port: int, keys: str) -> list[str]:
    return ["-dp", "2", "-dpl", "1", "--data-parallel-address", "127.0.0.1",
            "--data-parallel-rpc-port", str(port), "--zmq-keys", keys, "--max-model-len", "1024"]


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.fixture
def keys(tmp_path) -> str:
    directory = str(tmp_path / "keys")
    subprocess.run([sys.executable, "-m", "engine_core", "keys", directory], cwd=REPO,
                   check=True, capture_output=True, timeout=60)
    return directory


def test_head_and_headless_over_curve_tcp(text_model, keys, tmp_path):
    from tests.test_server import MODEL

    port = free_port()
    headless = _headless(text_model, str(tmp_path / "headless.log"), port, keys,
                         "--max-model-len", "1024")
    server = None
    try:
        server = ServerProcess(text_model, str(tmp_path / "head.log"), *_head_args(port, keys))
        url = server.url + "/v1/completions"

        async def run_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=150) as http:
                return await asyncio.gather(*[http.post(url, json={
                    "model": MODEL, "prompt": p, "max_tokens": 16, "temperature": 0.0})
                    for p in PROMPTS[:8]])

        results = asyncio.run(asyncio.wait_for(run_all(), 120))
        assert all(r.status_code == 200 for r in results), [r.text[:200] for r in results]
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert _gauge(metrics, "engines_alive") == 2.0
        assert all(_gauge(metrics, "engine_requests_routed", e) >= 1 for e in "01")
        # the head dies (kill -9, its local engine too): the headless node exits by itself,
        # its engine process with it
        engine_pids = _engine_children(headless)
        assert len(engine_pids) == 1
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        killed = time.monotonic()
        assert headless.wait(30) is not None
        assert time.monotonic() - killed < 10
        assert all(pid_gone(pid) for pid in engine_pids)
        engine_log = (tmp_path / "headless.log").read_text(errors="replace")
        assert "dropped" in engine_log or "gone" in engine_log, engine_log[-2000:]
    finally:
        if server is not None:
            server.stop()
        _kill_group(headless)


def test_headless_config_mismatch_is_refused_naming_the_field(text_model, keys, tmp_path):
    port = free_port()
    head_log = tmp_path / "head.log"
    head = CliProcess(["serve", text_model, "--port", str(free_port()), "--dtype", "float32",
                       *_head_args(port, keys)], str(head_log)).proc
    headless = _headless(text_model, str(tmp_path / "headless.log"), port, keys,
                         "--max-model-len", "512")
    try:
        assert headless.wait(90) == 1
        engine_log = (tmp_path / "headless.log").read_text(errors="replace")
        assert "scheduler.max_model_len" in engine_log, engine_log[-3000:]
        deadline = time.monotonic() + 10
        while "scheduler.max_model_len" not in head_log.read_text(errors="replace"):
            assert time.monotonic() < deadline, head_log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        assert head.poll() is None  # the head goes on waiting for a matching rank 1
    finally:
        _kill_group(head)
        _kill_group(headless)


@pytest.mark.parametrize("flags, message", [
    (["-dp", "2", "-dpl", "3"], "-dpl"),
    (["--headless", "-dp", "2", "-dpl", "1", "-dpr", "2", "--data-parallel-rpc-port", "5",
      "--insecure-tcp"], "-dpr"),
    (["-dp", "2", "-dpl", "1", "--data-parallel-rpc-port", "6000"], "keys"),
])
def test_bad_flags_fail_fast(text_model, flags, message):
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "engine_core", "serve", text_model,
                             "--dtype", "float32", *flags], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert time.monotonic() - start < 30


def test_rpc_port_in_use_fails_fast(text_model, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "engine_core", "serve", text_model, "--port",
             str(free_port()), "--dtype", "float32", "-dp", "2",
             "--data-parallel-rpc-port", str(port), "--insecure-tcp"],
            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"127.0.0.1:{port}" in result.stderr


def test_headless_engine_death_and_rejoin(text_model, keys, tmp_path):
    """kill -9 the headless engine: only its request fails, fast; a new headless process with
    the same rank rejoins the running head, gets work, and stops with the head."""
    from tests.test_server import MODEL

    port = free_port()
    first = _headless(text_model, str(tmp_path / "headless1.log"), port, keys,
                      "--max-model-len", "1024")
    server = second = None
    try:
        server = ServerProcess(text_model, str(tmp_path / "head.log"), *_head_args(port, keys))
        url = server.url + "/v1/completions"
        long = {"model": MODEL, "prompt": "x", "max_tokens": 400, "ignore_eos": True}
        victim = _engine_children(first)

        async def in_flight() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=150) as http:
                tasks = [asyncio.create_task(http.post(url, json=long)) for _ in range(2)]
                await _both_engines_running(http, server.url)  # then kill one
                os.kill(victim[0], signal.SIGKILL)
                killed = time.monotonic()
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                assert time.monotonic() - killed < 8  # the dead engine's request fails fast
                return await asyncio.gather(*tasks)

        results = asyncio.run(asyncio.wait_for(in_flight(), 180))
        assert sorted(r.status_code for r in results) == [200, 500]
        assert first.wait(15) is not None  # its launcher exits with its only engine
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert _gauge(metrics, "engines_alive") == 1.0
        routed_before = _gauge(metrics, "engine_requests_routed", "1")
        # rank 1 is free, but a peer without a client key from the directory gets no INIT
        ctx = zmq.Context()
        try:
            plain, wrong_key = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
            public, secret = zmq.curve_keypair()
            wrong_key.curve_publickey, wrong_key.curve_secretkey = public, secret
            wrong_key.curve_serverkey = zmq.auth.load_certificate(
                os.path.join(keys, "server.key"))[0]
            hello = msgspec.msgpack.encode(HandshakeHello(1, os.getpid()))
            for rogue in (plain, wrong_key):
                rogue.setsockopt(zmq.LINGER, 0)
                rogue.connect(f"tcp://127.0.0.1:{port}")
                rogue.send(hello)
            assert plain.poll(1500) == 0 and wrong_key.poll(500) == 0
        finally:
            ctx.destroy(linger=0)
        second = _headless(text_model, str(tmp_path / "headless2.log"), port, keys,
                           "--max-model-len", "1024")
        deadline = time.monotonic() + 60
        while _gauge(httpx.get(server.url + "/metrics", timeout=10).text,
                     "engines_alive") < 2:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.25)
        for prompt in PROMPTS[:6]:
            r = httpx.post(url, json={"model": MODEL, "prompt": prompt, "max_tokens": 8},
                           timeout=60)
            assert r.status_code == 200
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert _gauge(metrics, "engine_requests_routed", "1") > routed_before
        rejoined = _engine_children(second)
        server.stop()
        assert second.wait(30) == 0  # told to stop by the head
        assert all(pid_gone(pid) for pid in rejoined)
    finally:
        if server is not None:
            server.stop()
        _kill_group(first)
        if second is not None:
            _kill_group(second)


def test_served_all_engines_dead_exits_1(text_model, tmp_path):
    server = ServerProcess(text_model, str(tmp_path / "server.log"), "-dp", "2",
                           "--max-model-len", "1024")
    try:
        pids = _engine_children(server)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert server.proc.wait(30) == 1, server.log()
    finally:
        server.stop()


def test_missing_remote_rank_times_out_naming_rank_and_address(text_model):
    from engine_core.client.factory import make_client
    from engine_core.config import DataParallelConfig, EngineArgs
    port = free_port()
    dp = DataParallelConfig(size=2, size_local=1, rpc_port=port)
    client = make_client(EngineArgs(text_model, dtype="float32"), dp, insecure_tcp=True)
    start = time.monotonic()
    # rank 1 is named (rank 0 too when its own startup takes longer than 8 s on a busy host)
    with pytest.raises(TimeoutError, match=rf"\[(0, )?1\].*127\.0\.0\.1:{port}"):
        asyncio.run(client.start(timeout_s=8))
    assert time.monotonic() - start < 30


def test_garbage_on_the_output_socket_is_dropped(text_model):
    llm = LLM(text_model, dtype="float32", data_parallel_size=2)
    client = llm.engine.client
    ctx = zmq.Context()
    try:
        rogue = ctx.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.connect(client.output_address)
        for frame in (b"\xc1", b"", msgspec.msgpack.encode({"outputs": 3})):
            rogue.send(frame)
        rogue.send_multipart([b"a", b"b", b"c"])
        got = llm.generate(PROMPTS[:4], GREEDY, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 12 for o in got)
        deadline = time.monotonic() + 10
        while client.bad_frames.count < 4:
            assert time.monotonic() < deadline, client.bad_frames.count
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)  # reads the socket meanwhile
        assert all(s.alive for s in client.engine_states())
    finally:
        ctx.destroy(linger=0)
        llm.shutdown()


def test_served_restart_engine_restarts_every_engine(text_model, tmp_path):
    from tests.test_server import MODEL

    server = ServerProcess(text_model, str(tmp_path / "server.log"), "-dp", "2",
                           "--max-model-len", "1024", "--restart-engine")
    try:
        old = _engine_children(server)
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:  # the front-end notices, restarts both, and serves again
            assert server.proc.poll() is None, server.log()
            new = [p for p in _engine_children(server) if p not in old]
            with contextlib.suppress(httpx.HTTPError):
                metrics = httpx.get(server.url + "/metrics", timeout=5).text
                if len(new) == 2 and _gauge(metrics, "engines_alive") == 2.0:
                    break
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.25)
        assert _gauge(metrics, "engine_restarts") == 1.0
        r = httpx.post(server.url + "/v1/completions", json={
            "model": MODEL, "prompt": PROMPTS[0], "max_tokens": 8}, timeout=60)
        assert r.status_code == 200
    finally:
        server.stop()
    assert all(pid_gone(pid) for pid in old + new)


@pytest.mark.slow
def test_ray_backend_matches_dp1(text_model, keys):
    """--data-parallel-backend ray: each rank an engine-core Ray actor (a local Ray here), over
    CurveZMQ tcp; the same greedy outputs as DP=1."""
    single = LLM(text_model, dtype="float32")
    expected = single.generate(PROMPTS[:6], GREEDY, use_tqdm=False)
    single.shutdown()
    llm = LLM(text_model, dtype="float32", data_parallel_size=2, data_parallel_backend="ray",
              zmq_keys=keys)
    try:
        pids = [s.pid for s in llm.engine.engine_states()]
        got = llm.generate(PROMPTS[:6], GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == \
            [o.outputs[0].token_ids for o in expected]
        assert all(s.num_routed >= 2 for s in llm.engine.engine_states())
    finally:
        llm.shutdown()
    assert all(pid_gone(pid) for pid in pids)


def test_offline_dp2_structured_outputs_match_dp1(text_model):
    """Each engine compiles and applies the constraints of the requests routed to it: the
    same tokens as one engine, and the structured-output figures summed over both."""
    from engine_core import StructuredOutputsParams

    constraints = [StructuredOutputsParams(regex=r"[a-z]{1,8}=\d{1,3}"),
                   StructuredOutputsParams(choice=["north", "south"]),
                   StructuredOutputsParams(json={"type": "object", "properties": {
                       "k": {"type": "integer", "minimum": 0, "maximum": 99}},
                       "required": ["k"]})] * 2
    params = [SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=c)
              for c in constraints]
    single = LLM(text_model, dtype="float32")
    try:
        expected = single.generate(PROMPTS[:6], params, use_tqdm=False)
    finally:
        single.shutdown()
    llm = LLM(text_model, dtype="float32", data_parallel_size=2)
    try:
        got = llm.generate(PROMPTS[:6], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids
                                                         for o in expected]
        assert all(o.outputs[0].finish_reason == "stop" for o in got)
        metrics = {m.name: m.value for m in llm.get_metrics()
                   if m.name == "ppengine:structured_output_requests"}
        assert metrics == {"ppengine:structured_output_requests": 6}
    finally:
        llm.shutdown()
