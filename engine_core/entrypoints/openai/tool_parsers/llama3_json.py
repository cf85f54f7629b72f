"""The Llama 3.1/3.2 JSON format: the whole output is the calls, each a JSON object
`{"name": "f", "parameters": {...}}` ("arguments" accepted too), several separated by ";",
optionally after `<|python_tag|>`. Anything else is plain content. As vLLM's `llama3_json`
parser streams it: the output must begin with the tag or "{" (whitespace aside)."""

from __future__ import annotations

from engine_core.entrypoints.openai.tool_parsers.base import JsonSyntaxError, ToolParser

__all__ = ["Llama3JsonToolParser"]

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    """`--tool-call-parser llama3_json`."""

    def __init__(self) -> None:
        super().__init__()
        self._state = "start"  # "start" | "open" (a call may begin) | "call" | "after_call"

    def _scan(self, final: bool) -> None:
        while True:
            rest = self._buf.lstrip()
            space = len(self._buf) - len(rest)
            state = self._state
            if state == "call":
                if not self._read_call(final):
                    return
                self._state = "after_call"
                continue
            if not rest:  # only whitespace so far
                if final:
                    if state != "after_call" and self.num_calls == 0:
                        raise JsonSyntaxError("no tool call")
                    self._consume(len(self._buf))
                return
            if state == "start" and rest.startswith(PYTHON_TAG):
                self._consume(space + len(PYTHON_TAG))
                self._state = "open"
            elif state == "start" and PYTHON_TAG.startswith(rest):
                if final:
                    raise JsonSyntaxError("no tool call")
                return
            elif state in ("start", "open") and rest[0] == "{":
                self._consume(space)
                self._state = "call"
            elif state == "after_call" and rest[0] == ";":
                self._consume(space + 1)
                self._state = "open"
            else:
                raise JsonSyntaxError("not a Llama 3 JSON tool call")
