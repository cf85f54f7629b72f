"""The tool-calling fields of a chat completion request (OpenAI's `tools`, `tool_choice`,
`parallel_tool_calls`) and the tool calls of assistant messages, checked as vLLM checks them.

- `tools`: at most MAX_TOOLS, each {"type": "function", "function": {"name", "description"?,
  "parameters"? (a JSON schema object)}}; an empty list is refused, as OpenAI does.
- `tool_choice`: "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
  naming one of the tools. Missing: "auto" when there are tools, else "none". Any choice but
  "none" needs `tools`.

Whether "auto" is served (it needs `--enable-auto-tool-choice`) is the server's to say.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine_core.entrypoints.http.errors import RequestError

__all__ = ["MAX_TOOLS", "ChatTool", "FunctionDefinition", "MessageToolCall", "ToolChoice",
           "resolve_tool_choice"]

MAX_TOOLS = 128  # OpenAI's limit
_MODES = ("none", "auto", "required")
_NAMED_USAGE = '{"type": "function", "function": {"name": "my_function"}}'


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class ChatTool(_Strict):
    """One entry of `tools`."""

    type: Literal["function"]
    function: FunctionDefinition

    def to_template(self) -> dict[str, Any]:
        """The tool as a chat template gets it (HF's `tools=[...]`): unset fields left out."""
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class MessageFunction(_Strict):
    name: str
    arguments: str | dict[str, Any] = ""  # OpenAI sends JSON text


class MessageToolCall(_Strict):
    """One call in an assistant message's `tool_calls` (a call the model made earlier)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: MessageFunction


class ToolChoice(BaseModel):
    """A request's tool choice, resolved: `mode` "none" | "auto" | "required" | "function"
    (then `name` is the function's)."""

    model_config = ConfigDict(frozen=True)

    mode: Literal["none", "auto", "required", "function"]
    name: str | None = None


def resolve_tool_choice(tools: list[ChatTool] | None, tool_choice: Any) -> ToolChoice:
    """The request's `tool_choice` checked against its `tools`; RequestError (400) naming the
    field if they do not fit."""
    if tools is not None:
        if not tools:
            raise RequestError("tools must not be an empty list; give at least one tool or "
                               "leave tools out", param="tools")
        if len(tools) > MAX_TOOLS:
            raise RequestError(f"tools may hold at most {MAX_TOOLS} tools, got {len(tools)}",
                               param="tools")
        for i, tool in enumerate(tools):
            kind = (tool.function.parameters or {}).get("type", "object")
            if kind != "object":
                raise RequestError(f"tools[{i}].function.parameters must be a JSON schema of "
                                   f"an object (type \"object\"), got type {kind!r}",
                                   param=f"tools.{i}.function.parameters")
    if tool_choice is None:
        return ToolChoice(mode="auto" if tools else "none")
    if isinstance(tool_choice, str):
        if tool_choice not in _MODES:
            raise RequestError(f"tool_choice must be one of {', '.join(map(repr, _MODES))} or "
                               f"a named function ({_NAMED_USAGE}), got {tool_choice!r}",
                               param="tool_choice")
        if tool_choice != "none" and not tools:
            raise RequestError(f"tool_choice {tool_choice!r} needs tools", param="tool_choice")
        return ToolChoice(mode=tool_choice)  # type: ignore[arg-type]  # one of _MODES
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if tool_choice.get("type") != "function" or not isinstance(name, str) or not name:
        raise RequestError(f"tool_choice must be one of {', '.join(map(repr, _MODES))} or a "
                           f"named function: {_NAMED_USAGE}", param="tool_choice")
    if not tools:
        raise RequestError("a named tool_choice needs tools", param="tool_choice")
    if not any(tool.function.name == name for tool in tools):
        raise RequestError(f"tool_choice names the function {name!r}, which is not among the "
                           f"tools", param="tool_choice")
    return ToolChoice(mode="function", name=name)
