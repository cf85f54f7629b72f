"""Tool calling on /v1/chat/completions: the parsers (whole outputs and streams split at random
must agree), the chat template's tools and tool messages, and served requests through the
official `openai` client on the shipped default model with a Hermes-style test template.

A random-weight model writes noise, so only calls forced by tool_choice ("required", a named
function) are asserted to be valid calls; the "auto" path is checked on the parsers, and served
only for a consistent shape.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
from engine_core.models import default_model_dir
from engine_core.models.tokenizer import load_tokenizer

from engine_core.entrypoints.chat import check_messages
from engine_core.entrypoints.cli import build_parser
from engine_core.entrypoints.http.errors import RequestError
from engine_core.entrypoints.http.protocol import ChatCompletionRequest
from engine_core.entrypoints.openai.tool_calling import plan_tools
from engine_core.entrypoints.openai.tool_parsers import (
    TOOL_PARSERS,
    NamedToolParser,
    RequiredToolParser,
    ToolCallingConfig,
    ToolParser,
    required_tools_schema,
)
from engine_core.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from engine_core.entrypoints.openai.tool_parsers.json_reader import JsonReader, JsonSyntaxError
from engine_core.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from tests.servers import ServerProcess

MODEL = "tiny-llama"
TIMEOUT = 60.0

# A Hermes-style template (as Qwen 2.5's): tools listed in a system block, the assistant's
# calls written back as <tool_call> JSON, tool results as <tool_response>.
TOOL_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\nTools:\n{% for tool in tools %}{{ tool | tojson }}\n"
    "{% endfor %}Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|assistant|>\n"
    "{% for call in m.tool_calls %}<tool_call>{\"name\": {{ call.function.name | tojson }}, "
    "\"arguments\": {{ call.function.arguments | tojson }}}</tool_call>\n{% endfor %}"
    "{% elif m.role == 'tool' %}<|tool|>\n<tool_response id=\"{{ m.tool_call_id }}\">"
    "{{ m.content }}</tool_response>\n"
    "{% else %}<|{{ m.role }}|>\n{{ m.content }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]},
                                  "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "a + b",
    "parameters": {"type": "object",
                   "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}},
                   "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


# ---- parsers ----------------------------------------------------------------------------------
def stream(parser: ToolParser, text: str, rng: random.Random
           ) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Feed `text` in random pieces: (the content, [(name, arguments)] joined from the deltas,
    the ids)."""
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 20)))) \
        if len(text) > 1 else []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    content, calls, ids = "", [], []
    for i, piece in enumerate(pieces):
        delta = parser.feed(piece, final=i == len(pieces) - 1)
        content += delta.content
        for call in delta.tool_calls:
            if call.id is not None:
                assert call.index == len(calls) and call.name
                calls.append([call.name, ""])
                ids.append(call.id)
            calls[call.index][1] += call.arguments
    return content, [tuple(c) for c in calls], ids


HERMES = [
    # (output, content, [(name, arguments)])
    ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
     '"unit": "c"}}\n</tool_call>\n<tool_call>\n{"arguments": {"a":true, "b" :false},\n'
     '"name": "add"}\n</tool_call>',
     "Let me look.\n",
     [("get_weather", '{"city": "Paris", "unit": "c"}'), ("add", '{"a": true, "b": false}')]),
    ('<tool_call>{"name": "f", "arguments": {"s": "\\u00e9\\ud83d\\ude00 \\"q\\"\\n", '
     '"n": [1, -2.5e3, {}], "z": null}}</tool_call>',
     None, [("f", '{"s": "é😀 \\"q\\"\\n", "n": [1, -2.5e3, {}], "z": null}')]),
    ('<tool_call>{"name": "f"}', None, [("f", "{}")]),  # no arguments; no closing tag
    ("no call <tool_call in sight", "no call <tool_call in sight", []),
    ("", "", []),
]
HERMES_MALFORMED = [
    "Sure: <tool_call>not json</tool_call> done",
    '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>',
    '<tool_call>{"arguments": {}}</tool_call>',
    '<tool_call>{"name": 7, "arguments": {}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": {"a": 1}',
    '<tool_call>{"name": "f", "arguments": {}} trailing</tool_call>',
]
LLAMA3 = [
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Tokyo", "unit": "f"}}',
     None, [("get_weather", '{"city": "Tokyo", "unit": "f"}')]),
    (' {"name": "f", "parameters": {"x": [1]}}; {"name": "g", "arguments": {}}\n',
     None, [("f", '{"x": [1]}'), ("g", "{}")]),
    ("The answer is 42.", "The answer is 42.", []),
    ('{"nam": "f"}', '{"nam": "f"}', []),
    ("<|python_tag|>", "<|python_tag|>", []),
]
REQUIRED = [
    ('[{"name": "add", "parameters": {"a": true, "b": false}}]', None,
     [("add", '{"a": true, "b": false}')]),
    ('[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}, '
     '{"name": "add", "parameters": {"a": false, "b": false}}]', None,
     [("get_weather", '{"city": "Paris", "unit": "c"}'), ("add", '{"a": false, "b": false}')]),
]
# Outputs cut off (max_tokens) inside a call whose name was already sent
CUT_OFF = [
    (HermesToolParser, '<tool_call>{"name": "f", "arguments": {"a": 1'),
    (Llama3JsonToolParser, '{"name": "f", "parameters": {"x": 1'),
    (RequiredToolParser, '[{"name": "add", "parameters": {"a": tr'),
]


@pytest.mark.parametrize("cls, output, content, calls", [
    *[(HermesToolParser, *case) for case in HERMES],
    *[(Llama3JsonToolParser, *case) for case in LLAMA3],
    *[(RequiredToolParser, *case) for case in REQUIRED],
])
def test_parser_extracts_and_streams_the_same_calls(cls, output, content, calls):
    extracted = cls().extract(output)
    assert extracted.content == content
    assert [(c.name, c.arguments) for c in extracted.tool_calls] == calls
    for call in extracted.tool_calls:
        json.loads(call.arguments)
        assert call.id.startswith("chatcmpl-tool-") and len(call.id) > len("chatcmpl-tool-")
    assert len({c.id for c in extracted.tool_calls}) == len(calls)
    rng = random.Random(output)
    for _ in range(100):  # streamed in random pieces: the deltas join to the same result
        parser = cls()
        got_content, got_calls, _ = stream(parser, output, rng)
        assert (got_content, got_calls) == (content or "", calls)
        assert parser.tools_called == bool(calls)


@pytest.mark.parametrize("output", HERMES_MALFORMED)
def test_hermes_malformed_call_stays_content(output):
    extracted = HermesToolParser().extract(output)
    assert extracted.content == output and extracted.tool_calls == []


def test_hermes_stream_of_a_call_that_never_parses_is_content():
    rng = random.Random(0)
    for _ in range(50):
        output = HERMES_MALFORMED[0]
        assert stream(HermesToolParser(), output, rng) == (output, [], [])


def test_hermes_call_that_breaks_after_calls_were_sent():
    """A stream cannot take back a call it sent: it stops; the whole output is content."""
    output = ('<tool_call>{"name": "f", "arguments": {}}</tool_call>\n'
              '<tool_call>{"name": "g", "arguments": {"a": }}</tool_call>')
    extracted = HermesToolParser().extract(output)
    assert extracted.content == output and extracted.tool_calls == []
    parser = HermesToolParser()
    content, calls, _ = stream(parser, output, random.Random(1))
    assert parser.failed and not parser.tools_called
    assert content == "" and calls[0] == ("f", "{}")


@pytest.mark.parametrize("cls, output", CUT_OFF)
def test_output_cut_off_inside_a_call(cls, output):
    extracted = cls().extract(output)
    assert extracted.content == output and extracted.tool_calls == []
    parser = cls()
    parser.feed(output[:len(output) // 2 + 14])  # the name is out
    assert parser.num_calls == 1
    parser.feed(output[len(output) // 2 + 14:], final=True)
    assert parser.failed and not parser.tools_called


def test_hermes_stream_holds_back_only_a_possible_tag():
    parser = HermesToolParser()
    assert parser.feed("Hello <tool").content == "Hello "
    assert parser.feed("box> and <").content == "<toolbox> and "
    delta = parser.feed('tool_call>{"name": "f", "arguments": {"a": "long', final=False)
    assert delta.content == ""
    assert [(c.index, c.name, c.arguments) for c in delta.tool_calls] == [
        (0, "f", '{"a": "long')]
    delta = parser.feed(' text"}}</tool_call>', final=True)
    assert [(c.index, c.id, c.arguments) for c in delta.tool_calls] == [(0, None, ' text"}')]


def test_hermes_streams_arguments_before_the_call_ends():
    parser = HermesToolParser()
    parser.feed('<tool_call>{"name": "f", "arguments": {"code": "def ')
    delta = parser.feed("f(x):")
    assert delta.tool_calls[0].arguments == "f(x):"


def test_named_parser_takes_the_output_as_arguments():
    parser = NamedToolParser("add")
    first = parser.feed('{"a": tr')
    assert [(c.index, c.name, c.arguments) for c in first.tool_calls] == [(0, "add", '{"a": tr')]
    assert first.tool_calls[0].id.startswith("chatcmpl-tool-")
    rest = parser.feed('ue, "b": false}', final=True)
    assert [(c.id, c.arguments) for c in rest.tool_calls] == [(None, 'ue, "b": false}')]
    extracted = NamedToolParser("add").extract('{"a": true}')
    assert extracted.content is None
    assert [(c.name, c.arguments) for c in extracted.tool_calls] == [("add", '{"a": true}')]


def test_parsers_are_registered_under_their_flag_names():
    assert TOOL_PARSERS["hermes"] is HermesToolParser
    assert TOOL_PARSERS["llama3_json"] is Llama3JsonToolParser
    serve = next(a for a in build_parser()._actions if a.dest == "command").choices["serve"]
    help_text = next(a.help for a in serve._actions if a.dest == "tool_call_parser")
    assert all(name in help_text for name in TOOL_PARSERS)
    with pytest.raises(ValueError, match="tool_call_parser must be one of"):
        ToolCallingConfig(tool_call_parser="nope")
    with pytest.raises(ValueError, match="enable_auto_tool_choice needs a tool_call_parser"):
        ToolCallingConfig(enable_auto_tool_choice=True)


@pytest.mark.parametrize("text, canonical", [
    ('{ "a":[1,2.5 ,-0,1e-3,true,false,null,{"b":"\\/\\t\\u0041\\u00e9"}],\n"c":{}}',
     '{"a": [1, 2.5, -0, 1e-3, true, false, null, {"b": "/\\tAé"}], "c": {}}'),
    (' [ "x" , [ ] ] ', '["x", []]'),
    ('"\\ud83d"', '"\\ud83d"'),  # a lone surrogate stays escaped (UTF-8 cannot hold it)
    ("12", "12"),
])
def test_json_reader_reserializes_canonically(text, canonical):
    """Whitespace as json.dumps writes it, strings re-escaped, numbers as written."""
    reader = JsonReader()
    reader.feed(text)
    reader.finish()
    out = "".join(p.text for p in reader.take())
    assert out == canonical and json.loads(out) == json.loads(text)


@pytest.mark.parametrize("text", ['{"a" 1}', "[1,]", '{"a": 01}', '{"a": NaN}', '"\\x"',
                                  '{"a": tru}', "{,}"])
def test_json_reader_refuses_what_is_not_json(text):
    reader = JsonReader()
    with pytest.raises(JsonSyntaxError):
        reader.feed(text)
        reader.finish()


def test_required_schema_pairs_each_name_with_its_parameters():
    defs_tool = {"name": "h", "parameters": {"type": "object", "properties": {
        "p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": "integer"}}}}
    schema = required_tools_schema([t["function"] for t in TOOLS] + [defs_tool], parallel=False)
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    assert schema["$defs"] == {"P": {"type": "integer"}}
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid([{"name": "add", "parameters": {"a": True, "b": False}}])
    assert validator.is_valid([{"name": "h", "parameters": {"p": 3}}])
    assert not validator.is_valid([{"name": "h", "parameters": {"p": "x"}}])
    assert not validator.is_valid([{"name": "add", "parameters": {"city": "Paris",
                                                                  "unit": "c"}}])
    assert not validator.is_valid([])
    assert "maxItems" not in required_tools_schema([ADD["function"]], parallel=True)
    with pytest.raises(ValueError, match="\\$defs 'P'"):
        required_tools_schema([defs_tool, {**defs_tool, "parameters": {
            "type": "object", "$defs": {"P": {"type": "string"}}}}], parallel=True)


# ---- requests and templates -------------------------------------------------------------------
def _request(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate_json(json.dumps({"messages": USER, **body}))


@pytest.mark.parametrize("body, param", [
    ({"tools": [], "tool_choice": "auto"}, "tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "string"}}}]}, "tools.0.function.parameters"),
])
def test_bad_tool_choice_is_refused_naming_the_field(body, param):
    with pytest.raises(RequestError) as exc:
        _request(**body).check_supported()
    assert exc.value.status == 400 and exc.value.param == param, exc.value.message


def test_auto_needs_the_server_flag():
    request = _request(tools=TOOLS)  # no tool_choice with tools: "auto"
    with pytest.raises(RequestError, match="--enable-auto-tool-choice") as exc:
        plan_tools(request, ToolCallingConfig())
    assert exc.value.param == "tool_choice"
    plan = plan_tools(request, ToolCallingConfig(enable_auto_tool_choice=True,
                                                  tool_call_parser="hermes"))
    assert isinstance(plan.parser(), HermesToolParser) and plan.schema is None


def test_tool_choice_none_gives_the_template_tools_unless_excluded():
    request = _request(tools=TOOLS, tool_choice="none")
    assert plan_tools(request, ToolCallingConfig()).template_tools == TOOLS
    assert plan_tools(request, ToolCallingConfig(
        exclude_tools_when_tool_choice_none=True)).template_tools is None
    assert plan_tools(request, ToolCallingConfig()).parser() is None


def test_forced_choices_plan_a_schema():
    named = plan_tools(_request(tools=TOOLS, tool_choice={
        "type": "function", "function": {"name": "add"}}), ToolCallingConfig())
    assert named.schema == ADD["function"]["parameters"]
    required = plan_tools(_request(tools=TOOLS, tool_choice="required",
                                   parallel_tool_calls=False), ToolCallingConfig())
    assert required.schema == required_tools_schema([t["function"] for t in TOOLS], False)


ROUND_TRIP = [
    *USER,
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call-1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call-1", "content": "18 degrees"},
]


def test_template_gets_tools_and_tool_messages():
    tokenizer = load_tokenizer(default_model_dir()).with_chat_template(TOOL_TEMPLATE)
    request = ChatCompletionRequest.model_validate_json(json.dumps(
        {"messages": ROUND_TRIP, "tools": TOOLS}))
    request.check_supported()
    messages = request.template_messages()
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris",
                                                                      "unit": "c"}
    text = tokenizer.apply_chat_template(messages, tools=TOOLS)
    assert json.dumps(WEATHER, ensure_ascii=False) in text
    assert ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
            '</tool_call>') in text
    assert '<tool_response id="call-1">18 degrees</tool_response>' in text
    assert check_messages(ROUND_TRIP)[1]["tool_calls"] == messages[1]["tool_calls"]
    assert "Tools:" not in tokenizer.apply_chat_template(messages)


def test_template_without_tools_gets_none():
    """As in HF: `tools` is always defined (None without tools), so `tools is not none` works."""
    tokenizer = load_tokenizer(default_model_dir()).with_chat_template(
        "{% if tools is not none %}TOOLS{% endif %}{{ messages[0].content }}")
    assert tokenizer.apply_chat_template(USER) == USER[0]["content"]
    assert tokenizer.apply_chat_template(USER, tools=TOOLS).startswith("TOOLS")


@pytest.mark.parametrize("arguments, field", [
    ("not json", "messages.1.tool_calls.0.function.arguments"),
    ("[1]", "messages.1.tool_calls.0.function.arguments"),
])
def test_assistant_tool_call_arguments_must_be_a_json_object(arguments, field):
    messages = json.loads(json.dumps(ROUND_TRIP))
    messages[1]["tool_calls"][0]["function"]["arguments"] = arguments
    with pytest.raises(RequestError) as exc:
        ChatCompletionRequest.model_validate_json(json.dumps(
            {"messages": messages})).template_messages()
    assert exc.value.param == field
    with pytest.raises(ValueError, match=field.replace(".1.", r"\[1\]\.").replace(
            ".0.", r"\[0\]\.")):
        check_messages(messages)


# ---- served -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    """The shipped default model, served with the Hermes-style tool template
    (--chat-template) and auto tool choice."""
    root = tmp_path_factory.mktemp("tool-server")
    template = root / "tool_template.jinja"
    template.write_text(TOOL_TEMPLATE)
    proc = ServerProcess(default_model_dir(), str(root / "server.log"), "--max-model-len", "512",
                         "--chat-template", str(template), "--enable-auto-tool-choice",
                         "--tool-call-parser", "hermes")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                         timeout=TIMEOUT)


def _valid_call(name: str, arguments: str) -> dict:
    assert name in SCHEMAS
    parsed = json.loads(arguments)
    jsonschema.validate(parsed, SCHEMAS[name])
    return parsed


def _streamed(client, **kwargs) -> tuple[str, list[dict], str | None]:
    """(content, [{"id", "name", "arguments"}], finish_reason) joined from a stream's chunks."""
    content, calls, finish = "", [], None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        (choice,) = chunk.choices
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            if delta.id is not None:
                assert delta.index == len(calls) and delta.type == "function"
                calls.append({"id": delta.id, "name": delta.function.name, "arguments": ""})
            calls[delta.index]["arguments"] += delta.function.arguments or ""
        if choice.finish_reason is not None:
            assert finish is None
            finish = choice.finish_reason
    return content, calls, finish


REQUIRED_KWARGS = {"messages": USER, "tools": TOOLS, "tool_choice": "required",
                   "parallel_tool_calls": False, "max_tokens": 64, "temperature": 1.0}


def test_required_tool_call_round_trip(client, seed=0):
    response = client.chat.completions.create(model=MODEL, seed=seed, **REQUIRED_KWARGS)
    (choice,) = response.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    _valid_call(call.function.name, call.function.arguments)
    # the same seed streamed: the same call, in deltas
    content, calls, finish = _streamed(client, seed=seed, **REQUIRED_KWARGS)
    assert content == "" and finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (call.function.name, call.function.arguments)]
    # the call and its result go back to the model, which answers
    follow_up = [*USER, choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    answer = client.chat.completions.create(model=MODEL, messages=follow_up, tools=TOOLS,
                                            tool_choice="none", max_tokens=8, seed=seed)
    assert answer.choices[0].message.tool_calls is None
    assert isinstance(answer.choices[0].message.content, str)
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_required_parallel_calls_are_each_valid(client):
    kwargs = {**REQUIRED_KWARGS, "parallel_tool_calls": True, "max_tokens": 96}
    for seed in range(3):  # noise may make a long array that max_tokens cuts off
        response = client.chat.completions.create(model=MODEL, seed=seed, **kwargs)
        (choice,) = response.choices
        if choice.finish_reason == "length":  # cut off: no calls, all content
            assert choice.message.tool_calls is None
            assert choice.message.content.startswith('[{"name": ')
            continue
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            _valid_call(call.function.name, call.function.arguments)
        ids = {call.id for call in choice.message.tool_calls}
        assert len(ids) == len(choice.message.tool_calls)
        return
    pytest.fail("no seed gave a complete array of calls")


@pytest.mark.parametrize("name", ["add", "get_weather"])
def test_named_tool_call_round_trip(client, name):
    kwargs = {"messages": USER, "tools": TOOLS, "max_tokens": 64, "seed": 3,
              "tool_choice": {"type": "function", "function": {"name": name}}}
    response = client.chat.completions.create(model=MODEL, **kwargs)
    (choice,) = response.choices
    assert choice.finish_reason == "stop"  # as OpenAI: a forced function ends with "stop"
    (call,) = choice.message.tool_calls
    assert call.function.name == name and choice.message.content is None
    _valid_call(name, call.function.arguments)
    content, calls, finish = _streamed(client, **kwargs)
    assert content == "" and finish == "stop"
    assert [(c["name"], c["arguments"]) for c in calls] == [(name, call.function.arguments)]
    follow_up = [*USER, choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "true"}]
    answer = client.chat.completions.create(model=MODEL, messages=follow_up, tools=TOOLS,
                                            tool_choice=kwargs["tool_choice"], max_tokens=64,
                                            seed=4)
    _valid_call(name, answer.choices[0].message.tool_calls[0].function.arguments)


def test_auto_returns_a_consistent_shape(client):
    kwargs = {"messages": USER, "tools": TOOLS, "max_tokens": 8, "temperature": 1.0,
              "seed": 5}
    response = client.chat.completions.create(model=MODEL, **kwargs)
    (choice,) = response.choices
    if choice.message.tool_calls:  # noise rarely forms a call; if it does, it is one
        assert choice.finish_reason == "tool_calls"
    else:
        assert isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
    content, calls, finish = _streamed(client, **kwargs)
    assert content == (choice.message.content or "") and finish == choice.finish_reason
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
     "tools.0.function.name"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools.0.function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [*USER, {"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
])
def test_bad_tools_get_400_naming_the_param(server, body, param):
    response = httpx.post(server.url + "/v1/chat/completions", timeout=TIMEOUT,
                          json={"model": MODEL, "messages": USER, "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
