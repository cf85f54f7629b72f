"""The proposer interface: who suggests draft tokens for a request about to decode.

The scheduler asks for drafts when it schedules a request's next decode step; the step then
computes the request's last token and its drafts together (a `1 + len(drafts)`-token step, like
a prefill chunk) and the last stage keeps the drafts the target model agrees with
(`executors/stage_worker.py`). A proposer only ever changes speed, never output: any drafts,
even random ones, give the same tokens.

Two kinds (`speculative_config.method`):
- "ngram" (`ngram_proposer.py`): prompt lookup over the request's own tokens; no model, no KV.
- "draft_model" (`executors/draft_model.py`): a small model with the target's vocabulary, its
  KV cache in its own tensors indexed by the same block ids as the target's (one block
  manager). It writes KV, so it proposes only once the request's blocks for `1 + max_drafts`
  tokens are allocated (`needs_blocks`), which also keeps its writes inside those blocks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

__all__ = ["DraftRequest", "Proposer"]


@dataclass(frozen=True)
class DraftRequest:
    """One request to propose for: its tokens (the prompt and every accepted output; the last
    one is the token this step computes), how many drafts it may take at most (>= 1), and its
    block table (for a proposer with `needs_blocks`: blocks for positions up to
    `len(token_ids) - 1 + max_drafts`)."""

    request_id: str
    token_ids: list[int]
    max_drafts: int
    block_ids: list[int]


class Proposer(ABC):
    """Proposes draft tokens; lives in the engine core's process."""

    # True: `propose` runs once the step is scheduled, for all its requests at once, with their
    # blocks allocated (it writes KV). False: it is called request by request while scheduling,
    # so a request takes budget and blocks only for the drafts it got.
    needs_blocks: bool = False

    @abstractmethod
    def propose(self, requests: list[DraftRequest]) -> list[list[int]]:
        """At most `max_drafts` draft token ids for each request (in order; may be empty)."""

    def drop(self, request_id: str) -> None:  # noqa: B027 - optional hook
        """Forget what is kept for a request: it finished or was preempted (its blocks are
        gone)."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release what the proposer holds. Idempotent."""
