"""What every tool-call parser shares: the call and delta types, the reader of one call object
and `ToolParser`, the streaming parser each format builds on.

A parser reads one choice's output as it is generated (`feed`, the last piece with
`final=True`) and says what may be sent now: content text, and tool-call deltas (a call's id
and name first, then its arguments in fragments). `extract` parses a whole output at once
through the same code, so the fragments a stream sends always join to what the non-streamed
response holds.

A call is sent as soon as its name is known. Text that turns out not to be a call before any
call was sent is content after all (a response of plain text, or a malformed call: the whole
output is content). A call that goes bad after calls were sent cannot be taken back from a
stream: the stream sends nothing more, and the non-streamed response is all content, as vLLM's
is when a call fails to parse.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from engine_core.entrypoints.openai.tool_parsers.json_reader import JsonReader, JsonSyntaxError

__all__ = ["ARGUMENT_KEYS", "CallReader", "DeltaMessage", "ExtractedToolCalls", "JsonSyntaxError",
           "ToolCall", "ToolCallDelta", "ToolParser", "make_tool_call_id", "partial_suffix"]

ARGUMENT_KEYS = ("arguments", "parameters")  # models write either


def make_tool_call_id() -> str:
    """A new tool call id, as vLLM makes them."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ToolCall:
    """One complete call: `arguments` is JSON text."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """Part of call `index` in a stream: its first delta carries `id` and `name`."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        delta: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.id is not None:
            delta["id"], delta["type"] = self.id, "function"
        if self.name is not None:
            function = {"name": self.name, **function}
        delta["function"] = function
        return delta


@dataclass
class DeltaMessage:
    """What a stream may send after some output: content text and call deltas."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass(frozen=True)
class ExtractedToolCalls:
    """A whole output parsed: the calls, and the content (the text outside them; None when
    there are calls and no text)."""

    content: str | None
    tool_calls: list[ToolCall]


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (and is shorter than it):
    characters a stream holds back until it can tell whether the tag follows."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class CallReader:
    """Reads one call object, `{"name": "f", "arguments": {...}}` ("parameters" in place of
    "arguments" too; other keys ignored), from text fed in pieces. `name` is set once the name
    is read; `take_arguments` hands out the arguments' canonical JSON as it is read ("{}" for a
    call without arguments). JsonSyntaxError for anything else."""

    def __init__(self) -> None:
        self._json = JsonReader(object_only=True)
        self.name: str | None = None
        self._name_text: list[str] = []
        self._name_read = False
        self._arguments_key: str | None = None
        self._arguments_read = False
        self._arguments: list[str] = []

    @property
    def done(self) -> bool:
        """The whole object has been read."""
        return self._json.done

    def feed(self, text: str) -> int:
        """Read `text` until the object ends; return how many characters were read."""
        end = self._json.feed(text)
        for piece in self._json.take():
            self._read(piece.key, piece.text, piece.ends_value)
        if self._json.done:
            if self.name is None:
                raise JsonSyntaxError('a tool call needs a "name"')
            if self._arguments_key is None:
                self._arguments_key, self._arguments = ARGUMENT_KEYS[0], ["{}"]
        return end

    def finish(self) -> None:
        """The text has ended: JsonSyntaxError unless the object is complete."""
        self._json.finish()

    def take_arguments(self) -> str:
        """The arguments' JSON text read since the last call."""
        text = "".join(self._arguments)
        self._arguments = []
        return text

    def _read(self, key: str | None, text: str, ends_value: bool) -> None:
        if key == "name":
            if self._name_read:
                raise JsonSyntaxError('a tool call has "name" twice')
            self._name_text.append(text)
            if ends_value:
                self._name_read = True
                name = "".join(self._name_text)
                if not name.startswith('"') or name == '""':
                    raise JsonSyntaxError('a tool call\'s "name" must be a non-empty string')
                self.name = json.loads(name)
        elif key in ARGUMENT_KEYS:
            if self._arguments_read or self._arguments_key not in (None, key):
                raise JsonSyntaxError('a tool call has more than one "arguments"/"parameters"')
            self._arguments_key = key
            self._arguments.append(text)
            self._arguments_read = ends_value


class ToolParser(ABC):
    """Finds the tool calls in one choice's output (one instance per choice, used once).

    Subclasses implement `_scan`, which reads `self._buf` as far as it can tell what the text
    is, consuming it with `_consume` (as content, or as call syntax) and reading call objects
    with `_read_call`; it raises JsonSyntaxError for text that breaks the format."""

    # Its call tags may be special tokens (Hermes' <tool_call> in Qwen's vocabulary): a request
    # it parses keeps special tokens in its text (vLLM's `adjust_request`).
    keeps_special_tokens = False

    def __init__(self) -> None:
        self._buf = ""  # output not yet consumed
        self._delta = DeltaMessage()  # what the current feed produced
        self._raw: list[str] = []  # consumed call syntax, while no call has been sent
        self._mode = "scan"  # "scan"; "plain": all content; "dead": a sent call went bad
        self._reader: CallReader | None = None
        self._current_sent = False
        self.num_calls = 0  # calls sent so far
        self.failed = False  # a call went bad after calls were sent

    # ---- interface ----------------------------------------------------------------------------
    def feed(self, text: str, final: bool = False) -> DeltaMessage:
        """Take the next piece of output (`final`: the last); return what may be sent now."""
        self._buf += text
        self._run(final)
        return self._take()

    def extract(self, text: str) -> ExtractedToolCalls:
        """Parse a whole output (on a fresh parser)."""
        delta = self.feed(text, final=True)
        if self.failed:
            return ExtractedToolCalls(text, [])
        tool_calls = [ToolCall(c.id or "", c.name or "", c.arguments) for c in delta.tool_calls]
        content = delta.content
        return ExtractedToolCalls(content or None if tool_calls else content, tool_calls)

    @property
    def tools_called(self) -> bool:
        """Calls were found (and none went bad)."""
        return self.num_calls > 0 and not self.failed

    # ---- for subclasses -----------------------------------------------------------------------
    @abstractmethod
    def _scan(self, final: bool) -> None:
        """Consume `self._buf` as far as can be told now (all of it when `final`)."""

    def _consume(self, size: int, content: bool = False) -> None:
        """Take `size` characters off the buffer: content, or call syntax."""
        text, self._buf = self._buf[:size], self._buf[size:]
        if content:
            self._delta.content += text
        elif self.num_calls == 0:
            self._raw.append(text)

    def _read_call(self, final: bool) -> bool:
        """Read the buffer into the current call object (a new one if none); send its name
        and arguments as they are known. True once the object is complete."""
        if self._reader is None:
            self._reader = CallReader()
        reader = self._reader
        self._consume(reader.feed(self._buf))
        if final and not reader.done:
            reader.finish()  # raises: the object is incomplete
        if reader.name is not None and not self._current_sent:
            self._open_call(reader.name)
        if self._current_sent:
            self._add_arguments(reader.take_arguments())
        if reader.done:
            self._reader, self._current_sent = None, False
            return True
        return False

    def _open_call(self, name: str) -> None:
        self._delta.tool_calls.append(ToolCallDelta(self.num_calls, make_tool_call_id(), name))
        self.num_calls += 1
        self._current_sent = True
        self._raw = []

    def _add_arguments(self, text: str) -> None:
        if not text:
            return
        calls = self._delta.tool_calls
        if calls and calls[-1].index == self.num_calls - 1:
            calls[-1].arguments += text
        else:
            calls.append(ToolCallDelta(self.num_calls - 1, arguments=text))

    # ---- internals ----------------------------------------------------------------------------
    def _run(self, final: bool) -> None:
        if self._mode == "scan":
            try:
                self._scan(final)
            except JsonSyntaxError:
                self._fail()
        if self._mode == "plain":
            self._consume(len(self._buf), content=True)
        elif self._mode == "dead":
            self._buf = ""

    def _fail(self) -> None:
        """The text breaks the format: all content if no call was sent, else give up."""
        if self.num_calls == 0:
            self._mode = "plain"
            self._delta.content += "".join(self._raw)
            self._raw = []
        else:
            self._mode, self.failed = "dead", True

    def _take(self) -> DeltaMessage:
        delta, self._delta = self._delta, DeltaMessage()
        return delta
