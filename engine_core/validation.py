"""The validation boundary: what a request must satisfy, checked against the model it runs on.

Every entry point (`LLM`, `AsyncLLM`, the HTTP server) calls these before a request is started,
and the engine core calls `validate_core_request` again on whatever it decodes from its input,
so a request that slipped past a front-end (or arrived on the wire from elsewhere) is rejected
on its own instead of failing a step. Each failure is a `ValueError` whose message starts with
the offending field's name.
"""

from __future__ import annotations

import re

from engine_core.config import EngineConfig
from engine_core.kv_transfer_config import SEND_TYPES, KVTransferConfig
from engine_core.messages import EngineCoreRequest
from engine_core.sampling_params import SamplingParams

__all__ = [
    "MAX_N",
    "MAX_REQUEST_ID_CHARS",
    "validate_core_request",
    "validate_kv_transfer",
    "validate_priority",
    "validate_prompt",
    "validate_sampling_params",
]

MAX_REQUEST_ID_CHARS = 256
# Each of a request's n sequences is a request of its own in the engine: without a bound,
# n=2**31 would make the front-end build two billion of them.
MAX_N = 1024
PRIORITY_MIN, PRIORITY_MAX = -(1 << 63), (1 << 63) - 1  # int64, as the wire carries it
_TCP_ENDPOINT = re.compile(r"tcp://[^\s/]+:\d{1,5}")  # a KV endpoint, as instances name theirs


def validate_prompt(prompt_token_ids: list[int], config: EngineConfig) -> None:
    """Raise ValueError unless the prompt can be served by this engine."""
    if not isinstance(prompt_token_ids, list):
        raise ValueError(f"prompt_token_ids must be a list of ints, "
                         f"got {type(prompt_token_ids).__name__}")
    if not prompt_token_ids:
        raise ValueError("the prompt is empty; give at least one token")
    max_len = config.scheduler.max_model_len
    if len(prompt_token_ids) > max_len:
        raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens, more than "
                         f"max_model_len={max_len}; shorten it or raise max_model_len")
    bad = _out_of_vocab(prompt_token_ids, config.model.vocab_size)
    if bad:
        raise ValueError(f"prompt token ids must be ints in [0, {config.model.vocab_size}) "
                         f"(the vocabulary); got {bad}")


def validate_sampling_params(params: SamplingParams, config: EngineConfig) -> None:
    """Raise ValueError unless `params` (already valid on their own) fit this model."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
    if params.n > MAX_N:
        raise ValueError(f"n must be <= {MAX_N} (each sequence is an engine request), "
                         f"got {params.n}")
    if params.logprobs is not None and params.logprobs > config.max_logprobs:
        raise ValueError(f"logprobs must be <= {config.max_logprobs} (the engine's "
                         f"max_logprobs), got {params.logprobs}")
    vocab = config.model.vocab_size
    bad = _out_of_vocab(params.stop_token_ids or [], vocab)
    if bad:
        raise ValueError(f"stop_token_ids must be token ids in [0, {vocab}) (the vocabulary); "
                         f"got {bad}")


def validate_priority(priority: object, policy: str) -> None:
    """Raise ValueError unless `priority` is an int64 that the scheduling policy takes: any
    under "priority" (lower is served first), only 0 under "fcfs" (as vLLM)."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an int, got {type(priority).__name__}")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ValueError(f"priority must be an int64 (between -2**63 and 2**63 - 1), got "
                         f"{str(priority)[:40]}")
    if priority != 0 and policy != "priority":
        raise ValueError(f"priority {priority} needs priority scheduling, which is not enabled "
                         f"(scheduling_policy is {policy!r}); start the engine with "
                         f"scheduling_policy='priority' (--scheduling-policy priority)")


def validate_core_request(request: EngineCoreRequest, config: EngineConfig) -> None:
    """Everything the engine core needs of a request before it may be scheduled."""
    request_id = request.request_id
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS:
        raise ValueError(f"request_id must be a non-empty string of at most "
                         f"{MAX_REQUEST_ID_CHARS} characters")
    if not isinstance(request.owner_id, str) or len(request.owner_id) > MAX_REQUEST_ID_CHARS:
        raise ValueError(f"owner_id must be a string of at most {MAX_REQUEST_ID_CHARS} "
                         f"characters")
    validate_priority(request.priority, config.scheduler.policy)
    validate_prompt(request.prompt_token_ids, config)
    validate_sampling_params(request.sampling_params, config)
    bad = _out_of_vocab(request.eos_token_ids, config.model.vocab_size)
    if bad:
        raise ValueError(f"eos_token_ids must be token ids in [0, {config.model.vocab_size}); "
                         f"got {bad}")


def validate_kv_transfer(request: EngineCoreRequest, kv_config: KVTransferConfig | None,
                         block_size: int) -> None:
    """The disaggregation fields of a request must fit this engine's role: `do_remote_decode`
    needs a producer; `kv_transfer_params` of a decode request (whole blocks of the prompt,
    short of its last token) a consumer."""
    params = request.kv_transfer_params
    if not request.do_remote_decode and params is None:
        return
    if kv_config is None:
        raise ValueError("kv_transfer_params: this engine is not a disaggregated prefill/decode "
                         "instance (no KV transfer config)")
    if params is not None and not _TCP_ENDPOINT.fullmatch(params.kv_endpoint):
        raise ValueError(f"kv_transfer_params.kv_endpoint must be tcp://HOST:PORT, got "
                         f"{params.kv_endpoint[:100]!r}")
    if request.do_remote_decode:
        if not kv_config.is_producer:
            raise ValueError(f"do_remote_decode: this instance is a {kv_config.kv_role}, it "
                             f"does not prefill for others")
        return  # params, if any, name the decoder to push to
    if not kv_config.is_consumer:
        raise ValueError(f"kv_transfer_params: this instance is a {kv_config.kv_role}, it does "
                         f"not take KV from others")
    assert params is not None
    if params.send_type not in SEND_TYPES:
        raise ValueError(f"kv_transfer_params.send_type must be one of {SEND_TYPES}")
    if (params.num_tokens < 0 or params.num_tokens % block_size
            or params.num_tokens != len(params.block_ids) * block_size
            or params.num_tokens >= len(request.prompt_token_ids)):
        raise ValueError(f"kv_transfer_params: {params.num_tokens} tokens in "
                         f"{len(params.block_ids)} blocks of {block_size} do not fit a prompt "
                         f"of {len(request.prompt_token_ids)} tokens")


def _out_of_vocab(token_ids: list[int], vocab_size: int) -> list:
    """Up to five entries of `token_ids` that are not ids of the vocabulary."""
    bad = []
    for t in token_ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            bad.append(t)
            if len(bad) == 5:
                break
    return bad
