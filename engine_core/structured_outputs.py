"""A request's output constraint (structured outputs), with vLLM's names.

`StructuredOutputsParams` rides inside `SamplingParams` (so it crosses every process boundary as
msgpack). Exactly one kind is set:

- `json`: a JSON schema (a dict, or its JSON text): the output is one JSON value that the
  schema validates;
- `regex`: the output matches the regular expression in full;
- `choice`: the output is exactly one of these strings;
- `grammar`: an EBNF grammar (xgrammar's dialect, GBNF-like, its start rule `root`);
- `json_object`: the output is one JSON object, any keys.

JSON output is compact: no whitespace beyond `", "` and `": "` between items (vLLM's
`disable_any_whitespace`), and properties a schema does not list are not generated, so a small
model cannot wander into unbounded whitespace or keys. Whether the text is a valid schema, regex
or grammar is checked by `engine_core.grammars.check_structured_outputs` (it needs xgrammar);
here only the shape: one kind, of the right type, within `MAX_SPEC_CHARS`.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

__all__ = ["MAX_CHOICES", "MAX_SPEC_CHARS", "StructuredOutputsParams"]

MAX_SPEC_CHARS = 1 << 20  # the longest schema, regex or grammar text a request may carry
MAX_CHOICES = 4096
_KINDS = ("json", "regex", "choice", "grammar", "json_object")


class StructuredOutputsParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One output constraint; see the module docstring. `json` given as a dict is kept as its
    JSON text (key order kept: it is the order properties are generated in)."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            try:
                self.json = json.dumps(self.json, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"structured_outputs.json is not a JSON schema: {exc}") from None
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str):
                    raise ValueError(f"structured_outputs.{name} must be a string, got "
                                     f"{type(value).__name__}")
                if len(value) > MAX_SPEC_CHARS:
                    raise ValueError(f"structured_outputs.{name} may be at most "
                                     f"{MAX_SPEC_CHARS} characters, got {len(value)}")
        if self.choice is not None:
            choice = self.choice
            if (not isinstance(choice, (list, tuple)) or not choice
                    or not all(isinstance(c, str) for c in choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            if len(choice) > MAX_CHOICES or sum(map(len, choice)) > MAX_SPEC_CHARS:
                raise ValueError(f"structured_outputs.choice may hold at most {MAX_CHOICES} "
                                 f"strings of {MAX_SPEC_CHARS} characters in all")
            self.choice = list(choice)
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, got "
                             f"{self.json_object!r}")
        kinds = [kind for kind in _KINDS if getattr(self, kind) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(_KINDS)}; "
                             f"got {', '.join(kinds) or 'none'}")

    @property
    def kind(self) -> str:
        """Which constraint: "json" | "regex" | "choice" | "grammar" | "json_object"."""
        return next(kind for kind in _KINDS if getattr(self, kind) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): what a compiled grammar is cached by."""
        kind = self.kind
        if kind == "choice":
            return kind, json.dumps(self.choice, ensure_ascii=False)
        if kind == "json_object":
            return kind, ""
        value = getattr(self, kind)
        assert isinstance(value, str)
        return kind, value

    @classmethod
    def from_key(cls, key: tuple[str, str]) -> StructuredOutputsParams:
        """The constraint a `key` stands for."""
        kind, text = key
        if kind == "choice":
            return cls(choice=json.loads(text))
        if kind == "json_object":
            return cls(json_object=True)
        if kind == "json":
            return cls(json=text)
        if kind == "regex":
            return cls(regex=text)
        return cls(grammar=text)
