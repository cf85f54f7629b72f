"""Builders of the OpenAI response and stream-chunk bodies (plain dicts, serialised by the
server): choices, chunks, usage and logprobs."""

from __future__ import annotations

import math
from typing import Any

from engine_core.outputs import CompletionOutput, Logprob

__all__ = ["chat_choice", "chat_chunk", "chat_delta_choice", "chat_logprobs", "chat_message",
           "completion_choice", "completion_chunk", "completion_logprobs", "usage"]

_MIN_LOGPROB = -9999.0  # -inf is not JSON; report it as this, like vLLM


# ---- responses --------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token_text(token_id: int, logprob: Logprob) -> str:
    return logprob.decoded_token if logprob.decoded_token is not None else f"token_id:{token_id}"


def _clamp(logprob: float) -> float:
    """A logprob JSON can hold: -inf (and NaN, which no distribution has) as -9999.0, like
    vLLM, anything above 0 (+inf) as 0.0: a response never holds NaN or Infinity, which are
    not JSON."""
    if math.isnan(logprob):
        return _MIN_LOGPROB
    return min(max(logprob, _MIN_LOGPROB), 0.0)


def _sampled(token_id: int, entry: dict[int, Logprob]) -> Logprob:
    return entry.get(token_id) or next(iter(entry.values()))


def completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]],
                        text_offset: int) -> tuple[dict[str, Any], int]:
    """Completions-style logprobs of some generated tokens (the sampled token's logprob and a
    {token: logprob} dict of the top ones, sampled token included, as vLLM does), with each
    token's character offset counted from `text_offset`. Returns it and the next offset."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        text = _token_text(token_id, _sampled(token_id, entry))
        tokens.append(text)
        token_logprobs.append(_clamp(_sampled(token_id, entry).logprob))
        top_logprobs.append({_token_text(t, lp): _clamp(lp.logprob) for t, lp in entry.items()})
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}, text_offset


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]],
                  top_logprobs: int) -> dict[str, Any]:
    """Chat-style logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}, each
    top_logprobs list the `top_logprobs` most likely tokens, most likely first."""

    def item(token_id: int, lp: Logprob) -> dict[str, Any]:
        text = _token_text(token_id, lp)
        return {"token": text, "logprob": _clamp(lp.logprob), "bytes": list(text.encode())}

    content = []
    for token_id, entry in zip(token_ids, entries):
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or len(entry) + 1)
        content.append({**item(token_id, _sampled(token_id, entry)),
                        "top_logprobs": [item(t, lp) for t, lp in ranked[:top_logprobs]]})
    return {"content": content}


def completion_choice(index: int, text: str, completion: CompletionOutput | None,
                      logprobs: dict[str, Any] | None, token_ids: list[int] | None = None
                      ) -> dict[str, Any]:
    """One choice of a completion response or chunk (`completion` None: not finished)."""
    choice = {"index": index, "text": text, "logprobs": logprobs,
              "finish_reason": completion.finish_reason if completion else None,
              "stop_reason": completion.stop_reason if completion else None}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def completion_chunk(request_id: str, created: int, model: str,
                     choices: list[dict[str, Any]], usage: dict[str, int] | None = None
                     ) -> dict[str, Any]:
    """A "text_completion" body: the whole response, or one streamed chunk."""
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage}


def chat_message(content: str | None, tool_calls: list[dict[str, Any]] | None = None
                 ) -> dict[str, Any]:
    """An assistant message: its content, and the tool calls it makes (if any)."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def chat_choice(index: int, completion: CompletionOutput, logprobs: dict[str, Any] | None,
                token_ids: list[int] | None = None, message: dict[str, Any] | None = None,
                finish_reason: str | None = None) -> dict[str, Any]:
    """One choice of a non-streamed chat completion: the output's text as the message, or
    `message` (`chat_message`, with tool calls) and `finish_reason` in place of the output's."""
    choice = {"index": index, "message": message or chat_message(completion.text),
              "logprobs": logprobs, "finish_reason": finish_reason or completion.finish_reason,
              "stop_reason": completion.stop_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chat_delta_choice(index: int, text: str, completion: CompletionOutput, finished: bool,
                      logprobs: dict[str, Any] | None, token_ids: list[int] | None = None,
                      tool_calls: list[dict[str, Any]] | None = None,
                      finish_reason: str | None = None) -> dict[str, Any]:
    """One choice of a streamed chat chunk: the new content and tool-call deltas (and the
    finish reason, last: `finish_reason`, or the output's)."""
    delta: dict[str, Any] = {"content": text} if text or not tool_calls else {}
    if tool_calls:
        delta["tool_calls"] = tool_calls
    choice = {"index": index, "delta": delta, "logprobs": logprobs,
              "finish_reason": (finish_reason or completion.finish_reason) if finished else None,
              "stop_reason": completion.stop_reason if finished else None}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chat_chunk(request_id: str, created: int, model: str, choices: list[dict[str, Any]],
               usage: dict[str, int] | None = None) -> dict[str, Any]:
    """A "chat.completion.chunk" body; `choices` hold deltas."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": choices, "usage": usage}
