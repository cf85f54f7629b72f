"""Tool calling for one chat completion request, as vLLM does it: what the chat template gets,
which constraint forces calls, which parser reads each choice, and the finish reason.

- "none": the template still gets `tools` (not with --exclude-tools-when-tool-choice-none);
  the output is plain content.
- "auto" (the default when a request has tools; needs --enable-auto-tool-choice, else 400):
  free output, read by the --tool-call-parser.
- "required": the output is constrained to a JSON array of calls (RequiredToolParser).
- a named function: the output is constrained to its arguments (NamedToolParser).

finish_reason is "tool_calls" when calls were parsed from an output that ended normally
("stop"), except for a named function, where it stays "stop" as OpenAI's does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine_core.entrypoints.http.errors import RequestError
from engine_core.entrypoints.http.protocol import ChatCompletionRequest
from engine_core.entrypoints.http.tool_protocol import ToolChoice
from engine_core.entrypoints.openai.tool_parsers import (
    NamedToolParser,
    RequiredToolParser,
    ToolCallingConfig,
    ToolParser,
    named_tool_schema,
    required_tools_schema,
)

__all__ = ["ToolPlan", "plan_tools"]


@dataclass(frozen=True)
class ToolPlan:
    """How one request uses tools (`plan_tools`)."""

    choice: ToolChoice
    template_tools: list[dict[str, Any]] | None  # what the chat template gets as `tools`
    schema: dict[str, Any] | None  # the JSON schema forcing calls, if any
    config: ToolCallingConfig

    def parser(self) -> ToolParser | None:
        """A fresh parser for one choice, or None when the output is plain content."""
        mode = self.choice.mode
        if mode == "function":
            assert self.choice.name is not None
            return NamedToolParser(self.choice.name)
        if mode == "required":
            return RequiredToolParser()
        if mode == "auto":
            return self.config.auto_parser()
        return None

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether the output must keep special tokens for its parser ("auto" with a parser
        whose call tags may be special tokens; EOS and stop token ids never reach the text)."""
        parser = self.parser() if self.choice.mode == "auto" else None
        return parser is not None and parser.keeps_special_tokens

    def finish_reason(self, parser: ToolParser | None, reason: str | None) -> str | None:
        """The choice's finish reason, given the engine's and what its parser found."""
        if (parser is not None and parser.tools_called and reason == "stop"
                and self.choice.mode != "function"):
            return "tool_calls"
        return reason


def plan_tools(request: ChatCompletionRequest, config: ToolCallingConfig) -> ToolPlan:
    """The request's tool plan; RequestError (400, naming the field) for tools and a
    tool_choice that do not fit, or "auto" on a server without --enable-auto-tool-choice."""
    choice = request.resolved_tool_choice()
    tools = request.tools or []
    if choice.mode == "auto" and not config.enable_auto_tool_choice:
        raise RequestError('"auto" tool choice requires --enable-auto-tool-choice and '
                           '--tool-call-parser to be set (the default tool_choice when a '
                           'request has tools); ask for tool_choice "required", "none" or a '
                           'named function instead', param="tool_choice")
    template_tools = [tool.to_template() for tool in tools] or None
    if choice.mode == "none" and config.exclude_tools_when_tool_choice_none:
        template_tools = None
    functions = [tool.to_template()["function"] for tool in tools]
    schema = None
    if choice.mode == "function":
        schema = named_tool_schema(next(f for f in functions if f["name"] == choice.name))
    elif choice.mode == "required":
        try:
            schema = required_tools_schema(functions, request.parallel_tool_calls)
        except ValueError as exc:
            raise RequestError(str(exc), param="tools") from None
    return ToolPlan(choice, template_tools, schema, config)
