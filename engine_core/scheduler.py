"""Continuous-batching scheduler over the one shared KV block manager.

Each step, every scheduled request's computed tokens catch up towards its total: no separate
prefill and decode phases. Long prompts are split over steps (chunked prefill). A step, under a
token budget and a sequence cap:

1. fair share: a waiting request whose owner (its user request: all prompts and n sequences of
   one API request) holds fewer seats than its fair share (the seats in use split evenly over
   the owners holding or wanting one) is admitted first; if it finds no seat or too few blocks,
   the latest-admitted sequence not in flight of the owner holding the most seats beyond its
   share is preempted for it, so a small request behind a giant waits a step, not the giant;
2. running requests, in admission order. When blocks run out, the running request the policy
   ranks last that is not in flight is preempted by recompute: its blocks are freed, it is
   reset to zero computed tokens and goes back to the waiting queue;
3. unless 1 or 2 preempted, waiting requests in the policy's order (`request_queue.py`:
   round-robin over owners, then FCFS, or by `priority` then arrival), until one gets no seat
   or no blocks.

Alone, an owner may take every seat: fair share only acts while another owner waits.
`fair_share=False` gives plain FCFS (or priority) admission over sequences.

With `max_concurrent_batches = N > 1` several microbatches are in flight. A request whose step is
in flight has no tokens left to schedule and is skipped (nor can it be preempted: the stages may
still write its blocks), and each microbatch is capped at about 1/N of the active requests and
of the token budget, so the pipeline fills evenly.

Disaggregated prefill/decode adds two small hooks. On a decode instance a request whose KV comes
from a prefill instance waits in the queue like any other; at the head of the queue it gets
blocks for its prompt (or stays there until blocks free up) and waits apart
(WAITING_FOR_REMOTE_KV), out of scheduling, while the KV connector fetches into them; at
`remote_kv_ready` it goes back to the queue, its transferred tokens counted as computed. On a
prefill instance a finished `do_remote_decode` request keeps its blocks (`kv_held`) until
`free_held_kv`.

Speculative decoding (`speculative_config.py`, `spec_policy.py`): a running request about to
decode may get drafts from the proposer, once every running request has its next tokens, from
the budget and free blocks left (drafts never preempt, nor take a token or a block from another
running request); its step then computes `1 + len(drafts)` tokens and counts them all as
computed while in flight. When it returns, the accepted tokens are appended and the computed
count rolls back to the KV that is valid: the drafts that were rejected are recomputed over
(their blocks stay with the request) and were never hashed (hashes only cover `all_token_ids`),
so the prefix cache never holds KV of a rejected token.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

from engine_core.block_manager import KVBlockManager
from engine_core.config import SchedulerConfig
from engine_core.messages import (
    CachedRequest,
    EngineCoreOutput,
    NewRequest,
    SpecDecodingStats,
    StepBatch,
    StepOutput,
    TokenLogprobs,
)
from engine_core.proposer import DraftRequest, Proposer
from engine_core.request import Request, RequestStatus
from engine_core.request_queue import RequestQueue
from engine_core.speculative_config import SpeculativeConfig
from engine_core.validation import validate_priority


@dataclass
class _Step:
    """The microbatch being picked: what it holds so far and the room it has left."""

    seq_cap: int
    token_budget: int
    # (request, num_new_tokens, is_new)
    scheduled: list[tuple[Request, int, bool]] = field(default_factory=list)
    request_ids: set[str] = field(default_factory=set)  # of `scheduled`: once a step each

    def has_room(self) -> bool:
        return len(self.scheduled) < self.seq_cap and self.token_budget > 0

    def add(self, request: Request, num_new: int, is_new: bool) -> None:
        request.num_inflight_steps += 1
        self.scheduled.append((request, num_new, is_new))
        self.request_ids.add(request.request_id)
        self.token_budget -= num_new


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: KVBlockManager,
                 speculative: SpeculativeConfig | None = None,
                 proposer: Proposer | None = None) -> None:
        """`speculative` and `proposer`: speculative decoding, both or neither."""
        if (speculative is None) != (proposer is None):
            raise ValueError("speculative decoding needs both a speculative config and a "
                             "proposer")
        self.config = config
        self.block_manager = block_manager
        self.speculative = speculative
        self.proposer = proposer
        self.spec_stats = SpecDecodingStats()
        # requests of the step being picked that wait for a proposer with `needs_blocks`:
        # (request, max drafts)
        self._to_propose: list[tuple[Request, int]] = []
        self.requests: dict[str, Request] = {}
        self.waiting = RequestQueue(config.policy, config.fair_share)
        self.running: list[Request] = []
        self.seats: Counter[str] = Counter()  # owner -> running and fetching; see schedule()
        self._order = itertools.count()
        self._finished_ids: list[str] = []  # to tell the stages with the next batch
        self._step_ids = itertools.count()
        self.num_preemptions = 0
        self.num_prompt_tokens_computed = 0  # prompt tokens run through the model (scheduled)
        self.waiting_for_kv: dict[str, Request] = {}  # decode side: KV on the way
        self.kv_held: dict[str, Request] = {}  # prefill side: finished, blocks kept for a decoder

    # ---- requests in and out ------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request. ValueError if its id is in use or the policy refuses its
        priority."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        validate_priority(request.priority, self.config.policy)
        self.requests[request.request_id] = request
        request.order = next(self._order)
        self.waiting.add(request)

    def remote_kv_ready(self, request_id: str, ok: bool) -> None:
        """The KV of a WAITING_FOR_REMOTE_KV request has arrived in its blocks (`ok`), or will
        not (then the prompt is computed here). Either way it goes back to the waiting queue,
        in its place there, never to fetch again."""
        request = self.waiting_for_kv.pop(request_id, None)
        if request is None:
            return
        request.remote_kv_fetched = True
        if request.is_finished:  # aborted meanwhile
            request.num_valid_kv_tokens = 0
            self._release(request)
            return
        if ok:
            if request.remote_kv is None:
                raise RuntimeError(f"request {request_id!r} fetched KV without transfer params")
            request.num_remote_kv_tokens = request.remote_kv.num_tokens
        else:
            self.block_manager.free(request_id, 0)
        request.status = RequestStatus.WAITING
        self.waiting.add(request)

    def free_held_kv(self, request_id: str) -> None:
        """A decoder has the KV of this finished prefill (or its lease expired): free it."""
        if self.kv_held.pop(request_id, None) is not None:
            self.block_manager.free(request_id)

    def abort_requests(self, request_ids: list[str]) -> None:
        """Finish these requests now. Blocks of a request with a step in flight are freed when that
        step finishes (the stages may still write them)."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            was_waiting_for_kv = request.status == RequestStatus.WAITING_FOR_REMOTE_KV
            request.status = RequestStatus.FINISHED_ABORTED
            if was_waiting_for_kv:
                continue  # its KV may still be written into its blocks: remote_kv_ready frees
            if request in self.waiting:
                self.waiting.remove(request)
                if request.needs_remote_kv:  # the connector gives up its transfer, then
                    self.waiting_for_kv[request_id] = request  # remote_kv_ready releases it
                    continue
            else:
                self.running.remove(request)
            if request.num_inflight_steps == 0:
                self._release(request)

    def drop_all(self) -> list[str]:
        """Abort every request and free all its blocks, in flight or not (the stages are gone).
        Returns the dropped request ids."""
        dropped = list(self.requests)
        for request in self.requests.values():
            request.status = RequestStatus.FINISHED_ABORTED
            self.block_manager.free(request.request_id)
        for request_id in self.kv_held:
            self.block_manager.free(request_id)
        self.requests.clear()
        self.waiting.clear()
        self.running.clear()
        self.waiting_for_kv.clear()
        self.kv_held.clear()
        return dropped

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self.waiting_for_kv)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- the KV connector's view (`engine_core.kv_connector.KVTransferView`) -------------------
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    def requests_awaiting_kv(self) -> list[Request]:
        return list(self.waiting_for_kv.values())

    def requests_holding_kv(self) -> list[Request]:
        return list(self.kv_held.values())

    def block_ids(self, request_id: str) -> list[int]:
        return self.block_manager.block_ids(request_id)

    # ---- schedule -----------------------------------------------------------------------------
    def schedule(self) -> StepBatch | None:
        """Pick the next microbatch, or None when nothing can be scheduled now."""
        cfg = self.config
        share = cfg.max_concurrent_batches
        active = min(cfg.max_num_seqs, len(self.running) + len(self.waiting))
        step = _Step(seq_cap=max(1, -(-active // share)),
                     token_budget=max(1, -(-cfg.max_num_batched_tokens // share)))
        self.seats = Counter(r.owner for r in self.running)
        self.seats.update(r.owner for r in self.waiting_for_kv.values())
        preemptions_before = self.num_preemptions
        if cfg.fair_share:  # owners below their fair share first, making room if need be
            self._admit_waiting(step, make_room=True)
        self._schedule_running(step)
        if self.num_preemptions == preemptions_before:  # blocks are short: admit no more
            self._admit_waiting(step, make_room=False)
        if self._to_propose:
            self._propose_with_blocks(step)
        return self._build_batch(step.scheduled) if step.scheduled else None

    def _propose_with_blocks(self, step: _Step) -> None:
        """Drafts from a proposer that writes KV (a draft model), for the requests of `step`
        that reserved room for them; a request that gets fewer drafts than it reserved computes
        fewer tokens (its spare blocks stay with it)."""
        assert self.proposer is not None
        pending, self._to_propose = self._to_propose, []
        pending = [(r, n) for r, n in pending if r.status == RequestStatus.RUNNING]
        if not pending:
            return
        drafts = self.proposer.propose([
            DraftRequest(r.request_id, r.all_token_ids, n, self.block_manager.block_ids(
                r.request_id)) for r, n in pending])
        reserved = {r.request_id: n for r, n in pending}
        for (request, max_drafts), got in zip(pending, drafts):
            request.draft_token_ids = _grammar_allowed(request, list(got[:max_drafts]))
        for index, (request, num_new, is_new) in enumerate(step.scheduled):
            if request.request_id in reserved:
                unused = reserved[request.request_id] - len(request.draft_token_ids)
                step.scheduled[index] = (request, num_new - unused, is_new)

    def _schedule_running(self, step: _Step) -> None:
        """Every running request's next tokens, in admission order, while the step has room;
        then drafts for the decode steps among them, from what is left (`_add_drafts`)."""
        decoding: list[int] = []  # indexes in step.scheduled of decode steps that may speculate
        for request in list(self.running):
            if not step.has_room():
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if request.request_id in step.request_ids:
                continue  # admitted by fair share in this step (its tokens count at build)
            if request.num_inflight_steps and not self.config.pipelined_chunked_prefill:
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, step.token_budget)
            if num_new <= 0:
                continue  # its step is in flight
            if not self._allocate_or_preempt(request, num_new):
                continue  # waits for blocks (or was itself preempted)
            request.draft_token_ids = []
            if num_new == 1 and self.speculative is not None:
                decoding.append(len(step.scheduled))
            step.add(request, num_new, is_new=False)  # the stages already hold it
        for index in decoding:
            self._add_drafts(step, index)

    def _add_drafts(self, step: _Step, index: int) -> None:
        """Drafts for the decode step `step.scheduled[index]`, from the token budget and the free
        blocks that every running request's own next tokens left: drafts never preempt anyone,
        nor take a block or a token from another running request. A proposer with
        `needs_blocks` gets the request's room reserved here and proposes once the step is
        picked (`_propose_with_blocks`)."""
        assert self.proposer is not None
        request, num_new, is_new = step.scheduled[index]
        max_drafts = self._max_drafts(request, step.token_budget)
        if not max_drafts:
            return
        drafts: list[int] = []
        if not self.proposer.needs_blocks:
            drafts = self.proposer.propose([DraftRequest(
                request.request_id, request.all_token_ids, max_drafts, [])])[0][:max_drafts]
            drafts = _grammar_allowed(request, drafts)
            max_drafts = len(drafts)
        if not max_drafts or self._allocate(request, num_new + max_drafts) is None:
            return  # no drafts, or no free blocks for them: go without
        request.draft_token_ids = drafts
        if not drafts:  # the proposer runs once the step is picked
            self._to_propose.append((request, max_drafts))
        step.scheduled[index] = (request, num_new + max_drafts, is_new)
        step.token_budget -= max_drafts

    def _max_drafts(self, request: Request, token_budget: int) -> int:
        """How many drafts the decode step of `request` (already scheduled, its one token
        counted) may verify (0: none): the adaptive rule of `spec_policy.py`, within the
        `token_budget` left and the request's limits."""
        spec = self.speculative
        if spec is None or len(self.running) >= spec.batch_size_limit:
            return 0
        room = min(token_budget,  # the step's tokens
                   request.max_tokens - request.num_output_tokens - 1,  # outputs after this one
                   self.config.max_model_len - request.num_tokens)  # positions
        if room < 1:
            return 0
        return min(room, request.draft_history.num_drafts(spec.num_speculative_tokens,
                                                          len(self.running)))

    def _admit_waiting(self, step: _Step, make_room: bool) -> None:
        """Admit waiting requests in the policy's order while the step has room; stop at the
        first that cannot get a seat or blocks (it keeps its place). With `make_room`, only
        requests whose owner holds less than its fair share, and each may preempt sequences
        of owners holding more than theirs."""
        while self.waiting and step.has_room():
            request = self.waiting.peek(self.seats)
            if request is None:
                raise RuntimeError("the waiting queue is not empty but has no request to peek")
            if request.num_inflight_steps:
                return  # a preempted request whose last step has not returned yet
            if make_room and self.seats[request.owner] >= self._fair_share():
                return
            while not self._admit(request, step):
                if not (make_room and self._preempt_over_share(request)):
                    return

    def _admit(self, request: Request, step: _Step) -> bool:
        """Move a waiting request to running, in this step, with blocks for its first tokens
        (prefix-cache hits counted as computed); or, on a decode instance, to fetch its KV.
        False if it has no seat or too few blocks."""
        if request.needs_remote_kv:  # a decode instance's: its KV is fetched first
            return self._start_remote_kv(request)
        if len(self.running) >= self.config.max_num_seqs:
            return False
        cached_blocks: list[int]
        if request.num_remote_kv_tokens:  # its blocks already hold a prefill's KV
            cached_blocks, num_cached = [], request.num_remote_kv_tokens
        else:
            cached_blocks, num_cached = self.block_manager.get_computed_blocks(
                request.all_token_ids)
        num_new = min(request.num_tokens - num_cached, step.token_budget)
        if self._allocate(request, num_new, num_cached, cached_blocks) is None:
            return False
        self.waiting.remove(request)
        self.running.append(request)
        self.seats[request.owner] += 1
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = request.num_cached_tokens = num_cached
        step.add(request, num_new, is_new=True)
        return True

    def _fair_share(self) -> int:
        """The seats each owner may hold while others wait: the seats in use (running and
        fetching KV) split evenly over the owners that hold or want one."""
        owners = {owner for owner, held in self.seats.items() if held} | self.waiting.owners
        return (len(self.running) + len(self.waiting_for_kv)) // max(1, len(owners))

    def _preempt_over_share(self, request: Request) -> bool:
        """Make room for `request`, whose owner holds less than its fair share: preempt the
        latest-admitted preemptible sequence of the owner holding the most seats beyond its
        share (never one more urgent than `request`). False if there is none."""
        fair = self._fair_share()
        victim = None
        for candidate in reversed(self.running):
            held = self.seats[candidate.owner]
            if (candidate.num_inflight_steps == 0 and candidate.owner != request.owner
                    and candidate.priority >= request.priority and held > fair
                    and (victim is None or held > self.seats[victim.owner])):
                victim = candidate
        if victim is None:
            return False
        self._preempt(victim)
        return True

    def _allocate(self, request: Request, num_new: int, num_computed: int | None = None,
                  cached_blocks: list[int] | tuple[int, ...] = ()) -> list[int] | None:
        return self.block_manager.allocate(
            request.request_id, request.all_token_ids, num_new,
            request.num_computed_tokens if num_computed is None else num_computed, cached_blocks)

    def _start_remote_kv(self, request: Request) -> bool:
        """Move a waiting request to `waiting_for_kv` with blocks for its whole prompt (the KV
        connector fetches into the first ones; the rest are its tail's, so it can run once the
        KV is there without waiting for more). False if it must wait: too few free blocks, or
        `max_num_seqs` requests are running or fetching. No token ids are given, so the blocks
        enter the prefix cache only when it is scheduled, with its KV written."""
        if len(self.running) + len(self.waiting_for_kv) >= self.config.max_num_seqs:
            return False
        if self.block_manager.allocate(request.request_id, [], request.num_tokens, 0) is None:
            return False
        self.waiting.remove(request)
        self.seats[request.owner] += 1
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.waiting_for_kv[request.request_id] = request
        return True

    def _allocate_or_preempt(self, request: Request, num_new: int) -> bool:
        """Allocate blocks for a running request's next tokens, preempting lower-priority
        requests while blocks are short. False if it must wait or was preempted itself."""
        while self._allocate(request, num_new) is None:
            victim = self._pick_victim()
            if victim is None:
                return False
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _pick_victim(self) -> Request | None:
        """The running request the policy ranks last (ties: the latest admitted) that can be
        preempted now: not in flight and not scheduled in this step (both count in
        num_inflight_steps). May be the requester itself."""
        victim, victim_key = None, None
        for index, candidate in enumerate(self.running):
            if candidate.num_inflight_steps == 0:
                key = (*self.waiting.rank(candidate, self.seats), index)
                if victim_key is None or key > victim_key:
                    victim, victim_key = candidate, key
        return victim

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.seats[request.owner] -= 1
        self.block_manager.free(request.request_id)
        self._finished_ids.append(request.request_id)
        request.status = RequestStatus.PREEMPTED
        self.num_preemptions += 1
        request.num_computed_tokens = request.num_remote_kv_tokens = 0
        request.num_synced_tokens = request.num_synced_blocks = 0
        if self.proposer is not None:
            self.proposer.drop(request.request_id)
        self.waiting.add(request)

    def _build_batch(self, scheduled: list[tuple[Request, int, bool]]) -> StepBatch:
        new_requests, cached_requests = [], []
        for request, num_new, is_new in scheduled:
            block_ids = self.block_manager.block_ids(request.request_id)
            bitmask = b""
            if request.grammar is not None and (request.num_computed_tokens + num_new
                                                >= request.num_tokens
                                                + len(request.draft_token_ids)):
                bitmask = request.grammar.bitmask_rows(request.draft_token_ids)  # it samples
            if is_new:
                new_requests.append(NewRequest(
                    request_id=request.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    output_token_ids=request.output_token_ids,
                    sampling_params=request.sampling_params,
                    stop_ids=request.stop_ids_for_min_tokens,
                    block_ids=list(block_ids),
                    num_computed_tokens=request.num_computed_tokens,
                    num_new_tokens=num_new,
                    token_bitmask=bitmask,
                ))
            else:
                cached_requests.append(CachedRequest(
                    request_id=request.request_id,
                    new_token_ids=request.all_token_ids[request.num_synced_tokens:],
                    new_block_ids=block_ids[request.num_synced_blocks:],
                    num_computed_tokens=request.num_computed_tokens,
                    num_new_tokens=num_new,
                    draft_token_ids=request.draft_token_ids,
                    token_bitmask=bitmask,
                ))
            prompt_end = min(request.num_prompt_tokens, request.num_computed_tokens + num_new)
            self.num_prompt_tokens_computed += max(0, prompt_end - request.num_computed_tokens)
            request.num_synced_tokens = request.num_tokens
            request.num_synced_blocks = len(block_ids)
            request.num_computed_tokens += num_new
        finished, self._finished_ids = self._finished_ids, []
        return StepBatch(next(self._step_ids), new_requests, cached_requests, finished)

    # ---- update -------------------------------------------------------------------------------
    def update(self, batch: StepBatch, output: StepOutput) -> list[EngineCoreOutput]:
        """Apply a finished step: append sampled tokens, finish requests, free their blocks."""
        step_start: dict[str, int] = {}  # request id -> its computed tokens before this step
        for item in itertools.chain[NewRequest | CachedRequest](
                batch.new_requests, batch.cached_requests):
            step_start[item.request_id] = item.num_computed_tokens
            request = self.requests.get(item.request_id)
            if request is not None:
                request.num_inflight_steps -= 1
        outputs = []
        for request_id, rows in output.rows_by_request():
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            drafts, request.draft_token_ids = request.draft_token_ids, []
            error = next((row.error for row in rows if row.error is not None), None)
            if error is not None:  # this request alone failed: finish it, go on
                request.status, request.error = RequestStatus.FINISHED_ERROR, error
                # A stage may have dropped it before writing this step's KV: keep that KV out
                # of the prefix cache.
                valid = step_start.get(request_id, 0)
                if request.num_valid_kv_tokens is not None:
                    valid = min(valid, request.num_valid_kv_tokens)
                request.num_valid_kv_tokens = valid
                self.running.remove(request)
                outputs.append(EngineCoreOutput(request_id, [], finish_reason="error",
                                                error=error))
                continue
            if drafts:  # the KV of the rejected drafts is recomputed over
                num_accepted = len(rows) - 1
                request.num_computed_tokens -= len(drafts) - num_accepted
                request.draft_history.record(len(drafts), num_accepted)
                self._count_verification(len(drafts), num_accepted)
            new_token_ids: list[int] = []
            logprobs: list[TokenLogprobs] = []
            for row in rows:
                request.append_token(row.token_id)
                if request.error is not None:
                    break  # a token its grammar forbids: not kept
                new_token_ids.append(row.token_id)
                if row.logprobs is not None:
                    logprobs.append(row.logprobs)
                if request.is_finished:
                    break  # a stop token or max_tokens: what follows is dropped
            outputs.append(EngineCoreOutput(
                request_id=request_id,
                new_token_ids=new_token_ids,
                new_logprobs=logprobs or None,
                finish_reason=request.status.finish_reason,
                stop_reason=request.stop_reason,
                num_cached_tokens=request.num_cached_tokens,
                error=request.error,
            ))
            if request.is_finished:
                self.running.remove(request)
        for item in itertools.chain[NewRequest | CachedRequest](
                batch.new_requests, batch.cached_requests):
            request = self.requests.get(item.request_id)
            if request is not None and request.is_finished and request.num_inflight_steps == 0:
                self._release(request)
        return outputs

    def _count_verification(self, num_drafts: int, num_accepted: int) -> None:
        stats = self.spec_stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_drafts
        stats.num_accepted_tokens += num_accepted

    def cancel_step(self, batch: StepBatch) -> list[EngineCoreOutput]:
        """Undo a scheduled batch that never ran (its submission was interrupted): each of its
        requests is aborted, and its blocks go back to the pool once no other step of it is in
        flight, without leaving the never-written KV in the prefix cache. Returns the abort
        outputs."""
        self._finished_ids.extend(batch.finished_request_ids)  # the stages never saw them
        outputs = []
        for item in itertools.chain[NewRequest | CachedRequest](
                batch.new_requests, batch.cached_requests):
            request = self.requests.get(item.request_id)
            if request is None:
                continue
            request.num_inflight_steps -= 1
            valid = item.num_computed_tokens  # this step would have written the KV after it
            if request.num_valid_kv_tokens is not None:
                valid = min(valid, request.num_valid_kv_tokens)
            request.num_valid_kv_tokens = valid
            if not request.is_finished:
                self.abort_requests([request.request_id])
                outputs.append(EngineCoreOutput(request.request_id, [], finish_reason="abort"))
            elif request.num_inflight_steps == 0:
                self._release(request)
        return outputs

    def _release(self, request: Request) -> None:
        if request.do_remote_decode and request.status in (RequestStatus.FINISHED_STOPPED,
                                                           RequestStatus.FINISHED_LENGTH):
            self.kv_held[request.request_id] = request  # blocks kept until free_held_kv
        else:
            self.block_manager.free(request.request_id, request.num_valid_kv_tokens)
        if self.proposer is not None:
            self.proposer.drop(request.request_id)
        self._finished_ids.append(request.request_id)
        del self.requests[request.request_id]


def _grammar_allowed(request: Request, drafts: list[int]) -> list[int]:
    """The leading drafts the request's grammar allows (all of them without one)."""
    if request.grammar is None or not drafts:
        return drafts
    return drafts[:request.grammar.valid_prefix(drafts)]
