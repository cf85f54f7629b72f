"""`InputProcessor`: every prompt form becomes the same token ids, the EOS set is computed once,
each bad field is a ValueError naming it, and the engine-core requests of a user request carry
what they must. Through `AsyncLLM` and the OpenAI serving (over a stand-in engine core), every
request is checked exactly once, and a proxied request's KV transfer side goes in and comes back
as typed values.

Uses the default model's real config and tokenizer; no model weights are loaded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from engine_core.models import Tokenizer, default_model_dir, load_tokenizer

from engine_core.config import EngineArgs, EngineConfig
from engine_core.entrypoints import input_processor as input_module
from engine_core.entrypoints.async_llm import AsyncLLM
from engine_core.entrypoints.input_processor import InputProcessor, ProcessedRequest
from engine_core.entrypoints.openai.api_server import build_app
from engine_core.entrypoints.openai.proxied import KVTransferRequest
from engine_core.entrypoints.openai.serving import OpenAIServing
from engine_core.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    SchedulerStats,
)
from engine_core.sampling_params import WIRE_INT_MAX, WIRE_INT_MIN, SamplingParams
from engine_core.transfer_params import KVTransferParams

pytestmark = pytest.mark.timeout(60)
MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def config() -> EngineConfig:
    return EngineArgs(model=default_model_dir(), max_model_len=MAX_MODEL_LEN).resolve()


@pytest.fixture(scope="module")
def tokenizer(config: EngineConfig) -> Tokenizer:
    tokenizer = load_tokenizer(config.model_dir)
    assert tokenizer is not None
    return tokenizer


@pytest.fixture
def inputs(config: EngineConfig, tokenizer: Tokenizer) -> InputProcessor:
    return InputProcessor(config, tokenizer)


# ---- the EOS set ------------------------------------------------------------------------------
def test_eos_ids_join_the_model_config_and_the_tokenizer(config, tokenizer):
    model = dataclasses.replace(config.model, eos_token_ids=(7, 5))
    both = InputProcessor(dataclasses.replace(config, model=model), tokenizer)
    assert both.eos_token_ids == sorted({5, 7, tokenizer.eos_token_id})
    no_tokenizer = InputProcessor(dataclasses.replace(config, model=model), None)
    assert no_tokenizer.eos_token_ids == [5, 7]


def test_every_engine_request_carries_the_eos_set_computed_once(inputs, monkeypatch):
    request = inputs.process("hello", SamplingParams(n=2))
    expected = list(inputs.eos_token_ids)
    monkeypatch.setattr(type(inputs.tokenizer), "eos_token_id",
                        property(lambda _: pytest.fail("the EOS set was computed again")))
    core = inputs.make_requests("r", request, arrival_time=0.0)
    assert [r.eos_token_ids for r in core] == [expected, expected]
    core[0].eos_token_ids.append(99)  # each request has its own list
    assert inputs.eos_token_ids == expected and core[1].eos_token_ids == expected


# ---- prompt forms -----------------------------------------------------------------------------
def test_every_prompt_form_gives_the_same_token_ids(inputs, tokenizer):
    text = "def hello(world):"
    ids = tokenizer.encode(text)
    bare = tokenizer.encode(text, add_special_tokens=False)
    assert bare != ids  # the model's tokenizer adds BOS: the flag below is visible
    cases = [
        (text, {}, text, ids),
        ({"prompt": text}, {}, text, ids),
        (ids, {}, None, ids),
        ({"prompt_token_ids": ids}, {}, None, ids),
        ({"prompt_token_ids": tuple(ids), "prompt": text}, {}, text, ids),
        (text, {"add_special_tokens": False}, text, bare),
        ({"prompt": text, "add_special_tokens": False}, {}, text, bare),
        ({"prompt": text, "add_special_tokens": True}, {"add_special_tokens": False}, text, ids),
    ]
    for prompt, kwargs, want_text, want_ids in cases:
        processed = inputs.process_prompt(prompt, **kwargs)
        assert (processed.text, processed.token_ids) == (want_text, want_ids), prompt
        assert isinstance(processed.token_ids, list)


@pytest.mark.parametrize("prompt, message", [
    ("", r"^the prompt is empty; give at least one character"),
    ({"prompt": ""}, r"^the prompt is empty"),
    ([], r"^the prompt is empty; give at least one token"),
    ({"prompt_token_ids": []}, r"^the prompt is empty"),
    ([1, 99999], r"^prompt token ids must be ints in \[0, \d+\) \(the vocabulary\); got \[99999\]"),
    ([1, -3], r"^prompt token ids must be ints"),
    ([1, True], r"^prompt token ids must be ints"),
    (list(range(3, 3 + MAX_MODEL_LEN + 1)), r"^the prompt has 65 tokens, more than "
                                            r"max_model_len=64"),
    ({"bad": 1}, r"^a prompt dict needs 'prompt_token_ids' or 'prompt'"),
    ({"prompt_token_ids": 5}, r"^prompt_token_ids must be a list of ints"),
    ({"prompt": 5}, r"^prompt must be a str, got int"),
    (42, r"^a prompt must be a str, a list of token ids or a dict .*got int"),
])
def test_a_bad_prompt_is_a_value_error_naming_it(inputs, prompt, message):
    with pytest.raises(ValueError, match=message):
        inputs.process_prompt(prompt)


def test_text_needs_a_tokenizer(config):
    bare = InputProcessor(config, None)
    with pytest.raises(ValueError, match=r"^this model directory has no tokenizer\.json"):
        bare.process_prompt("hello")
    assert bare.process_prompt([5, 6]).token_ids == [5, 6]
    assert bare.max_prompt_chars is None
    bare.check_prompt_chars(10**9)  # no bound without a tokenizer: only tokenizing tells
    with pytest.raises(ValueError, match=r"^stop strings need a tokenizer"):
        bare.check_sampling_params(SamplingParams(stop=["x"]))


def test_a_text_too_long_for_the_context_is_refused_by_its_length(inputs):
    limit = inputs.max_prompt_chars
    assert limit is not None and limit >= MAX_MODEL_LEN
    inputs.check_prompt_chars(limit)
    with pytest.raises(ValueError, match=rf"^the messages have {limit + 1} characters, more "
                                         rf"than the {MAX_MODEL_LEN} tokens"):
        inputs.check_prompt_chars(limit + 1, "the messages have")


# ---- parameters and priority ------------------------------------------------------------------
@pytest.mark.parametrize("params, message", [
    (SamplingParams(stop_token_ids=[1, 10**6]), r"^stop_token_ids must be token ids in \[0, "),
    (SamplingParams(n=1025), r"^n must be <= 1024"),
])
def test_parameters_that_do_not_fit_the_model_name_the_field(inputs, params, message):
    with pytest.raises(ValueError, match=message):
        inputs.check_sampling_params(params)
    with pytest.raises(ValueError, match=message):
        inputs.process("hello", params)


def test_priority_needs_the_priority_policy(config, tokenizer, inputs):
    with pytest.raises(ValueError, match=r"^priority 1 needs priority scheduling"):
        inputs.check_priority(1)
    with pytest.raises(ValueError, match=r"^priority must be an int, got bool"):
        inputs.check_priority(True)
    scheduler = dataclasses.replace(config.scheduler, policy="priority")
    ranked = InputProcessor(dataclasses.replace(config, scheduler=scheduler), tokenizer)
    ranked.check_priority(-5)
    with pytest.raises(ValueError, match=r"^priority must be an int64"):
        ranked.check_priority(1 << 63)


def test_batch_forms_name_the_entry_at_fault(inputs):
    good, bad = SamplingParams(), SamplingParams(stop_token_ids=[10**6])
    assert inputs.params_per_prompt(None, 2) == [SamplingParams(), SamplingParams()]
    assert inputs.params_per_prompt(good, 3) == [good] * 3
    with pytest.raises(ValueError, match=r"^sampling_params has 1 entries for 2 prompts"):
        inputs.params_per_prompt([good], 2)
    with pytest.raises(ValueError, match=r"^sampling_params\[1\]: stop_token_ids"):
        inputs.params_per_prompt([good, bad], 2)
    assert inputs.priorities_per_prompt(None, 2) == [0, 0]
    with pytest.raises(ValueError, match=r"^priority must be a list of ints"):
        inputs.priorities_per_prompt(0, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^priority has 1 entries for 2 prompts"):
        inputs.priorities_per_prompt([0], 2)
    with pytest.raises(ValueError, match=r"^priority 3 needs priority scheduling.*"
                                         r"\(priority\[1\]\)$"):
        inputs.priorities_per_prompt([0, 3], 2)


# ---- engine-core requests ---------------------------------------------------------------------
def test_each_sequence_is_an_engine_request_with_its_owner_priority_and_seed(inputs):
    push = KVTransferParams("tcp://d:1", [], 0, "h", "lease")
    request = ProcessedRequest(inputs.process_prompt([5, 6, 7]),
                               SamplingParams(n=3, seed=WIRE_INT_MAX - 1), priority=4)
    core = inputs.make_requests("cmpl-1-0", request, arrival_time=12.5, owner_id="cmpl-1",
                                do_remote_decode=True, kv_transfer_params=push)
    assert [r.request_id for r in core] == ["0_cmpl-1-0", "1_cmpl-1-0", "2_cmpl-1-0"]
    assert [(r.owner_id, r.priority, r.arrival_time) for r in core] == [("cmpl-1", 4, 12.5)] * 3
    assert [r.sampling_params.n for r in core] == [1, 1, 1]
    assert [r.sampling_params.seed for r in core] == [WIRE_INT_MAX - 1, WIRE_INT_MAX,
                                                      WIRE_INT_MIN]  # wrapped, still distinct
    assert all(r.do_remote_decode and r.prompt_token_ids == [5, 6, 7] for r in core)
    assert [r.kv_transfer_params for r in core] == [push, None, None]  # the others compute
    alone = inputs.make_requests("7", inputs.process([1, 2], SamplingParams()),
                                 arrival_time=0.0)
    assert [(r.request_id, r.owner_id, r.do_remote_decode) for r in alone] == [("7", "7", False)]


# ---- checked once, through the front-ends -----------------------------------------------------
class StandInEngine:
    """Stands in for the engine core behind `AsyncLLM`: every request finishes at once with
    its prompt's first token; one that keeps its KV for a decoder returns params naming it."""

    def __init__(self) -> None:
        self.requests: list[EngineCoreRequest] = []
        self._outputs: asyncio.Queue[EngineCoreOutputs] = asyncio.Queue()

    def add_requests(self, requests: Sequence[EngineCoreRequest]) -> None:
        self.requests.extend(requests)
        self._outputs.put_nowait(EngineCoreOutputs([EngineCoreOutput(
            r.request_id, r.prompt_token_ids[:1], finish_reason="length",
            kv_transfer_params=returned_params(r.request_id) if r.do_remote_decode else None)
            for r in requests]))

    def abort_requests(self, request_ids: list[str]) -> None:
        pass

    async def get_outputs(self) -> EngineCoreOutputs:
        return await self._outputs.get()

    def engine_states(self) -> list:
        return []

    def stats(self) -> SchedulerStats:
        return SchedulerStats()

    def is_alive(self) -> bool:
        return True

    def stop_engines(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def returned_params(request_id: str) -> KVTransferParams:
    return KVTransferParams("tcp://p:1", [3], 16, "h", f"held-{request_id}")


@pytest.fixture
def counted(monkeypatch) -> Iterator[dict[str, int]]:
    """How often each validator of the input processor ran."""
    calls = {"prompt": 0, "sampling_params": 0, "priority": 0}
    for name in calls:
        real = getattr(input_module, f"validate_{name}")

        def counting(*args: Any, _real: Any = real, _name: str = name) -> None:
            calls[_name] += 1
            _real(*args)

        monkeypatch.setattr(input_module, f"validate_{name}", counting)
    yield calls


def _with_llm(config: EngineConfig, tokenizer: Tokenizer, scenario: Any) -> Any:
    async def main() -> Any:
        engine = StandInEngine()
        llm = AsyncLLM(config, tokenizer, engine)
        llm._output_task = asyncio.get_running_loop().create_task(llm._pump_outputs())
        try:
            return await asyncio.wait_for(scenario(llm, engine), 30)
        finally:
            llm.shutdown()

    return asyncio.run(main())


def test_async_llm_checks_each_request_once(config, tokenizer, counted):
    async def scenario(llm: AsyncLLM, engine: StandInEngine) -> None:
        outputs = [o async for o in llm.generate("hello", SamplingParams(n=2), "a")]
        assert outputs[-1].finished and outputs[-1].prompt == "hello"
        assert counted == {"prompt": 1, "sampling_params": 1, "priority": 1}
        request = llm.input_processor.process([5, 6], SamplingParams())
        assert counted == {"prompt": 2, "sampling_params": 2, "priority": 2}
        async for _ in llm.generate_processed(request, "b"):
            pass
        assert counted == {"prompt": 2, "sampling_params": 2, "priority": 2}  # not again
        assert [r.request_id for r in engine.requests] == ["0_a", "1_a", "b"]
        with pytest.raises(ValueError, match=r"^stop_token_ids"):
            async for _ in llm.generate("x", SamplingParams(stop_token_ids=[10**6])):
                pass
        assert len(engine.requests) == 3  # refused before anything was sent

    _with_llm(config, tokenizer, scenario)


def test_the_server_checks_each_prompt_once_and_answers_400s_naming_the_param(
        config, tokenizer, counted):
    async def scenario(llm: AsyncLLM, engine: StandInEngine) -> None:
        app = build_app(llm, "m")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            r = await http.post("/v1/completions", json={"prompt": ["a b", "c d"],
                                                         "max_tokens": 3})
            assert r.status_code == 200, r.text
            assert counted == {"prompt": 2, "sampling_params": 2, "priority": 1}
            r = await http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                "stream": True})
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
            assert counted == {"prompt": 3, "sampling_params": 3, "priority": 2}
            for body, param in [
                ({"prompt": "", "max_tokens": 2}, "prompt"),
                ({"prompt": [1, 10**6], "max_tokens": 2}, "prompt"),
                ({"prompt": ["ok", ""], "max_tokens": 2}, "prompt"),
                ({"prompt": "x" * (llm.input_processor.max_prompt_chars + 1)}, "prompt"),
                ({"prompt": "ok", "max_tokens": 2, "stop_token_ids": [10**6]},
                 "stop_token_ids"),
                ({"prompt": "ok", "max_tokens": 2, "priority": 1}, "priority"),
            ]:
                r = await http.post("/v1/completions", json=body)
                assert r.status_code == 400, (body, r.text)
                assert r.json()["error"]["param"] == param, r.text
        assert len(engine.requests) == 3  # no bad request reached the engine

    _with_llm(config, tokenizer, scenario)


# ---- the typed P/D seam -----------------------------------------------------------------------
class _Exchange:
    """One in-process ASGI exchange: the request body, then (on demand) a disconnect."""

    def __init__(self, path: str, body: bytes) -> None:
        self.scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                      "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
                      "raw_path": path.encode(), "root_path": "", "query_string": b"",
                      "headers": [(b"content-type", b"application/json")],
                      "client": ("proxy", 0), "server": ("t", 0)}
        self.body = body
        self.sent: list[dict[str, Any]] = []
        self._body_read = False
        self._gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if not self._body_read:
            self._body_read = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(dict(message))

    @property
    def status(self) -> int:
        return self.sent[0]["status"]

    @property
    def content(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])


class _Metrics:
    def record_tokens(self, *_: Any) -> None:
        pass

    def record_finished(self, *_: Any) -> None:
        pass


def test_a_proxied_request_gets_its_transfer_side_and_returns_the_params(config, tokenizer):
    push = KVTransferParams("tcp://d:1", [], 0, "h", "lease", send_type="PUT")
    pulled = KVTransferParams("tcp://p:1", [4], 16, "h", "from-p", send_type="GET")

    async def scenario(llm: AsyncLLM, engine: StandInEngine) -> None:
        serving = OpenAIServing(llm, "m", _Metrics(), max_request_bytes=200)  # type: ignore
        try:
            prefill = _Exchange("/v1/completions", json.dumps(
                {"prompt": ["a b", "c"], "max_tokens": 1}).encode())
            result = await serving.serve_proxied(prefill.scope, prefill.receive, prefill.send,
                                                 KVTransferRequest(True, push))
            assert prefill.status == 200 and json.loads(prefill.content)["choices"]
            sent = engine.requests[-2:]
            assert [(r.do_remote_decode, r.kv_transfer_params.lease_id) for r in sent] == [
                (True, "lease-0"), (True, "lease-1")]
            assert result.params == tuple(returned_params(r.request_id) for r in sent)

            for stream in (False, True):
                decode = _Exchange("/v1/chat/completions", json.dumps({
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                    "stream": stream}).encode())
                result = await serving.serve_proxied(decode.scope, decode.receive, decode.send,
                                                     KVTransferRequest(params_in=(pulled,)))
                assert decode.status == 200 and result.params == (None,)
                last = engine.requests[-1]
                assert not last.do_remote_decode and last.kv_transfer_params == pulled
                assert decode.content.endswith(b"data: [DONE]\n\n") == stream

            count = len(engine.requests)
            for path, body, status in [("/v1/nope", b"{}", 404),
                                       ("/v1/completions", b"x" * 201, 413),
                                       ("/v1/completions", b'{"prompt": ""}', 400)]:
                failed = _Exchange(path, body)
                result = await serving.serve_proxied(failed.scope, failed.receive, failed.send,
                                                     KVTransferRequest(True))
                assert failed.status == status and result.params == ()
                assert json.loads(failed.content)["error"]["message"]
            assert len(engine.requests) == count
        finally:
            serving.close()

    _with_llm(config, tokenizer, scenario)
