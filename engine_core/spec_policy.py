"""When a request speculates, and how many drafts it asks for: the adaptive rule.

Speculation pays when the drafts are accepted and the step is not already compute bound, so
the scheduler proposes drafts for a request only when all of these hold:

1. fewer than `speculative_config.disable_by_batch_size` requests are running (default 32:
   on a CPU, where speculation about breaks even): a larger batch fills the matmuls by itself,
   and every draft token is one more row to compute;
2. the request is not pausing: a request whose drafts keep being rejected (its acceptance
   estimate falls below `MIN_ACCEPTANCE`) stops proposing for 1, 2, 4, ... up to 64 decode
   steps, doubling each time it fails again, then probes once more;
3. the step has token budget for at least one draft, and the request room for another token
   (`max_tokens`, `max_model_len`).

It then asks for `num_speculative_tokens` drafts while at most `SMALL_BATCH` requests are
running (a step that small costs the same with a few more rows: every draft is a free chance);
in a larger batch, about as many drafts as it expects to get accepted, plus one: with acceptance
estimate `a` (each draft accepted with probability `a`, an exponential average over its
verifications), `ceil(a / (1 - a)) + 1`, between 1 and `num_speculative_tokens`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DraftHistory"]

INITIAL_ACCEPTANCE = 0.6  # a new request's (and a resumed one's) acceptance estimate
MIN_ACCEPTANCE = 0.15  # below it, the request pauses
MAX_PAUSE_STEPS = 64
SMALL_BATCH = 4  # running requests up to which each asks for every draft it may
_WEIGHT = 0.5  # of the latest verification in the exponential average


@dataclass
class DraftHistory:
    """One request's record of its verifications, deciding its next number of drafts."""

    acceptance: float = INITIAL_ACCEPTANCE
    pause_steps: int = 0  # decode steps still to go without drafts
    next_pause: int = 1

    def num_drafts(self, num_speculative_tokens: int, num_running: int | None = None) -> int:
        """Drafts to ask for at this decode step (0: pausing) with `num_running` requests
        running (None: a large batch). Counts a paused step."""
        if self.pause_steps > 0:
            self.pause_steps -= 1
            return 0
        if num_running is not None and num_running <= SMALL_BATCH:
            return num_speculative_tokens
        a = self.acceptance
        wanted = num_speculative_tokens if a >= 1.0 else math.ceil(a / (1.0 - a)) + 1
        return max(1, min(num_speculative_tokens, wanted))

    def record(self, num_drafts: int, num_accepted: int) -> None:
        """A verification of `num_drafts` drafts accepted `num_accepted` of them."""
        if num_drafts <= 0:
            return
        rate = num_accepted / num_drafts
        self.acceptance = (1.0 - _WEIGHT) * self.acceptance + _WEIGHT * rate
        if self.acceptance < MIN_ACCEPTANCE:
            self.pause_steps = self.next_pause
            self.next_pause = min(2 * self.next_pause, MAX_PAUSE_STEPS)
            self.acceptance = INITIAL_ACCEPTANCE  # the probe after the pause starts afresh
        elif num_accepted:
            self.next_pause = 1
