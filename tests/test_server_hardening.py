"""One request must never hurt the others (issue 8): real `pp-engine serve` processes under
hostile input, plus in-process checks of the pieces.

- an HTTP fuzz suite (hypothesis) against one server: every answer is a 200 or a 4xx with an
  OpenAI error body, never a 5xx, and the server still serves correctly afterwards; bodies may
  ask for structured outputs with hostile schemas, regexes and grammars
  (tests/hostile_constraints.py), and a battery sends each listed one on both routes;
- the reproductions of the issue: out-of-vocabulary stop_token_ids with min_tokens, integers
  beyond 64 bits and NaN/Infinity (400 naming the field, before any stream starts), a 20 MB
  body (413, fast, /health unaffected), a prompt under the body limit but far over the context
  (400 before tokenizing, /health unaffected);
- --protect-metrics; engine death (the server exits with code 1, nothing left behind);
  --restart-engine (a fresh engine core, the old one reaped); per-request engine errors.

Every server process is started in its own process group and stopped by pid; each test that
ends a server checks that no process of its group is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests import hostile_constraints
from tests.checkpoints import make_checkpoint
from tests.servers import REPO, ServerProcess, async_wait_for, metric_sum, wait_for
from tests.test_server import sse_events
from tests.text_checkpoint import add_tokenizer

API_KEY = "sk-hardening"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "tiny-llama"
MAX_MODEL_LEN = 1024
MAX_REQUEST_BYTES = 4 << 20  # the default
TIMEOUT = 30.0
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
GOOD = {"model": MODEL, "prompt": "def hello(world):", "max_tokens": 8, "temperature": 0}
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


# ---- processes --------------------------------------------------------------------------------
def _state(pid: int) -> str | None:
    """The /proc state letter of `pid` ("Z": a zombie), None once it is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return children


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("hardening-model")
    return add_tokenizer(make_checkpoint(str(root), "llama"), str(root / "llama-tok"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    log = str(tmp_path_factory.mktemp("hardening-log") / "server.log")
    proc = ServerProcess(model_dir, log, "--api-key", API_KEY, "--protect-metrics",
                         "--max-model-len", str(MAX_MODEL_LEN), "--disable-uvicorn-access-log")
    yield proc
    proc.stop_and_check()


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=TIMEOUT) as client:
        yield client


def _metrics(http: httpx.Client) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("ppengine:"):
            name, value = line.split("{")[0].split(" ")[0], line.rsplit(" ", 1)[1]
            values[name] = values.get(name, 0.0) + float(value)
    return values


def _wait_idle(http: httpx.Client, timeout_s: float = 20.0) -> dict[str, float]:
    def idle() -> dict[str, float] | None:
        m = _metrics(http)
        return m if m["ppengine:num_requests_running"] == 0 and \
            m["ppengine:num_free_kv_blocks"] == m["ppengine:num_kv_blocks"] else None

    return wait_for(idle, timeout_s, "the engine to go idle", lambda: str(_metrics(http)),
                    interval_s=0.1)


def _greedy_text(http: httpx.Client) -> str:
    response = http.post(COMPLETIONS, json=GOOD)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def expected_text(http) -> str:
    """The greedy completion of GOOD on the fresh server, to compare with afterwards."""
    return _greedy_text(http)


def _assert_openai_error(response: httpx.Response, case: object) -> dict:
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text[:500])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, (case, error)
    assert isinstance(error["message"], str) and error["message"], (case, error)
    return error


# Structured outputs: a stream whose constraint reaches a dead end (a rule that can never end,
# found only once generation walks into it) ends with a 400-kind error event naming the field.
CONSTRAINT_PARAMS = frozenset({"response_format", "structured_outputs", "guided_json",
                               "guided_regex", "guided_choice", "guided_grammar"})


def _check_answer(response: httpx.Response, stream: bool, case: object) -> None:
    """A 200 (a complete, error-free answer) or a 4xx with an OpenAI error body."""
    if response.status_code != 200:
        _assert_openai_error(response, case)
        return
    if not stream:
        assert response.json()["choices"], (case, response.text[:500])
        return
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", (case, response.text[-500:])
    for i, data in enumerate(events[:-1]):
        error = json.loads(data).get("error")
        if error is not None:
            assert i == len(events) - 2 and error["type"] == "invalid_request_error" \
                and error["param"] in CONSTRAINT_PARAMS, (case, data)


class HealthProbe:
    """Polls GET /health in a thread while a `with` block runs; `max_latency` in seconds."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=TIMEOUT) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                assert client.get(self.url + "/health").status_code == 200
                self.latencies.append(time.perf_counter() - start)
                self._stop.wait(0.01)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        self._wait_for_probes(1)  # probing before the block starts
        return self

    def __exit__(self, *exc: object) -> None:
        self._wait_for_probes(len(self.latencies) + 2)  # one begun after the block, answered
        self._stop.set()
        self._thread.join(TIMEOUT)

    def _wait_for_probes(self, count: int) -> None:
        wait_for(lambda: len(self.latencies) >= count or not self._thread.is_alive(), TIMEOUT,
                 f"{count} /health probes")
        assert self._thread.is_alive(), "the /health probe failed (see its traceback)"

    @property
    def max_latency(self) -> float:
        return max(self.latencies)


# ---- the HTTP fuzz suite ----------------------------------------------------------------------
HUGE_INTS = st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70, -(2**63) - 1,
                             -(2**70), 10**40])
INTS = st.integers(-3, 40) | HUGE_INTS
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 5e-324])
SCALARS = st.none() | st.booleans() | INTS | FLOATS | st.text(max_size=12)
JUNK = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=8)
NOT_NULL = JUNK.filter(lambda v: v is not None)  # null max_tokens would fill the context: slow
TEXT = st.text(max_size=40)
TOKEN_IDS = st.lists(st.integers(3, 511), min_size=1, max_size=8) | st.lists(
    st.integers(0, 600), max_size=8)  # the vocabulary has 512 ids


# Each field's plausible values (which may still be invalid together: stream_options without
# stream, min_tokens > max_tokens, token ids past the vocabulary, an empty prompt).
SHARED = {
    "model": st.just(MODEL),
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "seed": st.integers(0, 2**64 - 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "stop": TEXT | st.lists(TEXT, max_size=3),
    "stop_token_ids": TOKEN_IDS,
    "min_tokens": st.integers(0, 4),
    "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "return_token_ids": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logit_bias": st.just({}),
    "user": TEXT,
}
COMPLETION_FIELDS = {
    **SHARED,
    "prompt": TEXT | TOKEN_IDS | st.lists(TEXT, max_size=3) | st.lists(TOKEN_IDS, max_size=3),
    "max_tokens": st.integers(1, 4),
    "logprobs": st.integers(0, 5),
    "echo": st.booleans(),
    "suffix": st.none() | st.just("") | TEXT,
    "best_of": st.none() | st.just(1),
}
CONTENT = TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                          max_size=3)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool"]),
     "content": CONTENT | st.none()}, optional={"name": TEXT})
CHAT_FIELDS = {
    **SHARED,
    "messages": st.lists(MESSAGE, min_size=1, max_size=3),
    "max_tokens": st.integers(1, 4),
    "max_completion_tokens": st.integers(1, 4),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 5),
    "response_format": st.fixed_dictionaries({"type": st.just("text")}),
    "add_generation_prompt": st.booleans(),
    "chat_template_kwargs": st.dictionaries(st.text(max_size=8), JUNK, max_size=2),
    "tools": st.none(),
}
# Fields whose absence or null means "fill the context": junk for them is never null (slow).
NEVER_NULL = frozenset({"max_tokens", "max_completion_tokens"})
REQUIRED = {"/v1/completions": ("prompt", "max_tokens"), "/v1/chat/completions": (
    "messages", "max_tokens")}


@dataclass
class FuzzCase:
    """One request of the fuzz suite: the body to send and whether it asked for a stream."""

    body: bytes
    stream: bool

    def __repr__(self) -> str:
        return f"FuzzCase({self.body[:300]!r})"


def _junk_for(name: str) -> st.SearchStrategy:
    return NOT_NULL if name in NEVER_NULL else JUNK


@st.composite
def bodies(draw: st.DrawFn, route: str) -> FuzzCase:
    """A JSON body for `route`. Kinds: "valid" (every field plausible), "one-junk" (one field
    junk), "junky" (each field junk one time in three), JSON junk, and bytes that may not be
    JSON at all. The required fields are always present in objects (as plausible or junk)."""
    fields = COMPLETION_FIELDS if route == COMPLETIONS else CHAT_FIELDS
    required = REQUIRED[route]
    kind = draw(st.sampled_from(["valid"] * 4 + ["one-junk"] * 3 + ["junky"] * 2
                                + ["json-junk", "bytes"]))
    if kind == "bytes":
        return FuzzCase(draw(st.binary(max_size=40)), False)
    if kind == "json-junk":
        value = draw(JUNK)
    else:
        def pick(name: str) -> st.SearchStrategy:
            plausible = fields[name]
            return st.one_of(plausible, plausible, _junk_for(name)) if kind == "junky" \
                else plausible

        value = draw(st.fixed_dictionaries(
            {name: pick(name) for name in required},
            optional={name: pick(name) for name in fields if name not in required}))
        if kind == "one-junk":
            name = draw(st.sampled_from(sorted(fields)))
            value[name] = draw(_junk_for(name))
        value.update(draw(hostile_constraints.constraint_fields()))  # structured outputs
        # unknown fields are ignored
        value.update(draw(st.dictionaries(st.text(max_size=8).map(lambda s: "x-" + s), JUNK,
                                          max_size=2)))
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), allow_nan=True)
    if draw(st.booleans()):
        text = text.replace("Infinity", "1e999")  # the other spelling of an overflow
    stream = isinstance(value, dict) and value.get("stream") is True
    return FuzzCase(text.encode("utf-8", "surrogatepass"), stream)


# Random inputs on every local run; the same ones in CI (CI=true), so a landing is reproducible.
FUZZ = settings(max_examples=150, deadline=None, database=None,
                derandomize=bool(os.environ.get("CI")),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def _fuzz_post(http: httpx.Client, route: str, case: FuzzCase) -> None:
    response = http.post(route, content=case.body, headers={"Content-Type": "application/json"})
    event(f"HTTP {response.status_code}{' stream' if case.stream else ''}")
    if response.status_code != 200:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            event(f"param {response.json()['error']['param']}")
    _check_answer(response, case.stream, case)


@pytest.mark.parametrize("route", [COMPLETIONS, CHAT])
def test_fuzz(server, http, expected_text, route):
    """150 hypothesis bodies against `route`; then the server still serves: the same greedy
    text as before, /health 200, and every KV block free once idle."""

    @FUZZ
    @given(case=bodies(route))
    def fuzz(case: FuzzCase) -> None:
        _fuzz_post(http, route, case)

    fuzz()
    assert _greedy_text(http) == expected_text
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200
    m = _wait_idle(http)
    assert m["ppengine:num_requests_waiting"] == 0 and m["ppengine:engine_restarts"] == 0
    assert server.proc.poll() is None


@pytest.mark.parametrize("route", [COMPLETIONS, CHAT])
def test_fuzz_constraints(server, http, expected_text, route):
    """A good body with one hostile constraint drawn (tests/hostile_constraints.py), streamed
    or not: a 200 or a 400 naming a constraint field; then the server serves as before."""

    @settings(FUZZ, max_examples=60)
    @given(fields=hostile_constraints.one_constraint(), stream=st.booleans(),
           max_tokens=st.integers(1, 3))
    def fuzz(fields: dict, stream: bool, max_tokens: int) -> None:
        body = {**(GOOD if route == COMPLETIONS else GOOD_CHAT), **fields, "stream": stream,
                "max_tokens": max_tokens}
        case = FuzzCase(json.dumps(body, allow_nan=True).encode(), stream)
        response = http.post(route, content=case.body,
                             headers={"Content-Type": "application/json"})
        event(f"HTTP {response.status_code}")
        assert response.status_code in (200, 400), (case, response.text[:300])
        _check_answer(response, stream, case)
        if response.status_code == 400:
            error = response.json()["error"]
            assert str(error["param"]).split(".")[0] in CONSTRAINT_PARAMS | {
                "guided_decoding_backend"} or "not valid JSON" in error["message"], \
                (case, error)

    fuzz()
    assert _greedy_text(http) == expected_text
    m = _wait_idle(http)
    assert m["ppengine:num_requests_waiting"] == 0 and m["ppengine:engine_restarts"] == 0


HOSTILE = [("guided_json", v) for v in hostile_constraints.SCHEMAS] + [
    ("guided_regex", v) for v in hostile_constraints.REGEXES] + [
    ("guided_grammar", v) for v in hostile_constraints.GRAMMARS] + [
    ("guided_choice", v) for v in hostile_constraints.CHOICES]


def test_hostile_constraints_are_200_or_400(server, http, expected_text):
    """Every listed hostile constraint, on both routes, streamed or not: a 200 (obeyed, or run
    to max_tokens) or a 400 naming the field, never a 5xx; then the server serves as before,
    /health is 200 and every KV block is free."""
    answers: dict[int, int] = {}
    for i, (field, value) in enumerate(HOSTILE):
        for route, good in ((COMPLETIONS, GOOD), (CHAT, GOOD_CHAT)):
            stream = i % 2 == 1
            body = {**good, "max_tokens": 3, "stream": stream, field: value}
            response = http.post(route, content=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
            case = (route, field, repr(value)[:80])
            answers[response.status_code] = answers.get(response.status_code, 0) + 1
            assert response.status_code in (200, 400), (case, response.text[:300])
            _check_answer(response, stream, case)
            if response.status_code == 400:  # naming the field (a lone surrogate: the body)
                error = response.json()["error"]
                assert str(error["param"]).split(".")[0] == field or (
                    error["param"] is None and "not valid JSON" in error["message"]), \
                    (case, response.text[:300])
    assert answers.get(200) and answers.get(400), answers  # both kinds were met
    assert _greedy_text(http) == expected_text
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200
    m = _wait_idle(http)
    assert m["ppengine:num_requests_waiting"] == 0 and m["ppengine:engine_restarts"] == 0


# ---- the reproductions ------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_out_of_vocab_stop_token_ids_with_min_tokens(http, expected_text, stream):
    """Once killed the engine; now a 400 naming stop_token_ids, and the server serves on."""
    body = {"prompt": "x", "max_tokens": 4, "min_tokens": 2, "stop_token_ids": [99999],
            "stream": stream}
    for route, request in ((COMPLETIONS, body), (CHAT, {
            **{k: v for k, v in body.items() if k != "prompt"},
            "messages": [{"role": "user", "content": "x"}]})):
        response = http.post(route, json=request)
        assert response.status_code == 400, response.text
        assert _assert_openai_error(response, request)["param"] == "stop_token_ids"
    assert _greedy_text(http) == expected_text


OVERFLOWS = [
    # (field, value, endpoints); each must be a 400 whose param names the field
    ("seed", 2**70, "both"),
    ("seed", -(2**63) - 1, "both"),
    ("seed", 2**64, "both"),
    ("top_k", 2**70, "both"),
    ("stop_token_ids", [2**70], "both"),
    ("stop_token_ids", [-1], "both"),
    ("min_tokens", 2**70, "both"),
    ("max_tokens", 2**70, "both"),
    ("max_tokens", 2**64, "both"),
    ("n", 2**70, "both"),
    ("logprobs", 2**70, "completions"),
    ("top_logprobs", 2**70, "chat"),
    ("prompt", [2**70], "completions"),
    ("prompt", [[1, 2], [2**64]], "completions"),
    ("temperature", float("nan"), "both"),
    ("temperature", float("inf"), "both"),
    ("top_p", float("nan"), "both"),
    ("min_p", float("-inf"), "both"),
    ("presence_penalty", float("inf"), "both"),
    ("repetition_penalty", float("nan"), "both"),
    ("frequency_penalty", "1e999", "both"),  # a JSON number that overflows a double
]


@pytest.mark.parametrize("field,value,endpoints", OVERFLOWS,
                         ids=[f"{f}={str(v)[:12]}" for f, v, _ in OVERFLOWS])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_overflowing_numbers_are_400_before_streaming(http, field, value, endpoints, stream):
    routes = {"both": [(COMPLETIONS, GOOD), (CHAT, GOOD_CHAT)],
              "completions": [(COMPLETIONS, GOOD)], "chat": [(CHAT, GOOD_CHAT)]}[endpoints]
    for route, good in routes:
        body = {**good, "stream": stream, field: value}
        if field == "top_logprobs":
            body["logprobs"] = True
        text = json.dumps(body, allow_nan=True)
        if value == "1e999":
            text = text.replace('"1e999"', "1e999")
        response = http.post(route, content=text, headers={"Content-Type": "application/json"})
        case = (route, field, value, stream)
        assert response.status_code == 400, (case, response.text)  # not a 200 + SSE error
        assert response.headers["content-type"].startswith("application/json"), case
        assert _assert_openai_error(response, case)["param"].split(".")[0] == field, \
            (case, response.text)


def test_request_size_caps(http, expected_text):
    """Each prompt is an engine request and each stop is checked every step: both are capped."""
    cases = [(COMPLETIONS, {**GOOD, "prompt": [[5]] * 1025}, "prompt"),
             (COMPLETIONS, {**GOOD, "stop": ["a"] * 65}, "stop"),
             (CHAT, {**GOOD_CHAT, "stop_token_ids": [5] * 1025, "stream": True},
              "stop_token_ids")]
    for route, body, param in cases:
        response = http.post(route, json=body)
        assert response.status_code == 400, response.text[:300]
        assert _assert_openai_error(response, route)["param"] == param
    assert http.post(COMPLETIONS, json={**GOOD, "prompt": [[5]] * 4, "max_tokens": 1,
                                        "stop": ["a"] * 64}).status_code == 200
    assert _greedy_text(http) == expected_text


def test_20mb_body_is_413_fast_and_health_stays_fast(server, http, expected_text):
    prompt = "hello world " * (20_000_000 // 12)
    body = json.dumps({**GOOD, "prompt": prompt}).encode()

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit counts received bytes
        for i in range(0, len(body), 1 << 16):
            yield body[i:i + (1 << 16)]

    with HealthProbe(server.url) as probe:
        for content in (body, chunked()):
            start = time.monotonic()
            response = http.post(COMPLETIONS, content=content,
                                 headers={"Content-Type": "application/json"})
            elapsed = time.monotonic() - start
            assert response.status_code == 413, response.text[:300]
            error = response.json()["error"]
            assert error == {"message": error["message"], "type": "invalid_request_error",
                             "param": None, "code": 413}
            assert elapsed < 5, elapsed
    assert probe.max_latency < 0.5, probe.max_latency
    assert _greedy_text(http) == expected_text


def test_long_prompt_under_the_body_limit_is_400_without_stalling(server, http):
    """Just under the body limit, far over max_model_len: refused by its length, before any
    tokenizing, while /health stays fast. The same for chat messages, and for a prompt short
    enough to pass the length bound (tokenized off the event loop, then refused)."""
    near_limit = "hello world " * ((MAX_REQUEST_BYTES - 1000) // 12)
    shorter = "hello world " * 7000  # 84k characters: passes the character bound
    cases = [(COMPLETIONS, {**GOOD, "prompt": near_limit}, "prompt"),
             (COMPLETIONS, {**GOOD, "prompt": ["hi", near_limit]}, "prompt"),
             (CHAT, {**GOOD_CHAT, "messages": [{"role": "user", "content": near_limit}]},
              "messages"),
             (CHAT, {**GOOD_CHAT, "stream": True, "messages": [
                 {"role": "system", "content": near_limit[:len(near_limit) // 2]},
                 {"role": "user", "content": near_limit[:len(near_limit) // 2]}]}, "messages"),
             (COMPLETIONS, {**GOOD, "prompt": shorter}, "prompt")]
    with HealthProbe(server.url) as probe:
        for route, body, param in cases:
            start = time.monotonic()
            response = http.post(route, json=body)
            elapsed = time.monotonic() - start
            assert response.status_code == 400, response.text[:300]
            assert _assert_openai_error(response, route)["param"] == param
            assert elapsed < 3, (route, param, elapsed)
    assert probe.max_latency < 0.5, probe.max_latency


# ---- --protect-metrics ------------------------------------------------------------------------
def test_protect_metrics(server, http):
    assert httpx.get(server.url + "/metrics", timeout=TIMEOUT).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.get(server.url + "/metrics", headers=wrong, timeout=TIMEOUT).status_code == 401
    response = http.get("/metrics")
    assert response.status_code == 200 and "ppengine:num_kv_blocks" in response.text
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200
    assert "version" in httpx.get(server.url + "/version", timeout=TIMEOUT).json()


def test_protect_metrics_needs_an_api_key(model_dir):
    result = subprocess.run([sys.executable, "-m", "engine_core", "serve", model_dir,
                             "--protect-metrics", "--port", "0"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--protect-metrics needs --api-key" in result.stderr


# ---- engine death -----------------------------------------------------------------------------
def test_engine_death_exits_nonzero_and_leaves_nothing(model_dir, tmp_path):
    server = ServerProcess(model_dir, str(tmp_path / "server.log"))
    try:
        engine = server.engine_pid()
        assert httpx.post(server.url + COMPLETIONS, json=GOOD, timeout=TIMEOUT).status_code == 200
        start = time.monotonic()
        os.kill(engine, signal.SIGKILL)
        assert server.proc.wait(30) == 1, server.log()
        assert time.monotonic() - start < 20
        assert "the engine core died" in server.log()
        server.assert_nothing_left()
    finally:
        server.stop()


def test_restart_engine(model_dir, tmp_path):
    server = ServerProcess(model_dir, str(tmp_path / "server.log"), "--restart-engine")
    try:
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
            expected = _greedy_text(client)
            old = server.engine_pid()

            async def in_flight() -> httpx.Response:
                async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as aclient:
                    task = asyncio.create_task(aclient.post(COMPLETIONS, json={
                        **GOOD, "max_tokens": 1000, "ignore_eos": True}))

                    async def running() -> bool:  # the engine has the request: kill it now
                        text = (await aclient.get("/metrics")).text
                        return metric_sum(text, "ppengine:num_requests_running") >= 1

                    await async_wait_for(running, TIMEOUT, "the request to run")
                    os.kill(old, signal.SIGKILL)
                    return await task

            response = asyncio.run(asyncio.wait_for(in_flight(), TIMEOUT))
            assert response.status_code == 500, response.text
            assert response.json()["error"]["code"] == "engine_dead"
            assert client.get("/health").status_code == 503  # restarting

            def restarted() -> bool:
                assert server.proc.poll() is None, server.log()
                with contextlib.suppress(httpx.HTTPError, RuntimeError):
                    return client.get("/health").status_code == 200 and \
                        server.engine_pid() != old
                return False

            wait_for(restarted, 60, "a restarted engine", server.log, interval_s=0.2)
            assert _state(old) is None, "the old engine process was not reaped"
            assert all(_state(c) != "Z" for c in _children(server.proc.pid))
            assert _greedy_text(client) == expected
            assert "restarting it (restart #1)" in server.log(full=True)
            text = client.get("/metrics").text
            assert 'ppengine:engine_restarts{model_name="tiny-llama"} 1.0' in text
    finally:
        server.stop_and_check()


# ---- in process: per-request engine errors, the tokenizer's character bound -------------------
class _FakeLLM:
    """Just enough of AsyncLLM for build_app: a prompt containing "boom" fails in the engine
    (finish_reason "error") after one token; every other prompt yields "ok" and finishes."""

    def __init__(self, tokenizer) -> None:
        from types import SimpleNamespace

        from engine_core.entrypoints.input_processor import InputProcessor
        from engine_core.messages import SchedulerStats

        self.tokenizer = tokenizer
        self.config = SimpleNamespace(scheduler=SimpleNamespace(max_model_len=64, policy="fcfs"),
                                      model=SimpleNamespace(vocab_size=512, eos_token_ids=()),
                                      model_dir="fake", tokenizer_path="fake",
                                      generation_config="vllm",
                                      max_logprobs=20)
        self.input_processor = InputProcessor(self.config, tokenizer)
        self.stats = SchedulerStats()
        self.num_restarts = 0
        self.is_running = True

    async def generate_processed(self, request, request_id, **_ignored) -> AsyncIterator:
        from engine_core.outputs import CompletionOutput, RequestOutput

        prompt_ids, params = request.prompt.token_ids, request.params
        boom = "boom" in self.tokenizer.decode(prompt_ids)
        for step in (1, 2):
            await asyncio.sleep(0.01)  # paces the fake engine's outputs
            finish = ("error" if boom else "length") if step == 2 else None
            outputs = [CompletionOutput(i, "ok"[:step], [5] * step, finish_reason=finish,
                                        error="CUDA error: out of memory" if boom else None)
                       for i in range(params.n)]
            yield RequestOutput(request_id, None, prompt_ids, outputs, finished=step == 2)


def test_per_request_engine_error_is_500_and_others_go_on(model_dir):
    from engine_core.models import load_tokenizer

    from engine_core.entrypoints.openai import build_app

    app = build_app(_FakeLLM(load_tokenizer(model_dir)), MODEL)

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     timeout=TIMEOUT) as client:
            bodies = [{"prompt": "boom", "max_tokens": 2}, {"prompt": "fine", "max_tokens": 2},
                      {"prompt": "boom", "max_tokens": 2, "stream": True},
                      {"prompt": "fine", "max_tokens": 2, "stream": True}]
            answers = [client.post(COMPLETIONS, json=b) for b in bodies]
            answers.append(client.post(CHAT, json={
                "messages": [{"role": "user", "content": "boom"}], "max_tokens": 2,
                "stream": True}))
            return await asyncio.gather(*answers)

    failed, fine, failed_stream, fine_stream, failed_chat = asyncio.run(run())
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "out of memory" in error["message"]
    assert fine.status_code == 200 and fine.json()["choices"][0]["finish_reason"] == "length"
    for stream in (failed_stream, failed_chat):
        events = list(sse_events(stream))
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "internal_error"
    events = list(sse_events(fine_stream))
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])


def test_build_app_limits_in_process(model_dir):
    from engine_core.models import load_tokenizer

    from engine_core.entrypoints.openai import build_app

    llm = _FakeLLM(load_tokenizer(model_dir))
    with pytest.raises(ValueError, match="api_key"):
        build_app(llm, MODEL, protect_metrics=True)
    app = build_app(llm, MODEL, max_request_bytes=200)

    async def run() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     timeout=TIMEOUT) as client:
            small = await client.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2})
            large = await client.post(COMPLETIONS, json={"prompt": "x" * 300})
            return small, large

    small, large = asyncio.run(run())
    assert small.status_code == 200
    assert large.status_code == 413 and large.json()["error"]["code"] == 413


def test_max_chars_per_token(model_dir):
    from engine_core.models import load_tokenizer
    from engine_core.models.tokenizer import Tokenizer as PPTokenizer
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tokenizer = load_tokenizer(model_dir)  # byte-level BPE: the longest token's length
    bound = tokenizer.max_chars_per_token
    assert bound == max(len(t) for t in tokenizer.backend.get_vocab())
    text = "hello world, naïve café ✓ 日本語 " * 50
    assert len(text) <= bound * len(tokenizer.encode(text, False))

    vocab = {"<unk>": 0, "▁": 1, "a": 2, "▁abc": 3, "<0x41>": 4, "<0xE2>": 5}
    spm = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    assert PPTokenizer(spm).max_chars_per_token == 5  # "<unk>"; "<0x41>" covers one char
    spm.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Strip()])
    assert PPTokenizer(spm).max_chars_per_token is None  # Strip drops characters
    words = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    assert PPTokenizer(words).max_chars_per_token is None  # whitespace is dropped
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert PPTokenizer(wordpiece).max_chars_per_token is None  # a word -> one [UNK]


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_a_stream_whose_send_fails_closes_its_generator_before_returning(spec_version):
    """A client gone in the middle of a send: the SSE generator is closed (its `finally` aborts
    the engine requests behind it) before the response returns, not whenever the garbage
    collector gets to it."""
    from engine_core.entrypoints.http.setup import ClosingStreamingResponse

    closed: list[bool] = []

    async def events() -> AsyncIterator[str]:
        try:
            for i in range(100):
                yield f"data: {i}\n\n"
                await asyncio.sleep(0)
        finally:
            closed.append(True)

    async def run() -> None:
        response = ClosingStreamingResponse(events(), media_type="text/event-stream")
        sent: list[dict] = []

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body" and len(sent) >= 3:
                raise OSError("the client is gone")
            sent.append(message)

        async def receive() -> dict:
            await asyncio.Event().wait()  # the disconnect is never reported
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}}
        with pytest.raises(Exception):  # noqa: B017 (OSError, or starlette's ClientDisconnect)
            await response(scope, receive, send)
        assert closed == [True]  # `response` still holds the generator here
        assert len(sent) == 3

    asyncio.run(asyncio.wait_for(run(), TIMEOUT))


def test_work_that_ends_after_its_client_left_has_its_result_discarded():
    """`unless_disconnected` cancels the work of a client that went away; work that ends with a
    result all the same (Python 3.11's `asyncio.wait_for` swallows a cancellation that meets
    its inner wait's completion) has it handed to `discard`, never leaked."""
    from starlette.requests import Request

    from engine_core.entrypoints.http.disconnect import ClientDisconnected, unless_disconnected

    async def run() -> list[str]:
        discarded: list[str] = []

        async def stubborn() -> str:
            with contextlib.suppress(asyncio.CancelledError):  # as wait_for does in the race
                await asyncio.sleep(10)
            await asyncio.sleep(0.01)
            return "an open stream"

        async def receive() -> dict:
            return {"type": "http.disconnect"}

        request = Request({"type": "http", "method": "POST", "headers": []}, receive)
        with pytest.raises(ClientDisconnected):
            await unless_disconnected(request, stubborn(), discard=discarded.append)
        for _ in range(50):
            if discarded:
                break
            await asyncio.sleep(0.01)
        return discarded

    assert asyncio.run(asyncio.wait_for(run(), TIMEOUT)) == ["an open stream"]
