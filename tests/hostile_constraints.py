"""Hostile structured-output constraints (JSON schemas, regexes, EBNF grammars, choice lists)
and hypothesis strategies that draw them, for the server's fuzz suite
(tests/test_server_hardening.py): a server must answer each with a 200 or a 400, never stall or
fail.

Every listed value was seen to be checked and compiled by xgrammar within a second: unsupported
features, empty or contradictory bounds, circular or dangling `$ref`s, integers past 64 bits,
lone surrogates, nesting past xgrammar's limit, left recursion and empty character classes (no
output matches: refused up front), grammars that never end (they run to max_tokens), and large
but quick ones.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st


def _deep_array(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "maxLength": 2}
    for _ in range(levels):
        schema = {"type": "array", "items": schema, "maxItems": 1}
    return schema


SCHEMAS: list[Any] = [
    {"type": "foo"}, {"$ref": "#"}, {"$ref": "#/$defs/missing"},
    {"$ref": "http://example.com/schema.json"},
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},  # never ends
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"enum": []}, {"anyOf": []}, {"oneOf": []}, {"allOf": []}, {"not": {}}, {"type": []},
    {"allOf": [{"type": "string"}, {"type": "integer"}]},
    {"type": "string", "minLength": 10**9}, {"type": "string", "maxLength": -1},
    {"type": "string", "minLength": 5, "maxLength": 2}, {"type": "array", "minItems": 10**6},
    {"type": "array", "maxItems": 10**9, "items": {"type": "integer"}},
    {"type": "integer", "minimum": 10**30}, {"type": "integer", "minimum": 2**63,
                                             "maximum": 2**64},
    {"type": "number", "minimum": 1e308, "maximum": -1e308},
    {"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 1},
    {"type": "integer", "multipleOf": 0}, {"type": "string", "pattern": "(("},
    {"type": "string", "pattern": "\\1"}, {"type": "string", "pattern": "a{1000000}"},
    {"type": "string", "format": "email"}, {"type": "string", "format": "nonsense"},
    {"properties": {"": {"type": "string"}}, "required": [""]}, {"required": ["missing"]},
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "a", "b"]},
    _deep_array(100), {"type": "object",
                       "properties": {f"k{i}": {"type": "integer"} for i in range(200)}},
    {"type": ["string", "null", "integer"]}, {"const": {"a": [1, {"b": None}]}},
    {"prefixItems": [{"type": "integer"}], "items": False},
    {"additionalProperties": {"type": "integer"}}, {"patternProperties": {"((": {}}},
    {"properties": {"\ud800": {}}}, {"enum": ["\u0000", "\ud800x"]},
    {"type": "object", "minProperties": 5, "maxProperties": 1},
    {"type": "object", "minProperties": 1000}, {"if": {}, "then": {}, "else": {}},
    {"$schema": "nonsense"}, {"type": "string", "enum": [1, 2]}, {"type": True},
    {"properties": 5}, {"items": "x"}, {"required": "a"}, {"minimum": "x", "type": "number"},
    "{not json", "",
]
REGEXES = [
    "((", "", "a{1000000}", "(a{1000}){1000}", "\\1", "(?=a)", "(?<=a)b",
    "[^\\x00-\\U0010FFFF]", "[z-a]", "a**", "(a|)+", "(?:a*)*", "\\p{L}", "(" * 3000 + ")" * 3000,
    "[", "\\", "a{2,1}", "x{,5}", "(?P<n>a)(?P=n)", "$a^", "\ud800", "\x00",
    "a{99999999999999999999}", "(a|b|c|d|e|f)" * 500, "()" * 2000, "a|" * 5000,
]
GRAMMARS = [
    'root ::= root "a"', "root ::= ", 'root ::= "a" b\nb ::= b', "root ::= [^\\x00-\\U0010FFFF]",
    'root ::= "a"*', 'root ::= ("a" | "b"){1000000}', 'root ::= "a" root',
    "root ::= r0\n" + "\n".join(f'r{i} ::= r{i + 1} | "x"' for i in range(1000))
    + '\nr1000 ::= "y"',
    "root ::= " + "(" * 3000 + '"a"' + ")" * 3000, "x" * 10000, 'root ::= "\\uD800"',
    "root ::= [", "::=", 'root ::= "\ud800"', 'root ::= "a" | root root',
    "root ::= [a-z]{0,100000}", 'root ::= "a"{99999999999}',
    "root ::= " + " | ".join(f'"{i}"' for i in range(5000)),
]
CHOICES: list[Any] = [[], [""], ["a"] * 4000, ["\x00"], ["a" * 10000],
                      ["a" * i for i in range(1, 300)], ["\ud800"], ['"', "\\", "\n"], [1, 2],
                      "a"]

_SCHEMA_WORDS = ["type", "properties", "items", "required", "enum", "const", "$ref", "$defs",
                 "anyOf", "allOf", "oneOf", "not", "minimum", "maximum", "minLength",
                 "maxLength", "pattern", "minItems", "maxItems", "additionalProperties",
                 "format", "prefixItems"]
_SCHEMA_VALUES = ["string", "integer", "number", "object", "array", "boolean", "null", "#",
                  "#/$defs/a", "a", "(("]
_SCALARS = (st.none() | st.booleans() | st.integers(-3, 10) | st.sampled_from([2**64, 10**30])
            | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(_SCHEMA_VALUES)
            | st.text(max_size=6))
_KEYS = st.sampled_from(_SCHEMA_WORDS) | st.text(max_size=4)


def schemas() -> st.SearchStrategy[Any]:
    """A listed hostile schema, or a random object built of schema keywords and odd values."""
    made = st.recursive(_SCALARS, lambda kids: st.lists(kids, max_size=3)
                        | st.dictionaries(_KEYS, kids, max_size=4), max_leaves=12)
    return st.sampled_from(SCHEMAS) | st.dictionaries(_KEYS, made, max_size=4)


def regexes() -> st.SearchStrategy[str]:
    return st.sampled_from(REGEXES) | st.text(
        alphabet="()[]{}|*+?.^$\\-,0123456789ab:=!<>dDwWsSpPuU", max_size=20)


def grammars() -> st.SearchStrategy[str]:
    return st.sampled_from(GRAMMARS) | st.text(
        alphabet=' root:=|"ab()[]*+?{}\n^-,0123456789x\\', max_size=40).map(
            lambda body: "root ::= " + body)


def choices() -> st.SearchStrategy[Any]:
    return st.sampled_from(CHOICES) | st.lists(st.text(max_size=6), max_size=4)


def one_constraint() -> st.SearchStrategy[dict[str, Any]]:
    """The field (or two: guided_regex with guided_decoding_backend) of a request body that
    asks for structured outputs, in any of the ways a client may spell it."""
    response_format = st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "yaml"])}),
        st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
            {"name": st.text(max_size=6), "schema": schemas()},
            optional={"strict": st.booleans(), "description": st.text(max_size=6)})}))
    structured = st.fixed_dictionaries({}, optional={
        "json": schemas(), "regex": regexes(), "choice": choices(), "grammar": grammars(),
        "json_object": st.booleans(), "disable_any_whitespace": st.booleans(),
        "whitespace_pattern": st.none() | st.just(" ")})
    return st.one_of(
        st.fixed_dictionaries({"response_format": response_format}),
        st.fixed_dictionaries({"structured_outputs": structured}),
        st.fixed_dictionaries({"guided_json": schemas()}),
        st.fixed_dictionaries({"guided_regex": regexes()}),
        st.fixed_dictionaries({"guided_choice": choices()}),
        st.fixed_dictionaries({"guided_grammar": grammars()}),
        st.fixed_dictionaries({"guided_regex": regexes(), "guided_decoding_backend":
                               st.sampled_from(["xgrammar", "auto", "xgrammar:x", "outlines"])}))


def constraint_fields() -> st.SearchStrategy[dict[str, Any]]:
    """Fields of a request body that ask for structured outputs: mostly none or one, sometimes
    two (a 400)."""
    one = one_constraint()
    two = st.tuples(one, one).map(lambda pair: {**pair[0], **pair[1]})
    return st.one_of(st.just({}), st.just({}), one, one, one, two)
