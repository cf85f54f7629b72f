"""Chat messages without usable content (issue 18): a 400 naming the field from the server's
request models, a ValueError naming it from `LLM.chat`; never a 500, never an empty prompt
rendered in silence. Only an assistant message with tool_calls may omit its content.

The served path end to end is in tests/test_numeric_edges_served.py (one server per module)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from engine_core import LLM, SamplingParams
from engine_core.entrypoints.chat import check_messages
from engine_core.entrypoints.http.errors import RequestError, validation_error
from engine_core.entrypoints.http.protocol import ChatCompletionRequest
from tests.text_checkpoint import add_tokenizer

OK = {"role": "user", "content": "hi"}

# (messages, the param a 400 names, what LLM.chat's ValueError starts with)
BAD = [
    ([{"role": "user"}], "messages.0.content", "messages[0].content is required"),
    ([OK, {"role": "system"}], "messages.1.content", "messages[1].content is required"),
    ([OK, {"role": "user", "content": None}], "messages.1.content", "messages[1].content"),
    ([{"role": "developer", "content": None}], "messages.0.content", "messages[0].content"),
    ([OK, {"role": "tool", "content": None}], "messages.1.content", "messages[1].content"),
    ([OK, {"role": "assistant"}], "messages.1.content",
     "messages[1].content is required for an assistant message without tool_calls"),
    ([OK, {"role": "assistant", "content": None, "tool_calls": []}], "messages.1.content",
     "messages[1].content"),
    ([{"role": "user", "content": []}], "messages.0.content",
     "messages[0].content must not be an empty list"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages.0.content.0.type", "messages[0].content[0].type must be 'text'"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}],
     "messages.0.content.0.text", "messages[0].content[0].text must be a string"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages.0.content.0.text",
     "messages[0].content[0].text must be a string"),
    ([{"role": "user", "content": ["hi"]}], "messages.0.content.0",
     "messages[0].content[0] must be a"),
    ([{"role": "user", "content": 5}], "messages.0.content", "messages[0].content must be a"),
    ([{"role": "user", "content": {"text": "hi"}}], "messages.0.content",
     "messages[0].content must be a"),
    ([{"role": "robot", "content": "hi"}], "messages.0.role", "messages[0].role must be one of"),
    ([{"content": "hi"}], "messages.0.role", "messages[0].role must be one of"),
    ([OK, "hi"], "messages.1", "messages[1] must be a dict"),
    ([{"role": "user", "content": "hi", "name": 3}], "messages.0.name",
     "messages[0].name must be a string"),
]
GOOD = [
    [OK],
    [{"role": "user", "content": ""}],
    [{"role": "system", "content": [{"type": "text", "text": "a"}]}, OK],
    [OK, {"role": "assistant", "content": None,
          "tool_calls": [{"id": "1", "type": "function",
                          "function": {"name": "f", "arguments": "{}"}}]},
     {"role": "tool", "content": "42"}],
]


def _server_error(messages) -> RequestError:
    body = json.dumps({"messages": messages, "max_tokens": 2})
    try:
        request = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        return validation_error(exc)
    with pytest.raises(RequestError) as exc:
        request.check_supported()
    return exc.value


@pytest.mark.parametrize("messages, param, _", BAD)
def test_server_refuses_messages_naming_the_field(messages, param, _):
    error = _server_error(messages)
    assert error.status == 400 and error.param == param, (error.param, error.message)
    assert error.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("messages", GOOD)
def test_server_takes_valid_messages(messages):
    request = ChatCompletionRequest.model_validate_json(json.dumps({"messages": messages}))
    request.check_supported()
    assert all(isinstance(m.to_template()["content"], str) for m in request.messages)


@pytest.mark.parametrize("messages, _, message", BAD)
def test_check_messages_names_the_field(messages, _, message):
    with pytest.raises(ValueError) as exc:
        check_messages(messages)
    assert str(exc.value).startswith(message), str(exc.value)


def test_check_messages_joins_parts_and_keeps_other_keys():
    rendered = check_messages([
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                       "text": "b"}]},
        {"role": "assistant", "tool_calls": [{"id": "1", "function": {
            "name": "f", "arguments": '{"x": 1}'}}], "extra": 7}])
    assert rendered == [{"role": "user", "content": "a\nb"},
                        {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                                              "function": {"name": "f",
                                                                           "arguments": {"x": 1}}}],
                         "extra": 7, "content": ""}]


@pytest.fixture(scope="module")
def llm(checkpoint_factory, tmp_path_factory):
    model = add_tokenizer(checkpoint_factory("llama"), str(tmp_path_factory.mktemp("chat-tok")))
    engine = LLM(model, dtype="float32", max_model_len=256)
    yield engine
    engine.shutdown()


def test_llm_chat_refuses_bad_messages_and_keeps_serving(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    before = llm.chat([OK], greedy, use_tqdm=False)[0].outputs[0].token_ids
    for messages, _, message in BAD:
        with pytest.raises(ValueError) as exc:
            llm.chat(messages, greedy, use_tqdm=False)
        assert str(exc.value).startswith(message), str(exc.value)
    with pytest.raises(ValueError, match=r"^conversation 1: messages\[0\]\.content"):
        llm.chat([[OK], [{"role": "user"}]], greedy, use_tqdm=False)
    with pytest.raises(ValueError, match=r"^messages must be a non-empty list"):
        llm.chat([], greedy, use_tqdm=False)
    for messages in GOOD:
        assert len(llm.chat(messages, greedy, use_tqdm=False)[0].outputs[0].token_ids) == 4
    assert llm.chat([OK], greedy, use_tqdm=False)[0].outputs[0].token_ids == before
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_usable_blocks
