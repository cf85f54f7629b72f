"""Tool calling on /v1/chat/completions: parsers of the calls in a model's output.

`TOOL_PARSERS` names the formats `--tool-call-parser` takes (used when tool_choice is "auto",
with `--enable-auto-tool-choice`); `forced` holds the parsers of calls that tool_choice
"required" or a named function force with a JSON schema. `ToolCallingConfig` is the server's
tool-calling settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from engine_core.entrypoints.openai.tool_parsers.base import (
    DeltaMessage,
    ExtractedToolCalls,
    ToolCall,
    ToolCallDelta,
    ToolParser,
)
from engine_core.entrypoints.openai.tool_parsers.forced import (
    NamedToolParser,
    RequiredToolParser,
    named_tool_schema,
    required_tools_schema,
)
from engine_core.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from engine_core.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser

__all__ = ["TOOL_PARSERS", "DeltaMessage", "ExtractedToolCalls", "NamedToolParser",
           "RequiredToolParser", "ToolCall", "ToolCallDelta", "ToolCallingConfig", "ToolParser",
           "named_tool_schema", "required_tools_schema"]

# --tool-call-parser NAME -> the parser class (one instance per choice)
TOOL_PARSERS: MappingProxyType[str, type[ToolParser]] = MappingProxyType({
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
})


@dataclass(frozen=True)
class ToolCallingConfig:
    """The server's tool-calling flags. `tool_call_parser`: a name in TOOL_PARSERS, needed by
    `enable_auto_tool_choice` (tool_choice "auto", the default when a request has tools);
    `exclude_tools_when_tool_choice_none`: with tool_choice "none", the chat template gets no
    tools (by default it still does, as in vLLM)."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    exclude_tools_when_tool_choice_none: bool = False

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_PARSERS)}, got "
                             f"{self.tool_call_parser!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser "
                             "(--enable-auto-tool-choice needs --tool-call-parser)")

    def auto_parser(self) -> ToolParser | None:
        """A parser for one choice of a tool_choice "auto" request, or None if auto is off."""
        if not self.enable_auto_tool_choice or self.tool_call_parser is None:
            return None
        return TOOL_PARSERS[self.tool_call_parser]()
