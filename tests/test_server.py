"""`pp-engine serve` end to end: real server processes on 127.0.0.1, the official `openai` client.

Greedy outputs must equal the offline `LLM`'s; bad input gets OpenAI-style errors and the server
keeps serving; disconnects free KV blocks; a dead engine core fails requests fast and the server
exits with code 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from engine_core import LLM, SamplingParams
from tests.checkpoints import make_checkpoint
from tests.servers import ServerProcess, wait_for
from tests.text_checkpoint import add_tokenizer

API_KEY = "sk-test"
MODEL = "tiny-llama"
MAX_MODEL_LEN = 1024
TIMEOUT = 60.0  # every client call is bounded
PROMPTS = ["def hello(world):", "import json\n"]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("server-model")
    return add_tokenizer(make_checkpoint(str(root), "llama"), str(root / "llama-tok"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    log = str(tmp_path_factory.mktemp("server-log") / "server.log")
    proc = ServerProcess(model_dir, log, "--api-key", API_KEY, "--max-model-len",
                         str(MAX_MODEL_LEN))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=TIMEOUT)


@pytest.fixture(scope="module")
def offline(model_dir) -> Iterator[LLM]:
    llm = LLM(model_dir, dtype="float32", max_model_len=MAX_MODEL_LEN)
    yield llm
    llm.shutdown()


def greedy(max_tokens: int = 16, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def metrics(server: ServerProcess) -> dict[str, float]:
    """Unlabelled view of /metrics: {series name (labels dropped): summed value}."""
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(ppengine:[a-z_:]+)(?:\{[^}]*\})? (\S+)$", line)
        if match:
            values[match.group(1)] = values.get(match.group(1), 0.0) + float(match.group(2))
    return values


def wait_idle(server: ServerProcess, timeout_s: float = 20.0) -> dict[str, float]:
    """Poll /metrics until nothing runs and every KV block is free; the metrics then."""
    def idle() -> dict[str, float] | None:
        m = metrics(server)
        return m if m["ppengine:num_requests_running"] == 0 and \
            m["ppengine:num_free_kv_blocks"] == m["ppengine:num_kv_blocks"] else None

    return wait_for(idle, timeout_s, "the engine to go idle", lambda: str(metrics(server)),
                    interval_s=0.1)


def sse_events(response: httpx.Response) -> Iterator[dict | str]:
    """The data of each server-sent event: a parsed dict, or "[DONE]"."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


# ---- completions ------------------------------------------------------------------------------
def test_completions_match_offline(client, offline):
    expected = offline.generate(PROMPTS, greedy(), use_tqdm=False)
    response = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=16,
                                         temperature=0)
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.model == MODEL
    assert [c.index for c in response.choices] == [0, 1]
    for choice, out in zip(response.choices, expected):
        assert choice.text == out.outputs[0].text
        assert choice.finish_reason == out.outputs[0].finish_reason
    assert response.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    assert response.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in expected)
    assert response.usage.total_tokens == response.usage.prompt_tokens + \
        response.usage.completion_tokens


def test_completions_stream_matches_offline(client, offline):
    expected = offline.generate(PROMPTS, greedy(), use_tqdm=False)
    texts, finish, usage = ["", ""], [None, None], None
    stream = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=16, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for choice in chunk.choices:
            assert finish[choice.index] is None, "a chunk after the finishing one"
            texts[choice.index] += choice.text
            finish[choice.index] = choice.finish_reason
    assert texts == [o.outputs[0].text for o in expected]
    assert finish == [o.outputs[0].finish_reason for o in expected]
    assert usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in expected)
    assert usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)


def test_token_id_prompts(client, offline):
    ids = [[1, 40, 41, 42, 43], [1, 7, 8]]
    expected = offline.generate([{"prompt_token_ids": p} for p in ids], greedy(8),
                                use_tqdm=False)
    single = client.completions.create(model=MODEL, prompt=ids[0], max_tokens=8, temperature=0)
    both = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert single.choices[0].text == expected[0].outputs[0].text
    assert [c.text for c in both.choices] == [o.outputs[0].text for o in expected]
    assert both.usage.prompt_tokens == 8


def test_n_choices_per_prompt(client):
    response = client.completions.create(model=MODEL, prompt=PROMPTS, n=2, max_tokens=6,
                                         temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    assert response.usage.completion_tokens == 4 * 6
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model=MODEL, prompt=PROMPTS[0], n=2, max_tokens=6,
                                           stream=True, extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert sorted(streamed) == [0, 1]


def test_completion_logprobs(client, offline):
    expected = offline.generate(PROMPTS[0], greedy(8), use_tqdm=False)[0].outputs[0]
    response = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8,
                                         temperature=0, logprobs=3)
    choice = response.choices[0]
    assert choice.text == expected.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4
        assert logprob == pytest.approx(max(top.values()), abs=1e-4)  # greedy: the argmax
        assert top[token] == pytest.approx(logprob)
    streamed = []
    for chunk in client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8,
                                           temperature=0, logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.token_logprobs
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-4)


def test_echo_and_stop_string(client, offline):
    response = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8,
                                         temperature=0, echo=True)
    base = offline.generate(PROMPTS[0], greedy(16, ignore_eos=True), use_tqdm=False)
    assert response.choices[0].text.startswith(PROMPTS[0])
    text = base[0].outputs[0].text.rstrip("\ufffd")
    stop = text[4:6]
    want = offline.generate(PROMPTS[0], greedy(16, ignore_eos=True, stop=[stop]),
                            use_tqdm=False)[0].outputs[0]
    kwargs = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=stop,
                  extra_body={"ignore_eos": True})
    got = client.completions.create(**kwargs).choices[0]
    assert (got.text, got.finish_reason, got.model_extra["stop_reason"]) == \
        (want.text, "stop", stop)
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == want.text  # nothing of the stop leaked


# ---- chat -------------------------------------------------------------------------------------
def test_chat_matches_offline(client, offline):
    expected = offline.chat(MESSAGES, greedy(12), use_tqdm=False)[0]
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12,
                                              temperature=0)
    assert response.object == "chat.completion"
    message = response.choices[0].message
    assert message.role == "assistant" and message.content == expected.outputs[0].text
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)
    # content as a list of text parts renders the same prompt
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
             for m in MESSAGES]
    again = client.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=12,
                                           temperature=0)
    assert again.choices[0].message.content == expected.outputs[0].text


def test_chat_stream_and_logprobs(client, offline):
    expected = offline.chat(MESSAGES, greedy(12), use_tqdm=False)[0].outputs[0]
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        logprobs=True, top_logprobs=2, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason == expected.finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == expected.text
    content = [t for c in with_choices if c.choices[0].logprobs
               for t in c.choices[0].logprobs.content]
    assert len(content) == len(expected.token_ids)
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-4)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        len(expected.token_ids)
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12,
                                              temperature=0, logprobs=True, n=2)
    assert [c.index for c in response.choices] == [0, 1]
    for choice in response.choices:
        assert choice.message.content == expected.text
        assert len(choice.logprobs.content) == len(expected.token_ids)
        assert choice.logprobs.content[0].top_logprobs == []


# ---- load, disconnects ------------------------------------------------------------------------
def test_64_concurrent_streams(server):
    async def one(aclient: openai.AsyncOpenAI, i: int) -> tuple[int, int, str]:
        max_tokens = 8 + i % 9
        stream = await aclient.completions.create(
            model=MODEL, prompt=f"request {i}: " + "x" * (i % 13), max_tokens=max_tokens,
            temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        usage, finish = None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return max_tokens, usage.completion_tokens, finish

    async def run_all() -> list[tuple[int, int, str]]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY,
                                      max_retries=0, timeout=TIMEOUT) as aclient:
            return await asyncio.wait_for(
                asyncio.gather(*(one(aclient, i) for i in range(64))), TIMEOUT)

    results = asyncio.run(run_all())
    assert all(want == got and finish == "length" for want, got, finish in results)
    m = wait_idle(server)
    assert m["ppengine:num_requests_waiting"] == 0 and m["ppengine:kv_cache_usage_perc"] == 0
    assert m["ppengine:request_success_total"] >= 64
    assert m["ppengine:time_to_first_token_seconds_count"] >= 64


def test_disconnect_mid_stream_frees_blocks(server):
    before = wait_idle(server)
    body = {"model": MODEL, "prompt": "a long one", "max_tokens": 1000, "stream": True,
            "extra": "ignored", "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH,
                      timeout=TIMEOUT) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
        for _ in range(3):
            assert isinstance(next(events), dict)
    after = wait_idle(server, timeout_s=10)
    successes = "ppengine:request_success_total"  # absent until a first request succeeds
    assert after.get(successes, 0.0) == before.get(successes, 0.0)
    # non-streaming: the client gives up waiting, which aborts it too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=0.5,
                   json={**body, "stream": False})
    after = wait_idle(server, timeout_s=10)
    assert after.get(successes, 0.0) == before.get(successes, 0.0)


# ---- errors -----------------------------------------------------------------------------------
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
GOOD = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_REQUESTS = [
    # (route, body (dict or raw text), status, param)
    (COMPLETIONS, '{"prompt": "hi", ', 400, None),
    (COMPLETIONS, "[1, 2]", 400, None),
    (COMPLETIONS, {"model": MODEL}, 400, "prompt"),
    (COMPLETIONS, {**GOOD, "prompt": 5}, 400, "prompt"),
    (COMPLETIONS, {**GOOD, "prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {**GOOD, "prompt": []}, 400, "prompt"),
    (COMPLETIONS, {**GOOD, "prompt": [1, 99999]}, 400, "prompt"),
    (COMPLETIONS, {**GOOD, "prompt": [5] * (MAX_MODEL_LEN + 1)}, 400, "prompt"),
    (COMPLETIONS, {**GOOD, "prompt": [5] * 1000, "max_tokens": 100}, 400, "max_tokens"),
    (COMPLETIONS, {**GOOD, "max_tokens": "16"}, 400, "max_tokens"),
    (COMPLETIONS, {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    (COMPLETIONS, {**GOOD, "temperature": -0.5}, 400, "temperature"),
    (COMPLETIONS, {**GOOD, "top_p": 1.5}, 400, "top_p"),
    (COMPLETIONS, {**GOOD, "top_k": -5}, 400, "top_k"),
    (COMPLETIONS, {**GOOD, "n": 17}, 400, "n"),
    (COMPLETIONS, {**GOOD, "n": True}, 400, "n"),
    (COMPLETIONS, {**GOOD, "stop": 3}, 400, "stop"),
    (COMPLETIONS, {**GOOD, "logprobs": 21}, 400, "logprobs"),
    (COMPLETIONS, {**GOOD, "echo": True, "logprobs": 1}, 400, "echo"),
    (COMPLETIONS, {**GOOD, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (COMPLETIONS, {**GOOD, "min_tokens": 5}, 400, "min_tokens"),
    (COMPLETIONS, {**GOOD, "model": "gpt-9"}, 404, "model"),
    (CHAT, {**GOOD_CHAT, "messages": []}, 400, "messages"),
    (CHAT, {**GOOD_CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages.0.role"),
    (CHAT, {**GOOD_CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages.0.content.0.type"),
    (CHAT, {**GOOD_CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {**GOOD_CHAT, "logprobs": "yes"}, 400, "logprobs"),
    (CHAT, {**GOOD_CHAT, "max_completion_tokens": 2000}, 400, "max_completion_tokens"),
    (CHAT, {**GOOD_CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    (CHAT, {**GOOD_CHAT, "model": "gpt-9"}, 404, "model"),
    # this server runs --scheduling-policy fcfs (the default): only priority 0
    (COMPLETIONS, {**GOOD, "priority": 1}, 400, "priority"),
    (CHAT, {**GOOD_CHAT, "priority": -3}, 400, "priority"),
    (COMPLETIONS, {**GOOD, "priority": "high"}, 400, "priority"),
]


def test_bad_requests_get_openai_errors(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=TIMEOUT) as http:
        for route, body, status, param in BAD_REQUESTS:
            if isinstance(body, str):
                response = http.post(route, content=body,
                                     headers={"Content-Type": "application/json"})
            else:
                response = http.post(route, json=body)
            case = f"{route} {str(body)[:80]}: {response.text[:300]}"
            assert response.status_code == status, case
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, case
            assert error["param"] == param and error["message"], case
            assert error["type"] == ("NotFoundError" if status == 404
                                     else "invalid_request_error"), case
        assert http.post("/v1/nothing", json=GOOD).status_code == 404
        assert http.get(COMPLETIONS).status_code == 405
        assert http.post(COMPLETIONS, json=GOOD).status_code == 200
        assert http.post(CHAT, json=GOOD_CHAT).status_code == 200
    wait_idle(server)


def test_priority_under_the_priority_policy(model_dir, offline, cli_processes):
    expected = offline.generate(PROMPTS, greedy(), use_tqdm=False)
    server = cli_processes.server(model_dir, "--scheduling-policy", "priority")
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        body = {"model": MODEL, "prompt": PROMPTS, "max_tokens": 16, "temperature": 0}
        response = http.post(COMPLETIONS, json={**body, "priority": -5})
        assert response.status_code == 200, response.text
        texts = [c["text"] for c in response.json()["choices"]]
        assert texts == [o.outputs[0].text for o in expected]
        chat = http.post(CHAT, json={**GOOD_CHAT, "priority": 9})
        assert chat.status_code == 200, chat.text
        for bad in (1 << 63, -(1 << 63) - 1):
            response = http.post(COMPLETIONS, json={**GOOD, "priority": bad})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "priority" and "int64" in error["message"]
    wait_idle(server)
    with pytest.raises(SystemExit):  # not a policy: argparse refuses it
        from engine_core.entrypoints.cli import main
        main(["serve", model_dir, "--scheduling-policy", "lottery"])


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices


def test_api_key_and_open_routes(server):
    good = client_for(server, API_KEY).models.list()
    assert [m.id for m in good.data] == [MODEL]
    assert good.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    for key in (None, "wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for method, route in (("GET", "/v1/models"), ("POST", COMPLETIONS), ("POST", CHAT)):
            response = httpx.request(method, server.url + route, headers=headers, json=GOOD,
                                     timeout=TIMEOUT)
            assert response.status_code == 401, (key, route)
            assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client_for(server, "wrong").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200
    assert "version" in httpx.get(server.url + "/version", timeout=TIMEOUT).json()
    assert httpx.get(server.url + "/metrics", timeout=TIMEOUT).status_code == 200


def test_offline_get_metrics_names_the_servers_engine_series(server, offline):
    """`LLM.get_metrics()` and the live `/metrics` name the engine's figures alike (both read
    `engine_metrics.ENGINE_METRICS`), with the same kinds and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    from engine_core.entrypoints.engine_metrics import ENGINE_METRICS, Counter

    wait_idle(server)
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    served = {f.name: f for f in text_string_to_metric_families(text)}
    offline_metrics = offline.get_metrics()
    names = {m.name for m in offline_metrics}
    assert names == {row.name for row in ENGINE_METRICS}
    assert names <= set(served), names - set(served)
    for metric in offline_metrics:
        family = served[metric.name]
        assert family.type == ("counter" if isinstance(metric, Counter) else "gauge")
        labels = {k: v for k, v in metric.labels.items() if k != "model_name"}
        assert any({k: v for k, v in s.labels.items() if k != "model_name"} == labels
                   for s in family.samples), (metric, family.samples)


def client_for(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0,
                         timeout=TIMEOUT)


# ---- engine death -----------------------------------------------------------------------------
def test_engine_death_fails_requests_fast(model_dir, cli_processes):
    server = cli_processes.server(model_dir)
    long = {"model": MODEL, "prompt": "x", "max_tokens": 1000, "ignore_eos": True}

    async def in_flight() -> tuple[httpx.Response, list]:
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
            plain = asyncio.create_task(http.post(COMPLETIONS, json=long))
            events: list = []
            async with http.stream("POST", COMPLETIONS, json={**long, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 3:
                            os.kill(server.engine_pid(), signal.SIGKILL)
            return await plain, events

    start = time.monotonic()
    plain, events = asyncio.run(asyncio.wait_for(in_flight(), TIMEOUT))
    assert time.monotonic() - start < 20
    assert plain.status_code == 500 and plain.json()["error"]["code"] == "engine_dead"
    assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    # then the server shuts down with exit code 1 (see tests/test_server_hardening.py)
    assert server.proc.wait(30) == 1


# ---- pipeline parallel (Ray) ------------------------------------------------------------------
@pytest.mark.slow
def test_pp2_server_matches_offline(model_dir, offline, cli_processes):
    """The server over a 2-stage Ray pipeline gives the offline (PP=1) greedy text. Starts Ray
    in the engine-core process: keep it apart from other Ray users."""
    expected = offline.generate(PROMPTS, greedy(), use_tqdm=False)
    server = cli_processes.server(model_dir, "--pipeline-parallel-size", "2",
                                  "--threads-per-stage", "1", startup_s=180)
    client = client_for(server, "unused")
    response = client.completions.create(
        model=MODEL, prompt=PROMPTS, max_tokens=16, temperature=0)
    assert [c.text for c in response.choices] == [o.outputs[0].text for o in expected]
    # structured outputs: the bitmasks reach the last Ray stage, streamed and not
    from engine_core import StructuredOutputsParams

    schema = {"type": "object", "properties": {"k": {"type": "string", "maxLength": 8},
                                               "v": {"type": "integer", "minimum": 0,
                                                     "maximum": 999}},
              "required": ["k", "v"]}
    expected = offline.generate(PROMPTS[:2], SamplingParams(
        temperature=0.0, max_tokens=80, structured_outputs=StructuredOutputsParams(json=schema)),
        use_tqdm=False)
    kwargs = {"model": MODEL, "max_tokens": 80, "temperature": 0,
              "response_format": {"type": "json_schema",
                                  "json_schema": {"name": "kv", "schema": schema}}}
    completions = client.completions.create(  # the openai client sends it as an extra
        model=MODEL, prompt=PROMPTS[:2], max_tokens=80, temperature=0,
        extra_body={"response_format": kwargs["response_format"]})
    assert [c.text for c in completions.choices] == [o.outputs[0].text for o in expected]
    for prompt, output in zip(PROMPTS[:2], expected):
        assert set(json.loads(output.outputs[0].text)) == {"k", "v"}
        messages = [{"role": "user", "content": prompt}]
        chat = client.chat.completions.create(messages=messages, **kwargs)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                           client.chat.completions.create(messages=messages, stream=True,
                                                          **kwargs) if chunk.choices)
        assert streamed == chat.choices[0].message.content
        assert set(json.loads(streamed)) == {"k", "v"}
    wait_idle(server)


# ---- pieces, in process -----------------------------------------------------------------------
def test_stream_holds_back_a_possible_stop_string():
    from engine_core.entrypoints.openai.serving import _ChoiceStream
    from engine_core.outputs import CompletionOutput

    state, seen = _ChoiceStream(), []
    for text, finish in (("ab", None), ("abXY", None), ("abXYZ", None), ("abX", "stop")):
        completion = CompletionOutput(0, text, list(range(len(text))), finish_reason=finish)
        seen.append(state.advance(completion, holdback=2)[0])  # a stop string of 3 chars
    assert seen == ["", "ab", "X", ""] and state.done


def test_validation_errors_name_the_field():
    from pydantic import ValidationError

    from engine_core.entrypoints.http.errors import validation_error
    from engine_core.entrypoints.http.protocol import ChatCompletionRequest

    cases = {'{"messages": [{"role": "user", "content": [{"type": "image"}]}]}':
             "messages.0.content.0.type", '{"messages": []}': "messages",
             '{"messages": [{"role": "user"}], "stop": [1]}': "stop.0", "{": None}
    for body, param in cases.items():
        with pytest.raises(ValidationError) as info:
            ChatCompletionRequest.model_validate_json(body)
        assert validation_error(info.value).param == param, body
