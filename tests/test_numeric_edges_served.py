"""No valid request can kill the engine (issue 18), served: property tests over every numeric
field of /v1/completions and /v1/chat/completions bodies (raw JSON text, so 1e400, -0.0, NaN
and ints beyond 64 bits are sent as written), against `pp-engine serve`, `-dp 2` and the P/D
proxy in front of a prefill and a decode instance.

Property: every answer is a 200 with well-formed JSON (no NaN/Infinity, token ids in the
vocabulary, finite logprobs <= 0, finish_reason stop or length; streams without error events) or
a 4xx OpenAI error naming the field; never a 5xx, the server stays healthy, and afterwards every
KV block is free (/metrics) and a greedy request answers as before. One deployment per module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.checkpoints import make_checkpoint
from tests.numeric_edges import (
    VOCAB,
    check_logprob,
    field_values,
    raw_body,
    raw_number,
    stop_token_ids,
    strict_json,
)
from tests.servers import ServerProcess
from tests.test_disagg_e2e import Cluster, wait_idle
from tests.text_checkpoint import add_tokenizer

MAX_MODEL_LEN = 48  # bounds every request: without max_tokens a request runs to the context
TIMEOUT = 60.0
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
GREEDY = {"prompt": "def f(x):", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

_SHARED = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "top_k", "seed", "min_tokens", "n")


def _value(name: str) -> st.SearchStrategy[str]:
    """Raw JSON for one field: an in-range edge (as SamplingParams sees it) or any edge."""
    return st.one_of(field_values(name).map(json.dumps), raw_number())


def bodies(max_tokens_default: str | None = None) -> st.SearchStrategy[tuple[str, str]]:
    """(route, raw JSON body): any subset of the numeric fields, several extremes at once.
    `max_tokens_default` is sent when the body draws no max_tokens (a long context)."""
    optional = {name: _value(name) for name in _SHARED}
    optional["stop_token_ids"] = stop_token_ids().map(json.dumps)
    optional["max_tokens"] = _value("max_tokens")
    optional["stream"] = st.sampled_from(["true", "false"])
    completion = {**optional, "logprobs": _value("logprobs"), "best_of": _value("n")}
    chat = {**optional, "max_completion_tokens": _value("max_tokens"),
            "logprobs": st.sampled_from(["true", "false"]), "top_logprobs": _value("logprobs")}

    def build(route: str, fields: dict[str, str]) -> tuple[str, str]:
        if max_tokens_default and not {"max_tokens", "max_completion_tokens"} & set(fields):
            fields["max_tokens"] = max_tokens_default
        head = ({"prompt": '"def f(x):"'} if route == COMPLETIONS
                else {"messages": '[{"role": "user", "content": "hi"}]'})
        return route, raw_body({**head, "return_token_ids": "true", **fields})

    return st.one_of(
        st.fixed_dictionaries({}, optional=completion).map(lambda f: build(COMPLETIONS, f)),
        st.fixed_dictionaries({}, optional=chat).map(lambda f: build(CHAT, f)))


# the two reproductions of issue 18, and several extremes in one body
EXAMPLES = [
    (COMPLETIONS, '{"prompt": "x", "max_tokens": 4, "top_p": 1e-320}'),
    (COMPLETIONS, '{"prompt": "x", "max_tokens": 4, "repetition_penalty": 1e-300, '
                  '"presence_penalty": -2, "frequency_penalty": -2}'),
    (CHAT, '{"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "top_p": 5e-324, '
           '"repetition_penalty": 1.4e-45, "temperature": 3.5e38, "top_k": 9223372036854775807, '
           '"seed": 18446744073709551615, "logprobs": true, "top_logprobs": 20, "n": 2, '
           '"min_p": 1.0, "stream": true}'),
]


def _check_completion(route: str, choice: dict[str, Any]) -> None:
    assert choice["finish_reason"] in ("stop", "length", None), choice
    assert all(isinstance(t, int) and 0 <= t < VOCAB for t in choice.get("token_ids") or []), \
        choice
    logprobs = choice.get("logprobs")
    if not logprobs:
        return
    if route == COMPLETIONS:
        for value in logprobs["token_logprobs"]:
            check_logprob(value, "token_logprobs")
        for top in logprobs["top_logprobs"]:
            for value in top.values():
                check_logprob(value, "top_logprobs")
    else:
        for item in logprobs["content"]:
            check_logprob(item["logprob"], "logprob")
            for top in item["top_logprobs"]:
                check_logprob(top["logprob"], "top_logprobs")


def check_answer(url: str, route: str, body: str) -> httpx.Response:
    """POST `body`; assert the property on the answer."""
    response = httpx.post(url + route, content=body, timeout=TIMEOUT,
                          headers={"Content-Type": "application/json"})
    assert response.status_code < 500, (body, response.status_code, response.text[:500])
    if response.status_code != 200:
        error = strict_json(response.text)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["param"] or "not valid JSON" in error["message"], (body, error)
        return response
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in response.text.splitlines()
                  if line.startswith("data: ")]
        assert events[-1] == "[DONE]", response.text[-500:]
        for event in events[:-1]:
            chunk = strict_json(event)
            assert "error" not in chunk, (body, chunk)
            for choice in chunk["choices"]:
                _check_completion(route, choice)
    else:
        for choice in strict_json(response.text)["choices"]:
            assert choice["finish_reason"] in ("stop", "length"), (body, choice)
            _check_completion(route, choice)
    return response


def _greedy(url: str) -> list[int]:
    response = httpx.post(url + COMPLETIONS, json={**GREEDY, "return_token_ids": True},
                          timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("edges-model")
    return add_tokenizer(make_checkpoint(str(root), "llama"), str(root / "llama-tok"))


class Deployment:
    """A URL to send to, what greedy gave at the start, and how to check the KV pool."""

    def __init__(self, url: str, instance_urls: list[str], logs) -> None:
        self.url, self.instance_urls, self.logs = url, instance_urls, logs
        self.greedy = _greedy(url)

    def healthy(self) -> None:
        for url in self.instance_urls:
            assert httpx.get(url + "/health", timeout=10).status_code == 200, self.logs()

    def sound(self) -> None:
        """Every KV block free, nothing running, greedy as at the start."""
        self.healthy()
        wait_idle(self.instance_urls, self.logs)
        assert _greedy(self.url) == self.greedy


def _served(model_dir: str, tmp_path_factory, *args: str) -> Iterator[Deployment]:
    log = str(tmp_path_factory.mktemp("edges-log") / "server.log")
    server = ServerProcess(model_dir, log, "--max-model-len", str(MAX_MODEL_LEN),
                           "--disable-uvicorn-access-log", *args)
    try:
        yield Deployment(server.url, [server.url], server.log)
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.log()


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    yield from _served(model_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def served_dp(model_dir, tmp_path_factory):
    yield from _served(model_dir, tmp_path_factory, "-dp", "2")


@pytest.fixture(scope="module")
def proxied(model_dir, tmp_path_factory):
    cluster = Cluster(model_dir, str(tmp_path_factory.mktemp("edges-pd")), "PUT_ASYNC")
    try:
        yield Deployment(cluster.url, [url for _, url in cluster.prefill + cluster.decode],
                         cluster.logs)
    finally:
        cluster.stop()


def _with_examples(test):
    for route, body in EXAMPLES:
        test = example(request=(route, body))(test)
    return test


# ---- pp-engine serve --------------------------------------------------------------------------
@settings(max_examples=35, **SETTINGS)
@given(request=bodies())
@_with_examples
def test_served_any_numbers_get_a_result_or_a_4xx(served, request):
    check_answer(served.url, *request)
    served.healthy()


@pytest.mark.parametrize("field, raw, status", [
    ("temperature", "1e400", 400), ("top_p", "-1e400", 400), ("presence_penalty", "NaN", 400),
    ("frequency_penalty", "Infinity", 400), ("min_p", "-Infinity", 400),
    ("repetition_penalty", "1e400", 400), ("top_p", "-0.0", 400), ("temperature", "-0.0", 200),
    ("presence_penalty", "-0.0", 200), ("seed", str(2**64), 400), ("seed", "1" + "0" * 400, 400),
    ("top_k", str(2**64), 400), ("min_tokens", str(-(2**63) - 1), 400), ("n", str(2**64), 400),
    ("max_tokens", "1" + "0" * 30, 400), ("logprobs", str(2**70), 400), ("best_of", "1e400", 400),
    ("stop_token_ids", f"[{2**64}]", 400), ("stop_token_ids", "[1e400]", 400),
])
def test_served_out_of_range_json_numbers_are_400s_naming_the_field(served, field, raw, status):
    body = raw_body({"prompt": '"x"', "max_tokens": "2", field: raw})
    response = check_answer(served.url, COMPLETIONS, body)
    assert response.status_code == status, response.text
    if status == 400:
        assert strict_json(response.text)["error"]["param"].split(".")[0] == field


@pytest.mark.parametrize("messages, param", [
    ('[{"role": "user"}]', "messages.0.content"),
    ('[{"role": "user", "content": "hi"}, {"role": "user", "content": null}]',
     "messages.1.content"),
    ('[{"role": "system", "content": []}]', "messages.0.content"),
    ('[{"role": "user", "content": [{"type": "text", "text": 1}]}]', "messages.0.content.0.text"),
    ('[{"role": "user", "content": [{"type": "audio"}]}]', "messages.0.content.0.type"),
    ('[{"role": "user", "content": "hi"}, {"role": "assistant"}]', "messages.1.content"),
])
def test_served_chat_messages_without_content_are_400s(served, messages, param):
    response = httpx.post(served.url + CHAT, content=f'{{"messages": {messages}}}',
                          timeout=TIMEOUT)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_served_engine_is_sound_afterwards(served):
    served.sound()


# ---- -dp 2 ------------------------------------------------------------------------------------
@settings(max_examples=20, **SETTINGS)
@given(request=bodies())
@_with_examples
def test_dp_any_numbers_get_a_result_or_a_4xx(served_dp, request):
    check_answer(served_dp.url, *request)
    served_dp.healthy()


def test_dp_engines_are_sound_afterwards(served_dp):
    served_dp.sound()


# ---- the P/D proxy ----------------------------------------------------------------------------
@settings(max_examples=20, **SETTINGS)
@given(request=bodies(max_tokens_default="6"))
@_with_examples
def test_proxy_any_numbers_get_a_result_or_a_4xx(proxied, request):
    check_answer(proxied.url, *request)
    proxied.healthy()


def test_proxied_instances_are_sound_afterwards(proxied):
    proxied.sound()
