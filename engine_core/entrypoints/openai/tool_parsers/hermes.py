"""The Hermes format (Hermes 2 Pro, Qwen 2.5 and later): each call is a JSON object between
tags, `<tool_call>{"name": "f", "arguments": {...}}</tool_call>`, several in a row for parallel
calls. Text before the first call is content; text between and after calls is dropped, as
vLLM's `hermes` parser does. A last call without its closing tag (the output ended) counts."""

from __future__ import annotations

from engine_core.entrypoints.openai.tool_parsers.base import (
    JsonSyntaxError,
    ToolParser,
    partial_suffix,
)

__all__ = ["HermesToolParser"]

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    """`--tool-call-parser hermes`."""

    keeps_special_tokens = True

    def __init__(self) -> None:
        super().__init__()
        self._state = "content"  # "content" | "between" (calls) | "call" | "after_call"

    def _scan(self, final: bool) -> None:
        while True:
            state = self._state
            if state in ("content", "between"):
                start = self._buf.find(START)
                if start < 0:
                    keep = 0 if final else partial_suffix(self._buf, START)
                    self._consume(len(self._buf) - keep, content=state == "content")
                    return
                self._consume(start, content=state == "content")
                self._consume(len(START))
                self._state = "call"
            elif state == "call":
                if not self._read_call(final):
                    return
                self._state = "after_call"
            else:  # after a call's object: its closing tag
                rest = self._buf.lstrip()
                space = len(self._buf) - len(rest)
                if rest.startswith(END):
                    self._consume(space + len(END))
                    self._state = "between"
                elif END.startswith(rest):  # more may come; or the output ended here
                    if final:
                        self._consume(len(self._buf))
                    return
                else:
                    raise JsonSyntaxError(f"expected {END} after a tool call")
