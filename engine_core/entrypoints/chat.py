"""Chat messages: what a message must hold before a chat template may render it.

One rule for both front-ends (`LLM.chat` and the server's /v1/chat/completions): every role
needs `content` (a string, or a non-empty list of text parts) except an assistant message that
carries `tool_calls`, as OpenAI allows. `check_messages` validates plain dicts (the offline
API); the server's pydantic models check the types and then call `require_content`.

An assistant message's `tool_calls` reach the template with each call's `arguments` parsed
from its JSON text into a dict (`template_tool_calls`), as vLLM hands them on: HF chat
templates iterate over the arguments or write them with `tojson`.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["ROLES", "ChatMessageError", "check_messages", "require_content",
           "template_tool_calls"]

ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatMessageError(ValueError):
    """A message that cannot be rendered; `field` names it as a path, e.g. ("messages", 1,
    "content")."""

    def __init__(self, field: tuple[str | int, ...], problem: str) -> None:
        self.field = field
        super().__init__(f"{format_field(field)} {problem}")


def format_field(field: tuple[str | int, ...]) -> str:
    """('messages', 1, 'content') -> 'messages[1].content'."""
    text = ""
    for part in field:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def require_content(index: int, role: str, content: Any, has_tool_calls: bool) -> None:
    """ChatMessageError unless a message of `role` may have this `content` (already of the
    right type): None only for an assistant message with tool calls; never an empty list."""
    field = ("messages", index, "content")
    if content is None:
        if role == "assistant" and has_tool_calls:
            return
        needs = ("is required for an assistant message without tool_calls"
                 if role == "assistant" else f"is required for a {role} message")
        raise ChatMessageError(field, f"{needs} (a string or a list of text parts)")
    if isinstance(content, list) and not content:
        raise ChatMessageError(field, "must not be an empty list of parts")


def template_tool_calls(index: int, tool_calls: list[Any]) -> list[dict[str, Any]]:
    """Message `index`'s tool calls as a chat template gets them: [{"id"?, "type": "function",
    "function": {"name", "arguments": dict}}], JSON-text arguments parsed ("" or none: {}).
    ChatMessageError naming the field for a call without a function name or with arguments
    that are not a JSON object."""
    calls = []
    for j, call in enumerate(tool_calls):
        where = ("messages", index, "tool_calls", j)
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ChatMessageError((*where, "function"), 'must be {"name": ..., '
                                                         '"arguments": ...}')
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError as exc:
                raise ChatMessageError((*where, "function", "arguments"),
                                       f"is not valid JSON: {exc}") from None
        if not isinstance(arguments, dict):
            raise ChatMessageError((*where, "function", "arguments"),
                                   f"must be a JSON object, got {type(arguments).__name__}")
        rendered: dict[str, Any] = {"type": "function",
                                    "function": {"name": function["name"],
                                                 "arguments": arguments}}
        if call.get("id") is not None:
            rendered = {"id": call["id"], **rendered}
        calls.append(rendered)
    return calls


def _text_of(index: int, content: Any) -> str | None:
    """The message's content as the template's string (text parts joined by newlines)."""
    field = ("messages", index, "content")
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatMessageError(field, f"must be a string or a list of text parts, got "
                                      f"{type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        where = (*field, j)
        if not isinstance(part, dict):
            raise ChatMessageError(where, f"must be a {{'type': 'text', 'text': ...}} part, got "
                                          f"{type(part).__name__}")
        if part.get("type") != "text":
            raise ChatMessageError((*where, "type"), f"must be 'text' (the only part type "
                                                     f"supported), got {part.get('type')!r}")
        text = part.get("text")
        if not isinstance(text, str):
            raise ChatMessageError((*where, "text"), f"must be a string, got "
                                                     f"{type(text).__name__}")
        texts.append(text)
    return "\n".join(texts)


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """The template's messages for one conversation given as plain dicts: each checked (role,
    content, name), its content made a string. Keys this module does not know pass through to
    the template unchanged. ChatMessageError naming the field, e.g. messages[1].content."""
    if not isinstance(messages, list) or not messages:
        raise ChatMessageError(("messages",), "must be a non-empty list of message dicts")
    rendered = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatMessageError(("messages", i), f"must be a dict with 'role' and "
                                                    f"'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ChatMessageError(("messages", i, "role"), f"must be one of "
                                                            f"{', '.join(ROLES)}, got {role!r}")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise ChatMessageError(("messages", i, "name"), f"must be a string, got "
                                                            f"{type(name).__name__}")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and not isinstance(tool_calls, list):
            raise ChatMessageError(("messages", i, "tool_calls"), f"must be a list, got "
                                                                  f"{type(tool_calls).__name__}")
        content = message.get("content")
        text = _text_of(i, content)
        require_content(i, role, content, bool(tool_calls))
        message = {**message, "content": text or ""}
        if tool_calls:
            message["tool_calls"] = template_tool_calls(i, tool_calls)
        rendered.append(message)
    return rendered
