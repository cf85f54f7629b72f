"""Calls forced by `tool_choice` ("required", or a named function), as vLLM forces them: the
output is constrained by a JSON schema (structured outputs), so it always parses, and it is
read by these parsers, not by the `--tool-call-parser`.

- A named function: the output is that function's arguments object; the response is one call
  of that function with the output as its arguments (finish_reason stays "stop", as OpenAI's).
- "required": the output is a JSON array of `{"name": ..., "parameters": {...}}` objects, each
  name with its own tool's parameters (`anyOf`), at least one, at most one without
  `parallel_tool_calls`; the response holds one call per item.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from engine_core.entrypoints.openai.tool_parsers.base import JsonSyntaxError, ToolParser

__all__ = ["NamedToolParser", "RequiredToolParser", "named_tool_schema", "required_tools_schema"]

_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def named_tool_schema(function: dict[str, Any]) -> dict[str, Any]:
    """The output schema when `function` ({"name", "parameters"?, ...}) is forced: its
    parameters (an object with no properties when it has none)."""
    return function.get("parameters") or dict(_NO_PARAMETERS)


def required_tools_schema(functions: Sequence[dict[str, Any]], parallel: bool
                          ) -> dict[str, Any]:
    """The output schema for tool_choice "required": an array of calls, each
    {"name": one tool's name, "parameters": that tool's parameters}. The `$defs` of every
    tool's parameters move to the top, where their `$ref`s ("#/$defs/...") point; ValueError
    if two tools define one name differently."""
    defs: dict[str, Any] = {}
    options = []
    for function in functions:
        parameters = copy.deepcopy(function.get("parameters") or _NO_PARAMETERS)
        for name, definition in (parameters.pop("$defs", None) or {}).items():
            if defs.setdefault(name, definition) != definition:
                raise ValueError(f"tools define $defs {name!r} in different ways")
        options.append({"type": "object",
                        "properties": {"name": {"type": "string", "enum": [function["name"]]},
                                       "parameters": parameters},
                        "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


class NamedToolParser(ToolParser):
    """The output is the arguments of a call of `name`, sent as they come (as written)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    def _scan(self, final: bool) -> None:
        if (self._buf or final) and self.num_calls == 0:
            self._open_call(self._name)
        self._add_arguments(self._buf)
        self._buf = ""


class RequiredToolParser(ToolParser):
    """The output is a JSON array of call objects (`required_tools_schema`)."""

    def __init__(self) -> None:
        super().__init__()
        # "start" | "open" (a call must begin) | "call" | "after_call" | "end"
        self._state = "start"

    def _scan(self, final: bool) -> None:
        while True:
            state = self._state
            if state == "call":
                if not self._read_call(final):
                    return
                self._state = "after_call"
                continue
            rest = self._buf.lstrip()
            space = len(self._buf) - len(rest)
            if not rest:
                if final and state != "end":
                    raise JsonSyntaxError("the array of tool calls is incomplete")
                self._consume(len(self._buf))
                return
            char = rest[0]
            if state == "start" and char == "[":
                self._state = "open"
            elif state == "open" and char == "{":
                self._consume(space)
                self._state = "call"
                continue
            elif state == "after_call" and char in ",]":
                self._state = "open" if char == "," else "end"
            else:
                raise JsonSyntaxError("not a JSON array of tool calls")
            self._consume(space + 1)
