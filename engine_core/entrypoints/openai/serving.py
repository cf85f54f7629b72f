"""Serving the OpenAI routes over an `AsyncLLM`: `OpenAIServing` turns a /v1/completions or
/v1/chat/completions body into engine requests and their outputs back into responses.

Each prompt of a request is one engine request, checked once here with the engine's
`InputProcessor` and handed on as it is. Its outputs arrive as cumulative snapshots; streamed
responses send what is new in each (text, and the new tokens' logprobs). A client that
disconnects aborts its requests, so their KV blocks are freed at once. A request from the
disaggregation proxy comes in through `serve_proxied`, its KV transfer side a typed argument
and the params the engine returned its typed result (`proxied.py`).

One request must never hurt the others: a text prompt that cannot fit the context is refused by
its length before it is tokenized, long prompts are tokenized (and chat templates rendered) in a
worker thread so /health and other streams keep flowing, every bad value is a 400 before a
stream starts, and a request the engine fails on its own (finish_reason "error") gets a 500
while the others go on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import msgspec
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from engine_core.entrypoints.async_llm import AsyncLLM, EngineDeadError
from engine_core.entrypoints.http.disconnect import ClientDisconnected as _ClientDisconnected
from engine_core.entrypoints.http.disconnect import unless_disconnected as _unless_disconnected
from engine_core.entrypoints.http.errors import RequestError, param_of, validation_error
from engine_core.entrypoints.http.limits import DEFAULT_MAX_REQUEST_BYTES, RequestTooLarge
from engine_core.entrypoints.http.protocol import ChatCompletionRequest, CompletionRequest
from engine_core.entrypoints.http.setup import ClosingStreamingResponse
from engine_core.entrypoints.http.structured_outputs import OutputConstraint
from engine_core.entrypoints.input_processor import ProcessedPrompt, ProcessedRequest
from engine_core.entrypoints.openai.metrics import ServerMetrics
from engine_core.entrypoints.openai.proxied import (
    KVTransferRequest,
    KVTransferResult,
    Receive,
    Scope,
    Send,
)
from engine_core.entrypoints.openai.responses import (
    chat_choice,
    chat_chunk,
    chat_delta_choice,
    chat_logprobs,
    chat_message,
    completion_choice,
    completion_chunk,
    completion_logprobs,
    usage,
)
from engine_core.entrypoints.openai.tool_calling import ToolPlan, plan_tools
from engine_core.entrypoints.openai.tool_parsers import ToolCallingConfig, ToolParser
from engine_core.grammars import ChecksBusy, ConstraintChecker
from engine_core.outputs import CompletionOutput, RequestOutput
from engine_core.sampling_params import SamplingParams
from engine_core.structured_outputs import StructuredOutputsParams
from engine_core.transfer_params import KVTransferParams

logger = logging.getLogger("engine_core.entrypoints.openai")

_DONE_EVENT = "data: [DONE]\n\n"
# Work on more input than this (characters of text, or token ids) runs in a worker thread, off
# the event loop; below it a thread hop would cost more than the work.
_OFFLOAD_INPUT_SIZE = 4096
_TOKENIZER_THREADS = 2
_GRAMMAR_CHECK_THREADS = 2  # apart from the tokenizer's: a slow check never delays a prompt
_RequestT = TypeVar("_RequestT", bound=BaseModel)
_T = TypeVar("_T")
_P = ParamSpec("_P")


@dataclass
class _Prompt:
    """One prompt of a request: an engine request, with what the metrics and the log need."""

    request_id: str
    request: ProcessedRequest  # checked once, when it was made; the engine gets it as it is
    arrival: float  # time.perf_counter() when the HTTP request came in
    owner_id: str  # the HTTP request's id, shared by its prompts: fair share is per owner
    echo_text: str = ""
    first_token_time: float | None = None
    num_output_tokens: int = 0
    # what the engine returned with the final output (a prefill leg of a proxied request)
    kv_transfer_params: KVTransferParams | None = None
    constraint: OutputConstraint | None = None  # the request's structured outputs, if any

    @property
    def token_ids(self) -> list[int]:
        return self.request.prompt.token_ids

    @property
    def params(self) -> SamplingParams:
        return self.request.params


@dataclass(frozen=True)
class _Served:
    """A route's answer, and the prompts it was generated for (none if it failed first)."""

    response: Response
    prompts: list[_Prompt]


@dataclass
class _ChoiceStream:
    """What one streamed choice has sent so far."""

    text_len: int = 0
    num_tokens: int = 0
    text_offset: int = 0
    started: bool = False
    done: bool = False

    def advance(self, completion: CompletionOutput, holdback: int
                ) -> tuple[str, list[int], list | None]:
        """The text, token ids and logprobs new since the last call. While unfinished, the last
        `holdback` characters are kept back: they may turn out to begin a stop string, which
        the final text will not contain."""
        self.done = completion.finish_reason is not None
        end = len(completion.text) if self.done else len(completion.text) - holdback
        text = completion.text[self.text_len:end] if end > self.text_len else ""
        self.text_len += len(text)
        new_ids = completion.token_ids[self.num_tokens:]
        new_logprobs = None
        if completion.logprobs is not None:
            new_logprobs = completion.logprobs[self.num_tokens:]
        self.num_tokens = len(completion.token_ids)
        return text, new_ids, new_logprobs


def _holdback(params: SamplingParams) -> int:
    """Characters a stream keeps back until they cannot begin a stop string."""
    return max((len(s) for s in params.stop or ()), default=1) - 1


def _sse(body: dict[str, Any]) -> str:
    """One server-sent event. Like JSONResponse, never NaN or Infinity (not JSON): a body
    holding one raises ValueError, and the stream ends with an error event."""
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return f"data: {text}\n\n"


class _RequestFailed(RequestError):
    """The engine finished this request with finish_reason "error" (the others go on)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=500, type="server_error", code="internal_error")


def _raise_if_failed(prompt: _Prompt, output: RequestOutput) -> None:
    """_RequestFailed if the engine failed a sequence of this request; a 400 naming the
    field if it failed on the request's own constraint (see `_constraint_failure`)."""
    for completion in output.outputs:
        if completion.finish_reason == "error":
            error = completion.error or "unknown error"
            if prompt.constraint is not None:
                failure = _constraint_failure(prompt.constraint, error,
                                              len(completion.token_ids))
                if failure is not None:
                    raise failure
            raise _RequestFailed(f"the engine failed request {prompt.request_id}: {error}")


def _checks_busy(exc: ChecksBusy, param: str) -> RequestError:
    """429: every constraint-check slot is held by slow checks of earlier requests."""
    return RequestError(str(exc), param=param, status=429, type="rate_limit_error",
                        code="rate_limit_exceeded")


# How the last stage fails a constrained row that no token can continue
# (executors/token_bitmask.NO_ALLOWED_TOKEN; not imported: it would load torch here)
_DEAD_END = "structured_outputs: "


def _constraint_failure(constraint: OutputConstraint, error: str, num_tokens: int
                        ) -> RequestError | None:
    """The 400 for an engine failure that the client's constraint caused, if it did: its
    grammar could not be compiled in the engine (errors that name "structured_outputs.<kind>"),
    or generation reached a dead end of it (a rule that can never end, reached midway: no token
    may follow). None for other failures."""
    if error.startswith("structured_outputs."):
        return constraint.error(ValueError(error))
    if error.startswith(_DEAD_END):
        return constraint.error(ValueError(
            f"structured_outputs.{constraint.params.kind} reached a dead end after "
            f"{num_tokens} tokens: no token may follow them (a rule that can never end?)"))
    return None


class OpenAIServing:
    """The request handlers behind the routes, over one `AsyncLLM`."""

    def __init__(self, llm: AsyncLLM, model_name: str, metrics: ServerMetrics,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, *,
                 chat_template: str | None = None, log_requests: bool = False,
                 tool_calling: ToolCallingConfig | None = None) -> None:
        """`chat_template` (`--chat-template`) replaces the model's for chat completions;
        `log_requests` (`--enable-log-requests`) logs one INFO line when each engine request
        starts and one when it ends; `tool_calling`: the tool-calling flags."""
        self.llm = llm
        self.model_name = model_name
        self.metrics = metrics
        self.tool_calling = tool_calling or ToolCallingConfig()
        self.max_request_bytes = max_request_bytes  # of a proxied request (HTTP: the middleware)
        self.max_model_len = llm.config.scheduler.max_model_len
        self.max_logprobs = llm.config.max_logprobs
        self.log_requests = log_requests
        # The tokenizer that renders chats: the model's, or a copy with --chat-template's.
        self.chat_tokenizer = llm.tokenizer
        if chat_template is not None and llm.tokenizer is not None:
            self.chat_tokenizer = llm.tokenizer.with_chat_template(chat_template)
        # --generation-config: defaults for the sampling fields a request leaves out
        defaults = dict(llm.input_processor.default_sampling)
        self.default_max_tokens: int | None = defaults.pop("max_tokens", None)
        self.default_sampling = defaults
        self.created = int(time.time())
        self._executor = concurrent.futures.ThreadPoolExecutor(
            _TOKENIZER_THREADS, thread_name_prefix="pp-engine-tokenize")
        self._grammar_executor = concurrent.futures.ThreadPoolExecutor(
            _GRAMMAR_CHECK_THREADS, thread_name_prefix="pp-engine-grammar-check")
        self._constraint_checker = ConstraintChecker(
            vocabulary=llm.input_processor.vocabulary)

    def close(self) -> None:
        """Stop the tokenizer and grammar-check threads (work already running finishes on its
        own)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._grammar_executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, size: int, fn: Callable[_P, _T], *args: _P.args,
                   **kwargs: _P.kwargs) -> _T:
        """fn(*args, **kwargs): in a tokenizer thread when `size` (the input it works on) is
        large, so a long prompt never stalls the event loop; inline otherwise."""
        if size <= _OFFLOAD_INPUT_SIZE:
            return fn(*args, **kwargs)
        return await self._offload(fn, *args, **kwargs)

    async def _offload(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """fn(*args, **kwargs) in a tokenizer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def _check_chars(self, num_chars: int, param: str, what: str = "the prompt has") -> None:
        """400 for text that is provably too long for the context, before tokenizing it."""
        try:
            self.llm.input_processor.check_prompt_chars(num_chars, what)
        except ValueError as exc:
            raise RequestError(str(exc), param=param) from None

    # ---- shared -------------------------------------------------------------------------------
    @staticmethod
    async def _parse(request: Request, model: type[_RequestT]) -> _RequestT:
        body = await request.body()
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            raise validation_error(exc) from None

    def _check_request(self, request: CompletionRequest | ChatCompletionRequest) -> None:
        if request.model is not None and request.model != self.model_name:
            raise RequestError(f"The model `{request.model}` does not exist; this server serves "
                               f"`{self.model_name}`", param="model", status=404,
                               type="NotFoundError", code="model_not_found")
        request.check_supported()
        field = "top_logprobs" if isinstance(request, ChatCompletionRequest) else "logprobs"
        asked = getattr(request, field)
        if asked is not None and asked > self.max_logprobs:
            raise RequestError(f"{field} must be <= {self.max_logprobs} (the server's "
                               f"--max-logprobs), got {asked}", param=field)
        try:
            self.llm.input_processor.check_priority(request.priority)
        except ValueError as exc:
            raise RequestError(str(exc), param="priority") from None
        if not self.llm.is_running:
            raise RequestError("the engine is not running", status=503, type="server_error",
                               code="engine_dead")

    async def _check_constraint(self, request: CompletionRequest | ChatCompletionRequest
                                ) -> None:
        """400 naming the field the client used unless the request's output constraint (if
        any) compiles: `grammars.ConstraintChecker`, in a worker thread (the first check loads
        xgrammar, seconds; a pathological one is cut off by its timeout), never on the event
        loop. 429 while slow checks of earlier requests hold every slot."""
        constraint = request.output_constraint
        if constraint is None:
            return
        if self.llm.tokenizer is None:
            raise RequestError(f"{constraint.field} needs a tokenizer, and this model has no "
                               f"tokenizer.json", param=constraint.field)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._grammar_executor, self._constraint_checker.check,
                                       constraint.params)
        except ValueError as exc:
            raise constraint.error(exc) from None
        except ChecksBusy as exc:
            raise _checks_busy(exc, constraint.field) from None

    def _tokenize(self, prompt: str | list[int], add_special_tokens: bool, param: str,
                  where: str = "") -> ProcessedPrompt:
        """Tokenize and check a prompt whose length in characters has been checked."""
        try:
            return self.llm.input_processor.process_prompt(prompt, add_special_tokens)
        except ValueError as exc:
            raise RequestError(f"{where}{exc}", param=param) from None

    def _max_tokens(self, requested: int | None, prompt_len: int, param: str) -> int:
        """`requested`, or else the room left in the context (at most the default from
        `--generation-config`, as vLLM); 400 if they do not fit together."""
        limit = self.max_model_len
        if requested is None:
            if prompt_len >= limit:
                raise RequestError(f"the prompt has {prompt_len} tokens and fills the model's "
                                   f"context of {limit} tokens; shorten it", param=param)
            return min(limit - prompt_len, self.default_max_tokens or limit)
        if prompt_len + requested > limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in "
                f"the completion). Please reduce the length of the prompt or {param}.",
                param=param)
        return requested

    def _sampling_params(self, request: CompletionRequest | ChatCompletionRequest,
                         max_tokens: int, logprobs: int | None,
                         tool_schema: dict[str, Any] | None = None) -> SamplingParams:
        """The request's SamplingParams, checked against the model too (stop_token_ids in the
        vocabulary), so that every bad value is a 400 before a stream starts. The request's own
        output constraint must have been checked (`_check_constraint`). `tool_schema`: the
        JSON schema forcing tool calls (checking it may take seconds, when xgrammar is loaded:
        call this in a thread then)."""
        try:
            params = request.sampling_params(max_tokens, logprobs, self.default_sampling)
        except ValueError as exc:
            raise RequestError(str(exc), param=param_of(str(exc))) from None
        if tool_schema is not None:
            if params.structured_outputs is not None:
                raise RequestError("a tool_choice that forces calls (\"required\" or a named "
                                   "function) cannot be combined with another output "
                                   "constraint", param="tool_choice")
            constraint = StructuredOutputsParams(json=tool_schema)
            params = msgspec.structs.replace(params, structured_outputs=constraint)
            try:
                self._constraint_checker.check(constraint)
                self.llm.input_processor.check_sampling_params(params, constraint_checked=True)
            except ValueError as exc:  # the tools' parameters are not a schema xgrammar takes
                raise RequestError(f"the tools' parameters cannot force a call: {exc}",
                                   param="tools") from None
            except ChecksBusy as exc:
                raise _checks_busy(exc, "tools") from None
            return params
        try:
            self.llm.input_processor.check_sampling_params(params, constraint_checked=True)
        except ValueError as exc:
            raise RequestError(str(exc), param=param_of(str(exc))) from None
        return params

    def _observe(self, prompt: _Prompt, output: RequestOutput) -> None:
        """Metrics and the log line of one snapshot of `prompt`'s output."""
        now = time.perf_counter()
        total = sum(len(c.token_ids) for c in output.outputs)
        if prompt.first_token_time is None and total > 0:
            prompt.first_token_time = now
            self.metrics.record_tokens(len(prompt.token_ids), 0)
        self.metrics.record_tokens(0, total - prompt.num_output_tokens)
        prompt.num_output_tokens = total
        if not output.finished:
            return
        reasons = sorted({c.finish_reason or "abort" for c in output.outputs})
        e2e = now - prompt.arrival
        ttft = (prompt.first_token_time or now) - prompt.arrival
        if not {"abort", "error"} & set(reasons):  # only requests that ran to their end
            self.metrics.record_finished(reasons[0], ttft, e2e,
                                         max(len(c.token_ids) for c in output.outputs))
        if self.log_requests:
            logger.info(
                "%s finished (%s): prompt_tokens=%d output_tokens=%d ttft=%.3fs e2e=%.3fs",
                prompt.request_id, ",".join(reasons), len(prompt.token_ids), total, ttft, e2e)

    async def _generate(self, prompts: list[_Prompt], kv_transfer: KVTransferRequest | None
                        ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """(prompt index, snapshot) of all prompts, generated concurrently, as they come.
        Closing this iterator aborts the prompts that have not finished. With `kv_transfer`
        (a proxied request), each prompt's final output leaves its KV transfer params in the
        prompt."""
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()
        transfer = kv_transfer if kv_transfer is not None else KVTransferRequest()

        async def produce(index: int, prompt: _Prompt) -> None:
            if self.log_requests:
                logger.info("Received request %s: prompt_tokens=%d, params=%s",
                            prompt.request_id, len(prompt.token_ids), prompt.params)
            try:
                async for output in self.llm.generate_processed(
                        prompt.request, prompt.request_id, owner_id=prompt.owner_id,
                        do_remote_decode=transfer.do_remote_decode,
                        kv_transfer_params=transfer.params_for(index)):
                    if output.finished:
                        prompt.kv_transfer_params = output.kv_transfer_params
                    self._observe(prompt, output)
                    _raise_if_failed(prompt, output)
                    queue.put_nowait((index, output))
                queue.put_nowait((index, None))
            except asyncio.CancelledError:
                if self.log_requests:
                    logger.info("%s aborted after %d output tokens", prompt.request_id,
                                prompt.num_output_tokens)
                raise
            except Exception as exc:
                log = logger.error if isinstance(exc, _RequestFailed) else logger.info
                log("%s failed after %d output tokens: %s", prompt.request_id,
                    prompt.num_output_tokens, exc)
                queue.put_nowait((index, exc))

        tasks = [asyncio.create_task(produce(i, p)) for i, p in enumerate(prompts)]
        try:
            running = len(tasks)
            while running:
                index, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()

    async def _collect(self, request: Request, prompts: list[_Prompt],
                       kv_transfer: KVTransferRequest | None) -> list[RequestOutput]:
        """The final output of every prompt; aborts them all if the client disconnects."""

        async def run() -> list[RequestOutput]:
            finals: list[RequestOutput | None] = [None] * len(prompts)
            async with contextlib.aclosing(self._generate(prompts, kv_transfer)) as outputs:
                async for index, output in outputs:
                    finals[index] = output
            return finals  # type: ignore[return-value]

        return await _unless_disconnected(request, run())

    def _stream(self, events: AsyncIterator[str]) -> StreamingResponse:
        return ClosingStreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- requests from the disaggregation proxy -----------------------------------------------
    async def serve_proxied(self, scope: Scope, receive: Receive, send: Send,
                            kv_transfer: KVTransferRequest) -> KVTransferResult:
        """`proxied.ProxiedApp`: serve a request of the disaggregation proxy (`instance.py`) as
        its route (`scope["path"]`) answers over HTTP, with its KV transfer side; return, once
        the response has been sent, the KV transfer params each prompt's engine request gave
        back. The proxy's channel is authenticated by the instance (CurveZMQ, a registered
        proxy), so no API key is asked for; the body limit is this server's."""
        raw = Request(scope, receive)
        routes = {"/v1/completions": self._completions,
                  "/v1/chat/completions": self._chat_completions}
        prompts: list[_Prompt] = []
        try:
            if len(await raw.body()) > self.max_request_bytes:
                raise RequestTooLarge(self.max_request_bytes)
            route = routes.get(scope["path"])
            if route is None:
                raise RequestError("Not Found", status=404, code=404)
            served = await route(raw, kv_transfer)
            response, prompts = served.response, served.prompts
        except Exception as exc:
            response = self.error_response(exc)
        await response(scope, receive, send)
        return KVTransferResult(tuple(p.kv_transfer_params for p in prompts))

    # ---- /v1/completions ----------------------------------------------------------------------
    async def completions(self, raw: Request) -> Response:
        """POST /v1/completions."""
        return (await self._completions(raw, None)).response

    async def _completions(self, raw: Request, kv_transfer: KVTransferRequest | None) -> _Served:
        arrival = time.perf_counter()
        request = await self._parse(raw, CompletionRequest)
        self._check_request(request)
        await self._check_constraint(request)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        texts = request.prompts()
        for i, text in enumerate(texts):  # cheap length checks first, before any tokenizing
            if isinstance(text, str):
                where = f"prompt {i}: " if len(texts) > 1 else ""
                self._check_chars(len(text), "prompt", f"{where}the prompt has")
        prompts = await self._run(sum(len(t) for t in texts), self._completion_prompts,
                                  request, request_id, texts, arrival)
        created = int(time.time())
        if request.stream:
            return _Served(self._stream(self._completion_events(
                request, request_id, created, prompts, kv_transfer)), prompts)
        finals = await self._collect(raw, prompts, kv_transfer)
        choices = []
        num_generated = 0
        for i, (prompt, output) in enumerate(zip(prompts, finals)):
            for completion in output.outputs:
                logprobs = None
                if completion.logprobs is not None:
                    logprobs, _ = completion_logprobs(completion.token_ids, completion.logprobs,
                                                      len(prompt.echo_text))
                choices.append(completion_choice(
                    i * request.n + completion.index, prompt.echo_text + completion.text,
                    completion, logprobs,
                    completion.token_ids if request.return_token_ids else None))
                num_generated += len(completion.token_ids)
        num_prompt = sum(len(p.token_ids) for p in prompts)
        return _Served(JSONResponse(completion_chunk(request_id, created, self.model_name,
                                                     choices, usage(num_prompt, num_generated))),
                       prompts)

    def _completion_prompts(self, request: CompletionRequest, request_id: str,
                            texts: list[str | list[int]], arrival: float) -> list[_Prompt]:
        """Tokenize and check each prompt of a completion request (may run in a thread)."""
        prompts = []
        for i, text in enumerate(texts):
            where = f"prompt {i}: " if len(texts) > 1 else ""
            processed = self._tokenize(text, True, "prompt", where)
            max_tokens = self._max_tokens(request.max_tokens, len(processed.token_ids),
                                          "max_tokens")
            params = self._sampling_params(request, max_tokens, request.logprobs)
            prompt = _Prompt(f"{request_id}-{i}",
                             ProcessedRequest(processed, params, request.priority), arrival,
                             request_id, constraint=request.output_constraint)
            if request.echo:
                prompt.echo_text = text if isinstance(text, str) \
                    else self._decode(processed.token_ids)
            prompts.append(prompt)
        return prompts

    def _decode(self, token_ids: list[int]) -> str:
        tokenizer = self.llm.tokenizer
        return tokenizer.decode(token_ids) if tokenizer is not None else ""

    async def _completion_events(self, request: CompletionRequest, request_id: str,
                                 created: int, prompts: list[_Prompt],
                                 kv_transfer: KVTransferRequest | None
                                 ) -> AsyncGenerator[str, None]:
        n = request.n
        holdback = _holdback(prompts[0].params)
        states = [_ChoiceStream() for _ in range(len(prompts) * n)]
        try:
            async with contextlib.aclosing(self._generate(prompts, kv_transfer)) as outputs:
                async for i, output in outputs:
                    for completion in output.outputs:
                        state = states[i * n + completion.index]
                        if state.done:
                            continue
                        text, new_ids, new_logprobs = state.advance(completion, holdback)
                        if not state.started:
                            text, state.started = prompts[i].echo_text + text, True
                        logprobs = None
                        if new_logprobs is not None and new_ids:
                            logprobs, state.text_offset = completion_logprobs(
                                new_ids, new_logprobs, state.text_offset)
                        if not text and not new_ids and not state.done:
                            continue
                        choice = completion_choice(
                            i * n + completion.index, text, completion if state.done else None,
                            logprobs, new_ids if request.return_token_ids else None)
                        yield _sse(completion_chunk(request_id, created, self.model_name,
                                                    [choice]))
            if request.include_usage:
                yield _sse(completion_chunk(request_id, created, self.model_name, [],
                                            self._usage(prompts, states)))
        except Exception as exc:
            yield _sse(self.error(exc).body())
        yield _DONE_EVENT

    @staticmethod
    def _usage(prompts: list[_Prompt], states: list[_ChoiceStream]) -> dict[str, int]:
        return usage(sum(len(p.token_ids) for p in prompts), sum(s.num_tokens for s in states))

    # ---- /v1/chat/completions -----------------------------------------------------------------
    async def chat_completions(self, raw: Request) -> Response:
        """POST /v1/chat/completions."""
        return (await self._chat_completions(raw, None)).response

    async def _chat_completions(self, raw: Request, kv_transfer: KVTransferRequest | None
                                ) -> _Served:
        arrival = time.perf_counter()
        request = await self._parse(raw, ChatCompletionRequest)
        self._check_request(request)
        tools = plan_tools(request, self.tool_calling)
        await self._check_constraint(request)
        tokenizer = self.llm.tokenizer
        if tokenizer is None:
            raise RequestError("this model has no tokenizer.json, and chat needs one; start "
                               "the server with --tokenizer DIR, or use /v1/completions with "
                               "token-id prompts", param="messages")
        messages = request.template_messages()
        num_chars = sum(len(m["content"]) for m in messages)
        self._check_chars(num_chars, "messages", "the messages have")
        processed = await self._run(num_chars, self._chat_prompt, request, messages,
                                    tools.template_tools)
        param = "max_completion_tokens" if request.max_completion_tokens is not None \
            else "max_tokens"
        max_tokens = self._max_tokens(request.requested_max_tokens, len(processed.token_ids),
                                      param)
        if tools.schema is None:
            params = self._sampling_params(request, max_tokens, request.num_logprobs)
        else:
            params = await self._offload(self._sampling_params, request, max_tokens,
                                         request.num_logprobs, tools.schema)
        if tools.keeps_special_tokens:  # the parser's tags may be special tokens
            params = msgspec.structs.replace(params, skip_special_tokens=False)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        prompts = [_Prompt(request_id, ProcessedRequest(processed, params, request.priority),
                           arrival, request_id, constraint=request.output_constraint)]
        created = int(time.time())
        if request.stream:
            return _Served(self._stream(self._chat_events(request, request_id, created, prompts,
                                                          kv_transfer, tools)), prompts)
        (output,) = await self._collect(raw, prompts, kv_transfer)
        choices = []
        for completion in output.outputs:
            logprobs = None
            if completion.logprobs is not None:
                logprobs = chat_logprobs(completion.token_ids, completion.logprobs,
                                         request.top_logprobs or 0)
            message, finish_reason = None, None
            parser = tools.parser()
            if parser is not None:
                parsed = parser.extract(completion.text)
                message = chat_message(parsed.content,
                                       [call.to_openai() for call in parsed.tool_calls])
                finish_reason = tools.finish_reason(parser, completion.finish_reason)
            choices.append(chat_choice(completion.index, completion, logprobs,
                                       completion.token_ids if request.return_token_ids
                                       else None, message, finish_reason))
        num_generated = sum(len(c.token_ids) for c in output.outputs)
        return _Served(JSONResponse({
            "id": request_id, "object": "chat.completion", "created": created,
            "model": self.model_name, "choices": choices,
            "usage": usage(len(processed.token_ids), num_generated)}), prompts)

    def _chat_prompt(self, request: ChatCompletionRequest, messages: list[dict[str, Any]],
                     tools: list[dict[str, Any]] | None) -> ProcessedPrompt:
        """Render the chat template (with `tools`; chat_template_kwargs may override them,
        as in vLLM) and tokenize the result (may run in a thread)."""
        assert self.chat_tokenizer is not None
        try:
            text = self.chat_tokenizer.apply_chat_template(
                messages, add_generation_prompt=request.add_generation_prompt,
                **{"tools": tools, **(request.chat_template_kwargs or {})})
        except (ValueError, TypeError, LookupError, ArithmeticError, AttributeError) as exc:
            # the template is the server's, but messages and chat_template_kwargs are the
            # client's: a template that fails on them is a bad request
            raise RequestError(f"cannot apply the chat template: {exc}",
                               param="messages") from None
        if not isinstance(text, str):
            raise RequestError("the chat template did not render to text", param="messages")
        self._check_chars(len(text), "messages")
        return self._tokenize(text, False, "messages")

    async def _chat_events(self, request: ChatCompletionRequest, request_id: str, created: int,
                           prompts: list[_Prompt], kv_transfer: KVTransferRequest | None,
                           tools: ToolPlan) -> AsyncGenerator[str, None]:
        holdback = _holdback(prompts[0].params)
        states = [_ChoiceStream() for _ in range(request.n)]
        parsers: list[ToolParser | None] = [tools.parser() for _ in range(request.n)]
        top = request.top_logprobs or 0
        try:
            for index in range(request.n):
                role = {"index": index, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}
                yield _sse(chat_chunk(request_id, created, self.model_name, [role]))
            async with contextlib.aclosing(self._generate(prompts, kv_transfer)) as outputs:
                async for _, output in outputs:
                    for completion in output.outputs:
                        state = states[completion.index]
                        if state.done:
                            continue
                        text, new_ids, new_logprobs = state.advance(completion, holdback)
                        logprobs = None
                        if new_logprobs is not None and new_ids:
                            logprobs = chat_logprobs(new_ids, new_logprobs, top)
                        calls, finish_reason = None, None
                        parser = parsers[completion.index]
                        if parser is not None:
                            delta = parser.feed(text, final=state.done)
                            text = delta.content
                            calls = [call.to_openai() for call in delta.tool_calls]
                            finish_reason = tools.finish_reason(parser, completion.finish_reason)
                        if not text and not calls and not new_ids and not state.done:
                            continue
                        choice = chat_delta_choice(
                            completion.index, text, completion, state.done, logprobs,
                            new_ids if request.return_token_ids else None, calls, finish_reason)
                        yield _sse(chat_chunk(request_id, created, self.model_name, [choice]))
            if request.include_usage:
                yield _sse(chat_chunk(request_id, created, self.model_name, [],
                                      self._usage(prompts, states)))
        except Exception as exc:
            yield _sse(self.error(exc).body())
        yield _DONE_EVENT

    # ---- errors -------------------------------------------------------------------------------
    def error(self, exc: Exception) -> RequestError:
        """The OpenAI error for an exception raised while serving a request."""
        if isinstance(exc, RequestError):
            return exc
        if isinstance(exc, EngineDeadError):
            return RequestError(f"the engine failed: {exc}", status=500, type="server_error",
                                code="engine_dead")
        if isinstance(exc, ValueError):
            return RequestError(str(exc), param=param_of(str(exc)))
        logger.error("internal error while serving a request", exc_info=exc)
        return RequestError(f"internal server error: {type(exc).__name__}: {exc}", status=500,
                            type="server_error", code="internal_error")

    def error_response(self, exc: Exception) -> Response:
        if isinstance(exc, _ClientDisconnected):
            return Response(status_code=499)
        error = self.error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    def models(self) -> dict[str, Any]:
        """GET /v1/models."""
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created,
            "owned_by": "pp-engine", "root": self.llm.config.model_dir,
            "max_model_len": self.max_model_len}]}
