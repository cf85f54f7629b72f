"""The validation boundary: what a request must satisfy, checked against the model it runs on.

Every entry point (`LLM`, `AsyncLLM`, the HTTP server) calls these before a request is started,
and the engine core calls `validate_core_request` again on whatever it decodes from its input,
so a request that slipped past a front-end (or arrived on the wire from elsewhere) is rejected
on its own instead of failing a step. Each failure is a `ValueError` whose message starts with
the offending field's name.
"""

from __future__ import annotations

from engine_core.config import EngineConfig
from engine_core.messages import EngineCoreRequest
from engine_core.sampling_params import SamplingParams

__all__ = [
    "MAX_REQUEST_ID_CHARS",
    "validate_core_request",
    "validate_prompt",
    "validate_sampling_params",
]

MAX_REQUEST_ID_CHARS = 256


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
    vocab = config.model.vocab_size
    bad = _out_of_vocab(params.stop_token_ids or [], vocab)
    if bad:
        raise ValueError(f"stop_token_ids must be token ids in [0, {vocab}) (the vocabulary); "
                         f"got {bad}")


def validate_core_request(request: EngineCoreRequest, config: EngineConfig) -> None:
    """Everything the engine core needs of a request before it may be scheduled."""
    request_id = request.request_id
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS:
        raise ValueError(f"request_id must be a non-empty string of at most "
                         f"{MAX_REQUEST_ID_CHARS} characters")
    validate_prompt(request.prompt_token_ids, config)
    validate_sampling_params(request.sampling_params, config)
    bad = _out_of_vocab(request.eos_token_ids, config.model.vocab_size)
    if bad:
        raise ValueError(f"eos_token_ids must be token ids in [0, {config.model.vocab_size}); "
                         f"got {bad}")


def _out_of_vocab(token_ids: list[int], vocab_size: int) -> list:
    """Up to five entries of `token_ids` that are not ids of the vocabulary."""
    bad = []
    for t in token_ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            bad.append(t)
            if len(bad) == 5:
                break
    return bad
