"""The front-end side of structured outputs, in process (no server): how each request field
becomes one `StructuredOutputsParams` (http/structured_outputs.py), the check that a constraint
compiles and can be satisfied (`grammars.check_structured_outputs`), and the server's bounded
checker (`grammars.ConstraintChecker`)."""

from __future__ import annotations

import json
import time

import pytest

from engine_core.entrypoints.http.errors import RequestError
from engine_core.entrypoints.http.protocol import ChatCompletionRequest, CompletionRequest
from engine_core.grammars import ChecksBusy, ConstraintChecker, check_structured_outputs
from engine_core.structured_outputs import StructuredOutputsParams
from tests.servers import wait_for

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate_json(json.dumps({"prompt": "x", **fields}))


@pytest.mark.parametrize("fields,kind,value,field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA,
                                                                 "strict": True}}},
     "json", json.dumps(SCHEMA), "response_format"),
    ({"response_format": {"type": "json_object"}}, "json_object", True, "response_format"),
    ({"structured_outputs": {"regex": "a+", "disable_any_whitespace": True}}, "regex", "a+",
     "structured_outputs"),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, "json", json.dumps(SCHEMA),
     "structured_outputs"),
    ({"guided_json": SCHEMA}, "json", json.dumps(SCHEMA), "guided_json"),
    ({"guided_regex": "[0-9]+", "guided_decoding_backend": "xgrammar:no-fallback"}, "regex",
     "[0-9]+", "guided_regex"),
    ({"guided_choice": ["a", "b"], "response_format": {"type": "text"}}, "choice", ["a", "b"],
     "guided_choice"),
    ({"guided_grammar": 'root ::= "x"'}, "grammar", 'root ::= "x"', "guided_grammar"),
])
def test_each_field_becomes_the_params(fields, kind, value, field):
    request = completion(**fields)
    request.check_supported()
    constraint = request.output_constraint
    assert constraint is not None and constraint.field == field
    assert constraint.params.kind == kind and getattr(constraint.params, kind) == value
    params = request.sampling_params(8, None)
    assert params.structured_outputs == constraint.params


def test_no_constraint_and_text_format_are_none():
    assert completion().output_constraint is None
    chat = ChatCompletionRequest.model_validate_json(json.dumps({
        "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "text"}}))
    assert chat.output_constraint is None and chat.sampling_params(8, None).structured_outputs \
        is None


@pytest.mark.parametrize("fields,param,words", [
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "give only one"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs", "give only one"),
    ({"guided_choice": []}, "guided_choice", "guided_choice must be a non-empty list"),
    ({"structured_outputs": {"regex": "a", "grammar": "b"}}, "structured_outputs",
     "exactly one"),
    ({"guided_json": {"a": float("nan")}}, "guided_json", "guided_json is not a JSON schema"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend", "xgrammar"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "not supported"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}},
     "structured_outputs.whitespace_pattern", "not supported"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
])
def test_malformed_constraints_are_request_errors_naming_the_field(fields, param, words):
    request = CompletionRequest.model_validate_json(
        json.dumps({"prompt": "x", **fields}, allow_nan=True))
    with pytest.raises(RequestError) as info:
        request.check_supported()  # the proxy runs this too
    assert info.value.status == 400 and info.value.param == param
    assert words in info.value.message


def test_check_errors_speak_of_the_clients_field():
    constraint = completion(response_format={"type": "json_schema", "json_schema": {
        "name": "a", "schema": {"type": "foo"}}}).output_constraint
    assert constraint is not None
    with pytest.raises(ValueError) as info:
        check_structured_outputs(constraint.params)
    error = constraint.error(info.value)
    assert error.param == "response_format"
    assert error.message.startswith("response_format.json_schema.schema is not a valid JSON "
                                    "schema"), error.message
    long = constraint.error(ValueError("structured_outputs.json " + "x" * 5000))
    assert len(long.message) <= 500


@pytest.mark.parametrize("params", [
    StructuredOutputsParams(grammar='root ::= root "a"'),  # left recursion: never ends
    StructuredOutputsParams(regex="[^\\x00-\\U0010FFFF]"),  # an empty character class
    StructuredOutputsParams(grammar="root ::= [^\\x00-\\U0010FFFF]"),
])
def test_a_constraint_no_output_satisfies_is_refused(params):
    with pytest.raises(ValueError, match="matches no text at all"):
        check_structured_outputs(params)


@pytest.mark.parametrize("params", [
    StructuredOutputsParams(regex=""),  # the empty output
    StructuredOutputsParams(choice=[""]),
    StructuredOutputsParams(grammar='root ::= "a" root'),  # never ends, but may begin
    StructuredOutputsParams(json={"type": "object", "properties": {"a": {"$ref": "#"}}}),
])
def test_a_constraint_some_output_satisfies_passes(params):
    check_structured_outputs(params)


def _slow_schema(num_properties: int = 1500) -> StructuredOutputsParams:
    """Optional properties compile in time that grows much faster than their number: seconds
    here."""
    return StructuredOutputsParams(json={"type": "object", "properties": {
        f"p{i}": {"type": "integer"} for i in range(num_properties)}})


def test_checker_refuses_a_slow_check_and_bounds_the_ones_left_running():
    check_structured_outputs(StructuredOutputsParams(regex="a"))  # xgrammar loaded
    checker = ConstraintChecker(max_running=1, timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"took longer than 0\.3 s"):
        checker.check(_slow_schema())
    assert time.monotonic() - start < 2.0
    # the refused check still compiles in its thread and holds the only slot
    with pytest.raises(ChecksBusy):
        checker.check(StructuredOutputsParams(regex="b"))

    def slot_free() -> bool:
        try:
            checker.check(StructuredOutputsParams(regex="c"))
        except ChecksBusy:
            return False
        return True

    wait_for(slot_free, 120.0, "the slow check to finish and free its slot", interval_s=0.5)
