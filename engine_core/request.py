"""A request inside the engine core: its tokens, progress and status."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from engine_core.messages import EngineCoreRequest
from engine_core.sampling_params import SamplingParams
from engine_core.spec_policy import DraftHistory

if TYPE_CHECKING:
    from engine_core.grammars import RequestGrammar


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    WAITING_FOR_REMOTE_KV = enum.auto()  # a decode instance's request, its KV on the way
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()  # failed on its own (e.g. in sampling); the batch went on

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
            RequestStatus.FINISHED_ERROR: "error",
        }.get(self)


class Request:
    """Scheduler-side state of one sequence.

    `num_computed_tokens` advances when a step is *scheduled*, not when it returns, so a request
    whose step is in flight has nothing left to schedule. `num_inflight_steps` counts its submitted,
    unfinished steps; `num_synced_tokens`/`num_synced_blocks` how many of its tokens and blocks
    the stages have been sent.
    """

    def __init__(self, core_request: EngineCoreRequest, max_model_len: int) -> None:
        params = core_request.sampling_params
        self.request_id = core_request.request_id
        self.sampling_params: SamplingParams = params
        self.prompt_token_ids = list(core_request.prompt_token_ids)
        self.eos_token_ids = frozenset(core_request.eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids or ())
        self.arrival_time = core_request.arrival_time
        self.owner = core_request.owner_id or core_request.request_id  # its user request
        self.priority = core_request.priority  # lower is served first (policy "priority")
        self.order = 0  # the engine's arrival order, set by the scheduler
        self.do_remote_decode = core_request.do_remote_decode
        self.remote_kv = core_request.kv_transfer_params
        self.num_remote_kv_tokens = 0  # leading tokens whose KV arrived from a prefill instance
        self.remote_kv_fetched = False  # its one fetch is over (whatever came of it)
        self.all_token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        room = max(1, max_model_len - self.num_prompt_tokens)  # the last token needs no KV
        self.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_inflight_steps = 0
        self.num_synced_tokens = 0
        self.num_synced_blocks = 0
        self.stop_reason: int | None = None
        self.error: str | None = None  # why it finished with FINISHED_ERROR
        # KV of tokens at and after this position was never written (a cancelled step); their
        # blocks must not stay in the prefix cache when the request is released.
        self.num_valid_kv_tokens: int | None = None
        # Speculative decoding: the drafts its step in flight verifies (not in all_token_ids,
        # but counted in num_computed_tokens until the step returns), and its acceptance record.
        self.draft_token_ids: list[int] = []
        self.draft_history = DraftHistory()
        # Structured outputs: its place in its grammar (set by the engine once compiled); every
        # token it keeps advances it, and the request finishes when the grammar does.
        self.grammar: RequestGrammar | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def needs_remote_kv(self) -> bool:
        """A decode instance's request whose prompt KV is still to be fetched (once: after the
        fetch, ok or not, and after a preemption it computes what it lacks)."""
        remote = self.remote_kv
        return (remote is not None and not self.do_remote_decode and remote.num_tokens > 0
                and not self.remote_kv_fetched)

    @property
    def stop_ids_for_min_tokens(self) -> list[int]:
        """Token ids the sampler masks until `min_tokens` outputs exist (none under a grammar,
        which allows a stop token only once it is complete: the grammar decides the end)."""
        if self.sampling_params.structured_outputs is not None:
            return []
        return sorted(self.eos_token_ids | self.stop_token_ids)

    @property
    def grammar_stop_ids(self) -> list[int]:
        """The tokens that end a complete grammar: EOS and the request's stop token ids."""
        return sorted(self.eos_token_ids | self.stop_token_ids)

    def append_token(self, token_id: int) -> None:
        """Append a sampled token and decide whether the request has finished."""
        grammar = self.grammar
        if grammar is not None:
            if not grammar.accept(token_id):  # the last stage broke the bitmask
                self.status = RequestStatus.FINISHED_ERROR
                self.error = (f"token {token_id} breaks the request's structured_outputs "
                              f"constraint")
                return
            if grammar.is_terminated:  # complete: a stop token, or the grammar's last
                self.all_token_ids.append(token_id)
                self.status = RequestStatus.FINISHED_STOPPED
                if token_id in self.stop_token_ids:
                    self.stop_reason = token_id
                return
        self.all_token_ids.append(token_id)
        params = self.sampling_params
        n_out = self.num_output_tokens
        if n_out >= params.min_tokens:
            if token_id in self.stop_token_ids:
                self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, token_id
                return
            if not params.ignore_eos and token_id in self.eos_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                return
        if n_out >= self.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
