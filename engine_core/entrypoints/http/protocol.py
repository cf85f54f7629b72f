"""The OpenAI request models (pydantic v2, with vLLM's extra sampling fields), shared by the
server and the proxy, which validate a body the same way. Responses: `openai/responses.py`.

Requests are validated strictly from JSON: a string where a number belongs, a bool where an int
belongs or an unknown enum value is an error naming the field. Unknown fields are ignored, as
OpenAI clients send fields this engine does not know.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine_core.entrypoints.chat import ChatMessageError, require_content, template_tool_calls
from engine_core.entrypoints.http.errors import RequestError
from engine_core.entrypoints.http.structured_outputs import (
    OutputConstraint,
    ResponseFormat,
    StructuredOutputsField,
    output_constraint,
)
from engine_core.entrypoints.http.tool_protocol import (
    ChatTool,
    MessageToolCall,
    ToolChoice,
    resolve_tool_choice,
)
from engine_core.sampling_params import SamplingParams

__all__ = [
    "MAX_N",
    "MAX_PROMPTS",
    "MAX_STOP_STRINGS",
    "MAX_STOP_TOKEN_IDS",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
]

MAX_N = 16  # the most choices one request may ask for
# Caps on what one request may ask of the shared engine and event loop: each prompt is an
# engine request, and every stop string and stop token id is checked at every step.
MAX_PROMPTS = 1024
MAX_STOP_STRINGS = 64
MAX_STOP_TOKEN_IDS = 1024


# ---- requests ---------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # add each choice's (new) output token ids
    priority: int = 0  # lower is served first; non-zero needs --scheduling-policy priority
    # structured outputs (OpenAI's, vLLM's, vLLM's older extras): http/structured_outputs.py
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_supported(self) -> None:
        if self.logit_bias:
            raise RequestError("logit_bias is not supported", param="logit_bias")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            raise RequestError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got "
                               f"{len(self.stop)}", param="stop")
        if self.stop_token_ids is not None and len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise RequestError(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got "
                               f"{len(self.stop_token_ids)}", param="stop_token_ids")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream=true",
                               param="stream_options")
        _ = self.output_constraint  # RequestError for a malformed one

    @cached_property
    def output_constraint(self) -> OutputConstraint | None:
        """The output constraint the request asks for, if any, and the field it came from.
        RequestError (400 naming the field) if it is malformed; whether it compiles is
        checked by the server (`grammars.check_structured_outputs`)."""
        return output_constraint(self)

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """SamplingParams for one prompt: the fields the request gives, else `defaults` (the
        server's `--generation-config`), else SamplingParams'. ValueError (naming the field)
        for bad values."""
        given = {name: getattr(self, name) for name in (
            "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
            "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids")}
        fields = {name: value for name, value in (defaults or {}).items() if name in given}
        fields.update((name, value) for name, value in given.items() if value is not None)
        constraint = self.output_constraint
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, logprobs=logprobs, min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            structured_outputs=constraint.params if constraint is not None else None, **fields)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `prompt`: a string, a list of strings, a list of token ids or a
    list of token-id lists; each prompt gets its own n choices."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0)  # at most the server's --max-logprobs
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise RequestError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of is not supported (other than best_of == n)",
                               param="best_of")
        if self.echo and self.logprobs is not None:
            raise RequestError("echo together with logprobs is not supported (prompt logprobs "
                               "are not computed)", param="echo")

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per choice set."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise RequestError("prompt is empty; give a string or token ids", param="prompt")
        if isinstance(prompt[0], int):
            return [prompt]
        if len(prompt) > MAX_PROMPTS:
            raise RequestError(f"prompt may hold at most {MAX_PROMPTS} prompts, got "
                               f"{len(prompt)}", param="prompt")
        return list(prompt)


class TextContent(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One message. `content` is required (`ChatCompletionRequest.check_supported`) except for
    an assistant message with `tool_calls`, as OpenAI allows. A `tool` message answers the
    call `tool_call_id`."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContent] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    def to_template(self, index: int = 0) -> dict[str, Any]:
        """The {"role", "content", ...} dict a chat template reads (message `index`): text
        parts joined by newlines, tool calls with their arguments parsed (ChatMessageError if
        they are not a JSON object)."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = template_tool_calls(
                index, [call.model_dump(exclude_none=True) for call in self.tool_calls])
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)  # at most the server's --max-logprobs
    tools: list[ChatTool] | None = None
    tool_choice: str | dict[str, Any] | None = None  # checked by `resolved_tool_choice`
    parallel_tool_calls: bool = True
    # vLLM extras
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for i, message in enumerate(self.messages):
            try:
                require_content(i, message.role, message.content, bool(message.tool_calls))
            except ChatMessageError as exc:
                raise RequestError(str(exc), param=".".join(map(str, exc.field))) from None
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        self.resolved_tool_choice()

    def resolved_tool_choice(self) -> ToolChoice:
        """tool_choice checked against tools (400 naming the field if they do not fit)."""
        return resolve_tool_choice(self.tools, self.tool_choice)

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as the chat template gets them (400 naming the field of a tool call
        whose arguments are not a JSON object)."""
        try:
            return [message.to_template(i) for i, message in enumerate(self.messages)]
        except ChatMessageError as exc:
            raise RequestError(str(exc), param=".".join(map(str, exc.field))) from None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


