"""One JSON value read from text that arrives in pieces, re-serialized as it is read.

`JsonReader` checks the syntax as each character comes and writes the value out again in one
canonical form: `", "` and `": "` between items, no other whitespace, strings with only the
escapes JSON needs (`json.dumps(..., ensure_ascii=False)`), numbers as written. Text is handed
out as soon as it is certain, so a tool call's arguments can be streamed while the model writes
them, and the streamed pieces join to exactly what reading the whole text at once gives.

Each piece says which key of the top-level object its value belongs to, so that a caller can
pick a call's "name" and "arguments" out of `{"name": ..., "arguments": {...}}` as they come.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

__all__ = ["JsonReader", "JsonSyntaxError", "Piece"]

MAX_DEPTH = 256  # deeper nesting is refused (no tool's arguments need it)
_WHITESPACE = " \t\n\r"
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_STRING_RUN = re.compile(r'[^"\\]+')
_SURROGATE = re.compile("[\ud800-\udfff]")
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
                   "t": "\t"}
_LITERALS = {"t": "true", "f": "false", "n": "null"}


class JsonSyntaxError(ValueError):
    """The text is not (the start of) one JSON value."""


class Piece(NamedTuple):
    """Canonical text of the value. `key`: the top-level object's key whose value this text is
    part of (None for the object's own braces, keys and separators, and for a value that is not
    an object); `ends_value`: that value is complete (`text` is then "")."""

    key: str | None
    text: str
    ends_value: bool = False


def _escape(text: str) -> str:
    """`text` as the inside of a JSON string; a lone surrogate as its \\u escape (it cannot be
    written as UTF-8)."""
    escaped = json.dumps(text, ensure_ascii=False)[1:-1]
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", escaped)


class JsonReader:
    """Reads one JSON value (an object only, with `object_only`). Feed it text with `feed`,
    which stops at the value's end; `take` hands out the canonical text read so far. Raw
    control characters inside strings are accepted (and written escaped), as
    `json.loads(strict=False)` does; NaN and Infinity are not JSON and are refused."""

    def __init__(self, object_only: bool = False) -> None:
        self.done = False
        self._object_only = object_only
        self._stack: list[str] = []  # open containers: "{" or "["
        self._state = "value"
        self._pieces: list[Piece] = []
        self._value_key: str | None = None  # the top-level key whose value is being read
        self._key_text: str | None = None  # the top-level key just read, before its ":"
        # inside a string
        self._is_key = False
        self._chars: list[str] = []  # decoded, not yet handed out
        self._key_chars: list[str] = []
        self._escape = ""  # an escape sequence begun, e.g. "\\u00"
        self._high: int | None = None  # a high surrogate waiting for its low half
        # inside a number or a literal
        self._token = ""

    # ---- interface ----------------------------------------------------------------------------
    def feed(self, text: str, pos: int = 0) -> int:
        """Read `text` from `pos` until the value ends; return where reading stopped (the index
        after the value's last character, or len(text)). JsonSyntaxError at the first
        character that cannot continue a JSON value."""
        end = len(text)
        while pos < end and not self.done:
            state = self._state
            if state == "string":
                pos = self._string(text, pos)
                continue
            char = text[pos]
            if state == "number":
                if char in _NUMBER_CHARS:
                    self._token += char
                    pos += 1
                else:
                    self._end_number()  # the char is read again in the next state
                continue
            if state == "literal":
                self._literal(char)
                pos += 1
                continue
            if char in _WHITESPACE:
                pos += 1
                continue
            self._structure(char)
            pos += 1
        if self._state == "string" and not self._is_key:
            self._flush_string()
        return pos

    def finish(self) -> None:
        """The text has ended: JsonSyntaxError unless the value is complete (a number at the
        top level ends here)."""
        if self._state == "number" and not self._stack:
            self._end_number()
        if not self.done:
            raise JsonSyntaxError("the JSON value is incomplete")

    def take(self) -> list[Piece]:
        """The canonical text read since the last call, in pieces (adjacent text of one key
        joined)."""
        pieces: list[Piece] = []
        for piece in self._pieces:
            if (pieces and not piece.ends_value and not pieces[-1].ends_value
                    and pieces[-1].key == piece.key):
                pieces[-1] = Piece(piece.key, pieces[-1].text + piece.text)
            else:
                pieces.append(piece)
        self._pieces = []
        return pieces

    # ---- states -------------------------------------------------------------------------------
    def _emit(self, text: str) -> None:
        self._pieces.append(Piece(self._value_key, text))

    def _error(self, char: str) -> JsonSyntaxError:
        expected = {"value": "a value", "value_or_close": "a value or ']'",
                    "key_or_close": "a key or '}'", "key": "a key", "colon": "':'",
                    "comma_or_close": "',' or a closing bracket"}[self._state]
        return JsonSyntaxError(f"expected {expected}, got {char!r}")

    def _structure(self, char: str) -> None:
        state = self._state
        if state in ("value", "value_or_close"):
            if state == "value_or_close" and char == "]":
                self._close("]")
            elif self._object_only and not self._stack and char != "{":
                raise JsonSyntaxError(f"expected a JSON object, got {char!r}")
            else:
                self._start_value(char)
        elif state in ("key_or_close", "key"):
            if char == '"':
                self._state, self._is_key = "string", True
                self._key_chars = []
                self._emit('"')
            elif char == "}" and state == "key_or_close":
                self._close("}")
            else:
                raise self._error(char)
        elif state == "colon":
            if char != ":":
                raise self._error(char)
            self._emit(": ")
            if len(self._stack) == 1:
                self._value_key = self._key_text
            self._state = "value"
        elif state == "comma_or_close":
            top = self._stack[-1]
            if char == ",":
                self._emit(", ")
                self._state = "key" if top == "{" else "value"
            elif char == "}" and top == "{":
                self._close("}")
            elif char == "]" and top == "[":
                self._close("]")
            else:
                raise self._error(char)

    def _start_value(self, char: str) -> None:
        if char in "{[":
            if len(self._stack) >= MAX_DEPTH:
                raise JsonSyntaxError(f"JSON nested deeper than {MAX_DEPTH} levels")
            self._stack.append(char)
            self._emit(char)
            self._state = "key_or_close" if char == "{" else "value_or_close"
        elif char == '"':
            self._state, self._is_key = "string", False
            self._emit('"')
        elif char == "-" or (char.isdigit() and char.isascii()):
            self._state, self._token = "number", char
        elif char in _LITERALS:
            self._state, self._token = "literal", char
        else:
            raise self._error(char)

    def _close(self, closer: str) -> None:
        self._stack.pop()
        self._emit(closer)
        self._value_done()

    def _value_done(self) -> None:
        """A value has been read completely."""
        if not self._stack:
            self._state, self.done = "done", True
            return
        self._state = "comma_or_close"
        if len(self._stack) == 1 and self._value_key is not None:
            self._pieces.append(Piece(self._value_key, "", True))
            self._value_key = None

    def _end_number(self) -> None:
        if not _NUMBER.fullmatch(self._token):
            raise JsonSyntaxError(f"{self._token!r} is not a JSON number")
        self._emit(self._token)
        self._value_done()

    def _literal(self, char: str) -> None:
        target = _LITERALS[self._token[0]]
        if char != target[len(self._token)]:
            raise JsonSyntaxError(f"expected {target!r}, got {self._token + char!r}")
        self._token += char
        if self._token == target:
            self._emit(target)
            self._value_done()

    # ---- strings ------------------------------------------------------------------------------
    def _string(self, text: str, pos: int) -> int:
        """Read string characters from `pos`; return where reading stopped."""
        if not self._escape:
            run = _STRING_RUN.match(text, pos)
            if run is not None:
                self._add(run.group())
                return run.end()
            char = text[pos]
            if char == '"':
                self._end_string()
            else:  # a backslash
                self._escape = "\\"
            return pos + 1
        char = text[pos]
        if self._escape == "\\":
            if char == "u":
                self._escape = "\\u"
            elif char in _SIMPLE_ESCAPES:
                self._escape = ""
                self._add(_SIMPLE_ESCAPES[char])
            else:
                raise JsonSyntaxError(f"invalid escape \\{char} in a JSON string")
            return pos + 1
        if char not in "0123456789abcdefABCDEF":
            raise JsonSyntaxError(f"invalid escape {self._escape + char} in a JSON string")
        self._escape += char
        if len(self._escape) == 6:
            code = int(self._escape[2:], 16)
            self._escape = ""
            self._add_code(code)
        return pos + 1

    def _add(self, chars: str) -> None:
        if self._high is not None:  # a high surrogate with no low half after it
            high, self._high = self._high, None
            self._add(chr(high))
        (self._key_chars if self._is_key else self._chars).append(chars)

    def _add_code(self, code: int) -> None:
        if self._high is not None and 0xDC00 <= code <= 0xDFFF:
            high, self._high = self._high, None
            self._add(chr(0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00)))
        elif 0xD800 <= code <= 0xDBFF:
            if self._high is not None:
                self._add("")  # the earlier high surrogate is alone
            self._high = code
        else:
            self._add(chr(code))

    def _flush_string(self) -> None:
        if self._chars:
            self._emit(_escape("".join(self._chars)))
            self._chars = []

    def _end_string(self) -> None:
        if self._high is not None:
            self._add("")
        if self._is_key:
            key = "".join(self._key_chars)
            self._emit(_escape(key) + '"')
            self._key_chars = []
            if len(self._stack) == 1:
                self._key_text = key
            self._state = "colon"
            return
        self._flush_string()
        self._emit('"')
        self._value_done()
