"""What the engine core checks of a step's output before the scheduler applies it.

The last pipeline stage returns one sampled token per request that reached the end of its known
tokens. That crosses a process (Ray actor) boundary, so the engine treats it as input: a row that
breaks an invariant finishes *its* request with finish_reason "error" and never fails the step.

- every row names a request of this batch, once; every request of the batch that reached the
  end of its tokens has a row (else it would wait for a token that never comes); a request
  whose step verified drafts may have up to `1 + len(drafts)` consecutive rows, all but the
  last equal to its drafts in order (only the KV of accepted drafts is valid);
- a token id is an int in [0, vocab), or the row carries an error;
- logprobs, if any, are as long as each other, name ids in the vocabulary and are finite
  (they are sent as JSON, which has no NaN or infinities).

Only a malformed whole (the wrong step, rows and tokens of different counts) is the stage's
failure, and fails the step.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping

from engine_core.messages import (
    CachedRequest,
    NewRequest,
    SampledToken,
    StepBatch,
    StepOutput,
    TokenLogprobs,
)
from engine_core.request import Request, RequestStatus

__all__ = ["checked_step_output"]

logger = logging.getLogger(__name__)


def checked_step_output(batch: StepBatch, output: StepOutput, requests: Mapping[str, Request],
                        vocab_size: int) -> StepOutput:
    """`output` with every row that breaks an invariant replaced by an error row (token -1),
    and an error row added for each running request of `batch` that should have sampled but got
    no row. `requests`: the scheduler's requests, read only. Raises RuntimeError if the output
    is not this batch's or its columns differ in length."""
    if output.step_id != batch.step_id or len(output.request_ids) != len(output.sampled):
        raise RuntimeError(
            f"the last stage returned step {output.step_id} with {len(output.request_ids)} "
            f"request ids and {len(output.sampled)} tokens for step {batch.step_id}")
    items = list(itertools.chain[NewRequest | CachedRequest](batch.new_requests,
                                                             batch.cached_requests))
    scheduled = {item.request_id: item.num_computed_tokens + item.num_new_tokens
                 for item in items}
    drafts = {item.request_id: item.draft_token_ids for item in items if item.draft_token_ids}
    request_ids: list[str] = []
    sampled: list[SampledToken] = []
    for request_id, rows in output.rows_by_request():
        if request_id not in scheduled:
            logger.error("the last stage returned a token for %r, which is not in step %d "
                         "or twice in it; dropped", request_id[:100], batch.step_id)
            continue
        del scheduled[request_id]  # a second group of rows for it is dropped above
        error = next((token.error for token in rows if token.error is not None), None)
        if error is None:
            error = _rows_error(rows, drafts.get(request_id, []), vocab_size)
            if error is not None:
                logger.error("request %r: %s", request_id[:100], error)
        if error is None:
            request_ids.extend([request_id] * len(rows))
            sampled.extend(rows)
        else:
            request_ids.append(request_id)
            sampled.append(SampledToken(-1, error=error))
    for request_id, num_known in scheduled.items():
        request = requests.get(request_id)
        if (request is not None and request.status == RequestStatus.RUNNING
                and num_known >= request.num_tokens):
            logger.error("request %r: no token came back from step %d", request_id[:100],
                         batch.step_id)
            request_ids.append(request_id)
            sampled.append(SampledToken(-1, error="the last stage returned no token for it"))
    return StepOutput(output.step_id, request_ids, sampled)


def _rows_error(rows: list[SampledToken], drafts: list[int], vocab_size: int) -> str | None:
    """Why a request's rows (without errors of their own) cannot be applied, or None."""
    if len(rows) > 1 + len(drafts):
        return (f"the last stage returned {len(rows)} tokens for a step with "
                f"{len(drafts)} drafts")
    accepted = [token.token_id for token in rows[:-1]]
    if accepted != drafts[:len(accepted)]:
        return "the last stage accepted tokens that are not the step's drafts"
    for token in rows:
        error = _token_error(token, vocab_size)
        if error is not None:
            return error
    return None


def _token_error(token: SampledToken, vocab_size: int) -> str | None:
    """Why a row without an error of its own cannot be applied, or None."""
    token_id = token.token_id
    if isinstance(token_id, bool) or not isinstance(token_id, int) \
            or not 0 <= token_id < vocab_size:
        return f"sampling returned token id {token_id!r}, outside the vocabulary [0, {vocab_size})"
    if token.logprobs is not None:
        return _logprobs_error(token.logprobs, vocab_size)
    return None


def _logprobs_error(logprobs: TokenLogprobs, vocab_size: int) -> str | None:
    ids, values, ranks = logprobs.token_ids, logprobs.logprobs, logprobs.ranks
    if not len(ids) == len(values) == len(ranks) or not ids:
        return "sampling returned logprobs whose ids, values and ranks differ in length"
    if not (min(ids) >= 0 and max(ids) < vocab_size):
        return "sampling returned logprobs for ids outside the vocabulary"
    if not all(math.isfinite(value) for value in values):
        return "sampling returned logprobs that are not finite"
    return None
