"""Structured outputs on `pp-engine serve` (the shipped default model), with the official
`openai` client: `response_format` (a pydantic model through `chat.completions.parse`, JSON
schemas, json_object), vLLM's `structured_outputs` (regex, choice, EBNF grammar, json_object)
and its older `guided_*` extras, on both routes, greedy and sampled, streamed and not. Every
output obeys its constraint (schemas checked with `jsonschema`, regexes with `re.fullmatch`);
a bounded constraint finishes with "stop" (the engine ends a request when its grammar is
complete). Every bad constraint is a 400 naming the field the client used; /health stays fast
while a constraint is checked, and every KV block comes back."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from engine_core.models import default_model_dir
from pydantic import BaseModel, Field

from tests.servers import ServerProcess
from tests.test_server import sse_events, wait_idle
from tests.test_server_hardening import HealthProbe

MODEL = "tiny-llama"
MAX_TOKENS = 300  # generous: a bounded constraint ends well before
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    log = str(tmp_path_factory.mktemp("structured-outputs") / "server.log")
    proc = ServerProcess(default_model_dir(), log, "--max-model-len", "1024",
                         "--disable-uvicorn-access-log")
    yield proc
    proc.stop_and_check()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                         timeout=TIMEOUT)


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        yield client


def generate(client: openai.OpenAI, route: str, *, n: int = 1, temperature: float = 0.0,
             stream: bool = False, prompt: str = "A record:", **fields: Any
             ) -> list[tuple[str, str | None]]:
    """(text, finish_reason) of each choice; a stream's deltas concatenated. `fields` go in
    the body (extra_body: the client's typed parameters are not needed for any of them)."""
    common: dict[str, Any] = {"model": MODEL, "max_tokens": MAX_TOKENS, "n": n,
                              "temperature": temperature, "seed": 1234, "stream": stream,
                              "extra_body": fields}
    texts, reasons = [""] * n, [None] * n
    if route == CHAT:
        messages = [{"role": "user", "content": prompt}]
        response = client.chat.completions.create(messages=messages, **common)
        if not stream:
            return [(c.message.content or "", c.finish_reason) for c in response.choices]
        for chunk in response:
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                reasons[c.index] = c.finish_reason or reasons[c.index]
    else:
        response = client.completions.create(prompt=prompt, **common)
        if not stream:
            return [(c.text, c.finish_reason) for c in response.choices]
        for chunk in response:
            for c in chunk.choices:
                texts[c.index] += c.text
                reasons[c.index] = c.finish_reason or reasons[c.index]
    return list(zip(texts, reasons))


# ---- response_format with a pydantic model --------------------------------------------------
class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)


class Person(BaseModel):
    name: str = Field(max_length=12)
    pets: list[Pet] = Field(max_length=2)  # a $ref to $defs/Pet in the schema


def test_parse_returns_the_pydantic_object(client):
    messages = [{"role": "user", "content": "A person and their pets, as JSON."}]
    completion = client.chat.completions.parse(model=MODEL, messages=messages,
                                               response_format=Person, max_tokens=MAX_TOKENS,
                                               temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    assert choice.message.parsed == Person.model_validate_json(choice.message.content)
    with client.chat.completions.stream(model=MODEL, messages=messages, response_format=Person,
                                        max_tokens=MAX_TOKENS, temperature=0) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert isinstance(streamed.message.parsed, Person)
    assert streamed.message.content == choice.message.content  # greedy: the same text


# ---- JSON schemas ---------------------------------------------------------------------------
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "y": {"type": "integer", "minimum": 0, "maximum": 99}},
         "required": ["x", "y"]}
# name -> (schema, bounded: every output it allows is short, so generation ends with "stop")
SCHEMAS: dict[str, tuple[dict[str, Any], bool]] = {
    "nested": ({"type": "object", "properties": {"user": {
        "type": "object", "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 999},
            "name": {"type": "string", "maxLength": 8},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                     "maxItems": 2}},
        "required": ["id", "name", "tags"]}}, "required": ["user"]}, True),
    "array": ({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
               "minItems": 2, "maxItems": 4}, True),
    "enums": ({"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "string", "enum": ["S", "M", "L"]},
        "level": {"enum": [1, 2, None]}}, "required": ["color", "size", "level"]}, True),
    "bounded-numbers": ({"type": "object", "properties": {
        "count": {"type": "integer", "minimum": -5, "maximum": 5},
        "score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["count", "score"]}, False),  # a number's digits are not bounded
    "required-and-optional": ({"type": "object", "properties": {
        "ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 5},
        "nothing": {"type": "null"}}, "required": ["ok", "nothing"]}, True),
    "refs": ({"$defs": {"point": POINT}, "type": "object", "properties": {
        "start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"]}, True),
}
# route, sampled (temperature 1, n=2) or greedy, streamed or not: each dimension both ways
MODES = [(CHAT, False, False), (CHAT, True, True), (COMPLETIONS, False, True),
         (COMPLETIONS, True, False)]


def check_json(outputs: list[tuple[str, str | None]], schema: dict[str, Any],
               bounded: bool) -> None:
    for text, reason in outputs:
        if bounded:
            assert reason == "stop", (text, reason)
        if reason == "stop":
            jsonschema.validate(json.loads(text), schema)
        else:
            assert reason == "length", (text, reason)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(
    [m[0].rsplit("/", 1)[1], "sampled" if m[1] else "greedy", "stream" if m[2] else "whole"]))
@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_outputs_validate(client, name, mode):
    schema, bounded = SCHEMAS[name]
    route, sampled, stream = mode
    response_format = {"type": "json_schema",
                       "json_schema": {"name": name.replace("-", "_"), "schema": schema,
                                       "strict": True}}
    outputs = generate(client, route, n=2 if sampled else 1, temperature=1.0 if sampled else 0,
                       stream=stream, response_format=response_format)
    assert len(outputs) == (2 if sampled else 1)
    check_json(outputs, schema, bounded)


def test_vllm_json_field_and_its_options(client):
    """structured_outputs.json, with vLLM's options that change nothing here."""
    schema, _ = SCHEMAS["refs"]
    outputs = generate(client, COMPLETIONS, n=2, temperature=1.0, structured_outputs={
        "json": schema, "disable_any_whitespace": True, "disable_additional_properties": True,
        "disable_fallback": True})
    check_json(outputs, schema, bounded=True)


# ---- regex, choice, grammar, json_object ------------------------------------------------------
REGEX = r"[a-z]{2,6}-[0-9]{2,4}"
CHOICES = ["alpha", "beta", "gamma delta"]
GRAMMAR = 'root ::= greeting " " name "!"\ngreeting ::= "hi" | "hello"\nname ::= [a-z] [a-z]?'
GRAMMAR_REGEX = r"(hi|hello) [a-z][a-z]?!"
CONSTRAINTS = {"regex": (REGEX, REGEX), "choice": (CHOICES, "|".join(map(re.escape, CHOICES))),
               "grammar": (GRAMMAR, GRAMMAR_REGEX)}


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("kind", CONSTRAINTS)
def test_regex_choice_and_grammar_are_matched_in_full(client, kind, route):
    value, pattern = CONSTRAINTS[kind]
    for sampled, stream in ((False, True), (True, False)):
        outputs = generate(client, route, n=2 if sampled else 1,
                           temperature=1.0 if sampled else 0, stream=stream,
                           structured_outputs={kind: value})
        for text, reason in outputs:
            assert reason == "stop" and re.fullmatch(pattern, text), (kind, text, reason)
            if kind == "choice":
                assert text in CHOICES


@pytest.mark.parametrize("field", ["response_format", "structured_outputs"])
def test_json_object_is_a_json_object(client, field):
    body = {"response_format": {"type": "json_object"}} if field == "response_format" \
        else {"structured_outputs": {"json_object": True}}
    # the shipped model closes this one at once when greedy; sampled, it may ramble on
    ((text, reason),) = generate(client, COMPLETIONS, prompt="config = ", **body)
    assert reason == "stop" and isinstance(json.loads(text), dict), text
    for text, reason in generate(client, CHAT, n=2, temperature=1.0, stream=True, **body):
        assert text.startswith("{"), text
        if reason == "stop":
            assert isinstance(json.loads(text), dict), text


# ---- vLLM's older guided_* extras -------------------------------------------------------------
GUIDED = {"guided_json": (SCHEMAS["array"][0], None), "guided_regex": (REGEX, REGEX),
          "guided_choice": (CHOICES, "|".join(map(re.escape, CHOICES))),
          "guided_grammar": (GRAMMAR, GRAMMAR_REGEX)}


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("field", GUIDED)
def test_guided_extras(client, field, route):
    value, pattern = GUIDED[field]
    outputs = generate(client, route, n=2, temperature=1.0, **{
        field: value, "guided_decoding_backend": "xgrammar"})
    for text, reason in outputs:
        assert reason == "stop", (text, reason)
        if pattern is None:
            jsonschema.validate(json.loads(text), value)
        else:
            assert re.fullmatch(pattern, text), text


def test_guided_json_as_json_text(client):
    schema = SCHEMAS["enums"][0]
    ((text, reason),) = generate(client, CHAT, guided_json=json.dumps(schema))
    assert reason == "stop"
    jsonschema.validate(json.loads(text), schema)


def test_text_response_format_is_no_constraint(client):
    """{"type": "text"} constrains nothing, so it may go with a guided_* field."""
    ((text, reason),) = generate(client, CHAT, response_format={"type": "text"},
                                 guided_regex="yes|no")
    assert reason == "stop" and text in ("yes", "no")


# ---- bad constraints: 400 naming the field --------------------------------------------------
def _schema_format(schema: object) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema",
                                "json_schema": {"name": "x", "schema": schema}}}


BAD: dict[str, tuple[dict[str, Any], str]] = {  # case -> (fields, the param named)
    "invalid schema": (_schema_format({"type": "foo"}), "response_format"),
    "schema not an object": (_schema_format([1, 2]), "response_format.json_schema.schema"),
    "json_schema missing": ({"response_format": {"type": "json_schema"}}, "response_format"),
    "unknown format type": ({"response_format": {"type": "yaml"}}, "response_format.type"),
    "min above max": ({"guided_json": {"type": "integer", "minimum": 5, "maximum": 1}},
                      "guided_json"),
    "json text not JSON": ({"guided_json": "{not json"}, "guided_json"),
    "bad regex": ({"guided_regex": "(("}, "guided_regex"),
    "lookahead": ({"structured_outputs": {"regex": "(?=a)b"}}, "structured_outputs"),
    "bad grammar": ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    "no root rule": ({"structured_outputs": {"grammar": 'start ::= "a"'}},
                     "structured_outputs"),
    "left recursion": ({"guided_grammar": 'root ::= root "a"'}, "guided_grammar"),
    "empty class": ({"guided_regex": "[^\\x00-\\U0010FFFF]"}, "guided_regex"),
    "two fields": ({"guided_regex": "a+", "response_format": {"type": "json_object"}},
                   "guided_regex"),
    "two kinds": ({"structured_outputs": {"regex": "a+", "choice": ["a"]}},
                  "structured_outputs"),
    "no kind": ({"structured_outputs": {}}, "structured_outputs"),
    "empty choice": ({"guided_choice": []}, "guided_choice"),
    "choice not strings": ({"structured_outputs": {"choice": [1, 2]}},
                           "structured_outputs.choice.0"),
    "whitespace_pattern": ({"structured_outputs": {"json": {"type": "object"},
                                                   "whitespace_pattern": "[ ]?"}},
                           "structured_outputs.whitespace_pattern"),
    "structural_tag": ({"structured_outputs": {"structural_tag": "{}"}},
                       "structured_outputs.structural_tag"),
    "other backend": ({"guided_decoding_backend": "outlines", "guided_regex": "a"},
                      "guided_decoding_backend"),
    "huge regex": ({"guided_regex": "a" * (1 << 21)}, "guided_regex"),
    "garbage guided_json": ({"guided_json": 12}, "guided_json"),
    "garbage structured_outputs": ({"structured_outputs": "json"}, "structured_outputs"),
    "garbage schema values": ({"guided_json": {"type": {"type": [None, 1.5]}}}, "guided_json"),
}


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("case", BAD)
def test_bad_constraints_are_400_naming_the_field(http, case, route):
    fields, param = BAD[case]
    body = {"model": MODEL, "max_tokens": 8, **fields}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if route == CHAT
                else {"prompt": "hi"})
    for stream in (False, True):  # refused before a stream starts
        response = http.post(route, json={**body, "stream": stream})
        assert response.status_code == 400, (case, response.text[:300])
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, error
        assert 0 < len(error["message"]) <= 1000, error


def test_a_forced_tool_call_and_a_constraint_together_are_a_400(http):
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}
    response = http.post(CHAT, json={
        "model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
        "tools": [tool], "tool_choice": "required", "guided_regex": "a+"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "tool_choice"


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
def test_a_dead_end_midway_is_a_400_or_an_error_event_naming_the_field(http, route):
    """`b` can never end, and nothing but "a" then `b` may be output: the check passes (some
    text begins it), generation dies after its first token. A 400 naming the field, or once a
    stream has begun, an error event naming it."""
    body = {"model": MODEL, "max_tokens": 8, "guided_grammar": 'root ::= "a" b\nb ::= b'}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if route == CHAT
                else {"prompt": "hi"})
    response = http.post(route, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "guided_grammar" and "dead end" in error["message"], error
    with http.stream("POST", route, json={**body, "stream": True}) as streamed:
        assert streamed.status_code == 200
        events = list(sse_events(streamed))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["param"] == "guided_grammar", events[-2]


def test_health_answers_while_a_constraint_is_checked(server, http):
    """A schema whose grammar takes a while to check and compile (600 optional properties):
    /health answers fast all along, and the request is served."""
    schema = {"type": "object",
              "properties": {f"field_{i}": {"type": "integer"} for i in range(600)}}
    result: list[httpx.Response] = []
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4, "guided_json": schema}
    with HealthProbe(server.url) as probe:
        worker = threading.Thread(target=lambda: result.append(
            http.post(COMPLETIONS, json=body)))
        worker.start()
        worker.join(TIMEOUT)
    assert result and result[0].status_code == 200, result
    assert probe.max_latency < 1.0, probe.latencies


def test_still_healthy_and_every_block_free(server, http, client):
    assert http.get("/health").status_code == 200
    figures = wait_idle(server)
    assert figures["ppengine:num_requests_waiting"] == 0
    ((text, reason),) = generate(client, COMPLETIONS, guided_choice=["still", "here"])
    assert reason == "stop" and text in ("still", "here")
