"""The scheduler with speculative decoding (n-gram drafts), pure Python, no model: which decode
steps get drafts and how many, the roll back of the computed tokens to the accepted ones, the
stats, and that drafts never preempt, delay another request or leave a rejected token's KV in
the prefix cache."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from engine_core.block_manager import KVBlockManager, hash_block_tokens
from engine_core.config import SchedulerConfig
from engine_core.messages import EngineCoreRequest, SampledToken, StepBatch, StepOutput
from engine_core.ngram_proposer import NgramProposer
from engine_core.request import Request, RequestStatus
from engine_core.sampling_params import SamplingParams
from engine_core.scheduler import Scheduler
from engine_core.speculative_config import SpeculativeConfig

BLOCK = 4
PERIODIC = [1, 2, 3, 1, 2, 3, 1]  # its next decode step after token 2 proposes 3, 1, 2


def make_scheduler(num_blocks=1000, budget=512, max_len=256, k=3, concurrent=1,
                   disable_by_batch_size=None) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget, max_model_len=max_len,
                             max_concurrent_batches=concurrent)
    spec = SpeculativeConfig("ngram", k, prompt_lookup_max=3, prompt_lookup_min=1,
                             disable_by_batch_size=disable_by_batch_size)
    return Scheduler(config, KVBlockManager(num_blocks, BLOCK), spec, NgramProposer(1, 3))


def add(scheduler: Scheduler, request_id: str, prompt: Sequence[int], max_tokens=16,
        **params) -> Request:
    core = EngineCoreRequest(request_id, list(prompt),
                             SamplingParams(max_tokens=max_tokens, **params), [])
    scheduler.add_request(Request(core, scheduler.config.max_model_len))
    return scheduler.requests[request_id]


def steps(batch: StepBatch) -> dict[str, tuple[int, list[int]]]:
    """request id -> (tokens computed, drafts) of each request in the batch."""
    return {r.request_id: (r.num_new_tokens, list(getattr(r, "draft_token_ids", [])))
            for r in itertools.chain(batch.new_requests, batch.cached_requests)}


def complete(scheduler: Scheduler, batch: StepBatch, rows: dict[str, list[int]]):
    """Apply the batch with the given rows per request (accepted drafts, then the target's)."""
    ids = [rid for rid, tokens in rows.items() for _ in tokens]
    tokens = [SampledToken(t) for ts in rows.values() for t in ts]
    return scheduler.update(batch, StepOutput(batch.step_id, ids, tokens))


def prefill(scheduler: Scheduler, first_tokens: dict[str, int]) -> None:
    """Run the prompts to their first token (one step each chunk)."""
    while any(scheduler.requests[r].num_output_tokens == 0 for r in first_tokens):
        batch = scheduler.schedule()
        assert batch is not None
        done = {rid: [token] for rid, token in first_tokens.items()
                if rid in steps(batch) and scheduler.requests[rid].num_computed_tokens
                == scheduler.requests[rid].num_tokens}
        complete(scheduler, batch, done)


def real_block_hashes(token_lists: Iterable[Sequence[int]], block_size: int) -> set[bytes]:
    """The chained hashes of every full block of these token sequences."""
    hashes = set()
    for tokens in token_lists:
        parent = b""
        for start in range(0, len(tokens) - block_size + 1, block_size):
            parent = hash_block_tokens(parent, tokens[start:start + block_size])
            hashes.add(parent)
    return hashes


def assert_cache_holds_real_tokens(block_manager: KVBlockManager,
                                   token_lists: Iterable[Sequence[int]]) -> None:
    """Every hash in the prefix cache is that of a block of real tokens of some request (never
    of a draft), and names the block that carries it."""
    cached = block_manager._cached
    assert set(cached) <= real_block_hashes(token_lists, block_manager.block_size)
    for block_hash, block_id in cached.items():
        assert block_manager._blocks[block_id].block_hash == block_hash


def test_a_decode_step_verifies_drafts_and_rolls_back_to_the_accepted_ones() -> None:
    s = make_scheduler()
    a = add(s, "a", PERIODIC)
    prefill(s, {"a": 2})
    batch = s.schedule()
    assert steps(batch) == {"a": (4, [3, 1, 2])}  # its last token and three drafts
    assert batch.cached_requests[0].num_computed_tokens == 7
    assert a.num_computed_tokens == 11  # all counted while in flight
    outs = complete(s, batch, {"a": [3, 9]})  # the first draft accepted, then the target's 9
    assert [o.new_token_ids for o in outs] == [[3, 9]]
    assert a.all_token_ids == [*PERIODIC, 2, 3, 9]
    assert a.num_computed_tokens == a.num_tokens - 1 == 9  # the rejected drafts' KV is redone
    stats = s.spec_stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (1, 3, 1)
    batch = s.schedule()
    assert batch.cached_requests[0].new_token_ids == [3, 9]
    assert batch.cached_requests[0].num_computed_tokens == 9


def test_all_drafts_accepted_and_all_rejected() -> None:
    s = make_scheduler()
    a = add(s, "a", PERIODIC)
    prefill(s, {"a": 2})
    complete(s, s.schedule(), {"a": [3, 1, 2, 3]})  # all three and the one after
    assert a.output_token_ids == [2, 3, 1, 2, 3] and a.num_computed_tokens == a.num_tokens - 1
    batch = s.schedule()
    num_new, drafts = steps(batch)["a"]
    assert num_new == 1 + len(drafts) and drafts  # acceptance rose: it asks for as many or more
    complete(s, batch, {"a": [5]})  # the first draft rejected
    assert a.output_token_ids == [2, 3, 1, 2, 3, 5] and a.num_computed_tokens == a.num_tokens - 1
    stats = s.spec_stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == \
        (2, 3 + len(drafts), 3)


def test_a_stop_token_among_accepted_drafts_ends_the_request_there() -> None:
    s = make_scheduler()
    add(s, "a", PERIODIC, stop_token_ids=[1])
    prefill(s, {"a": 2})
    outs = complete(s, s.schedule(), {"a": [3, 1, 2, 3]})
    assert [(o.new_token_ids, o.finish_reason, o.stop_reason) for o in outs] == \
        [([3, 1], "stop", 1)]
    assert "a" not in s.requests and s.block_manager.num_free_blocks == 999


def test_min_tokens_lets_a_stop_token_among_the_drafts_pass() -> None:
    s = make_scheduler()
    add(s, "a", PERIODIC, stop_token_ids=[1], min_tokens=3)
    prefill(s, {"a": 2})
    outs = complete(s, s.schedule(), {"a": [3, 1, 2, 3]})  # token 1 is the 3rd output
    assert [(o.new_token_ids, o.finish_reason) for o in outs] == [([3, 1], "stop")]
    s = make_scheduler()
    add(s, "b", PERIODIC, stop_token_ids=[1], min_tokens=4)
    prefill(s, {"b": 2})
    outs = complete(s, s.schedule(), {"b": [3, 1, 2, 1]})  # the 3rd is masked, the 5th stops
    assert [(o.new_token_ids, o.finish_reason) for o in outs] == [([3, 1, 2, 1], "stop")]


def test_max_tokens_bounds_the_drafts() -> None:
    s = make_scheduler()
    add(s, "a", PERIODIC, max_tokens=3)
    prefill(s, {"a": 2})
    batch = s.schedule()
    assert steps(batch) == {"a": (2, [3])}  # outputs 2 and 3 of 3 come from this step at most
    outs = complete(s, batch, {"a": [3, 1]})
    assert [(o.new_token_ids, o.finish_reason) for o in outs] == [([3, 1], "length")]
    # max_model_len caps max_tokens (the last output needs no KV): the same bound
    s = make_scheduler(max_len=10)
    add(s, "b", PERIODIC)
    prefill(s, {"b": 2})
    assert steps(s.schedule()) == {"b": (2, [3])}


def test_a_prompts_last_token_may_verify_drafts_from_the_prompt() -> None:
    s = make_scheduler(budget=6)
    a = add(s, "a", PERIODIC)
    batch = s.schedule()
    assert steps(batch) == {"a": (6, [])}  # a chunk short of the end: no drafts
    complete(s, batch, {})
    batch = s.schedule()
    assert steps(batch) == {"a": (4, [2, 3, 1])}  # the last prompt token, then drafts
    complete(s, batch, {"a": [2, 3, 1, 2]})
    assert a.output_token_ids == [2, 3, 1, 2] and a.num_computed_tokens == a.num_tokens - 1


def test_prefill_chunks_get_no_drafts_and_the_budget_serves_running_requests_first() -> None:
    s = make_scheduler(budget=8)
    add(s, "a", PERIODIC)
    prefill(s, {"a": 2})
    add(s, "b", [7] * 12)
    batch = s.schedule()  # b is admitted after the running a: a's drafts come first
    assert steps(batch) == {"a": (4, [3, 1, 2]), "b": (4, [])}
    complete(s, batch, {"a": [3, 1, 2, 3]})  # a proposes again (its text still repeats)
    batch = s.schedule()
    # both running: b's chunk takes what it needs first (7 of 8), a's drafts get no room
    assert steps(batch) == {"a": (1, []), "b": (7, [])}


def test_drafts_never_preempt_their_request_or_another() -> None:
    # 5 usable blocks of 4: a and b hold 2 each after their prompts, one is free
    s = make_scheduler(num_blocks=6)
    add(s, "a", PERIODIC)
    add(s, "b", [5, 6, 7, 8, 9, 10, 11, 12])
    prefill(s, {"a": 2, "b": 13})
    assert s.block_manager.num_free_blocks == 1
    # a's drafts (positions 8-10) would take the block b's next token needs: no drafts
    batch = s.schedule()
    assert steps(batch) == {"a": (1, []), "b": (1, [])} and s.num_preemptions == 0
    complete(s, batch, {"a": [3], "b": [14]})
    s = make_scheduler(num_blocks=3)  # 2 usable blocks: a holds both after its prompt
    a = add(s, "a", PERIODIC)
    prefill(s, {"a": 2})
    assert s.block_manager.num_free_blocks == 0
    batch = s.schedule()
    assert steps(batch) == {"a": (1, [])} and s.num_preemptions == 0
    assert a.status == RequestStatus.RUNNING


def test_no_drafts_at_or_above_disable_by_batch_size() -> None:
    s = make_scheduler(disable_by_batch_size=2)
    add(s, "a", PERIODIC)
    add(s, "b", PERIODIC)
    prefill(s, {"a": 2, "b": 2})
    assert steps(s.schedule()) == {"a": (1, []), "b": (1, [])}
    s = make_scheduler(disable_by_batch_size=2)
    add(s, "a", PERIODIC)
    prefill(s, {"a": 2})
    assert steps(s.schedule()) == {"a": (4, [3, 1, 2])}


def test_a_request_whose_drafts_keep_failing_pauses() -> None:
    s = make_scheduler()
    a = add(s, "a", [1, 2] * 4, max_tokens=40)
    prefill(s, {"a": 1})
    drafted = []
    for _ in range(8):
        batch = s.schedule()
        drafts = steps(batch)["a"][1]
        drafted.append(len(drafts))
        # the target disagrees with the first draft (both tokens occurred: drafts never stop)
        complete(s, batch, {"a": [3 - drafts[0] if drafts else 1]})
    # three rejections pause it one step, the probe is rejected, two more pause it two steps
    assert [n > 0 for n in drafted] == [True, True, True, False, True, True, True, False]
    assert drafted[:3] == [3, 3, 3]  # a batch of one asks for all k (spec_policy.SMALL_BATCH)
    assert a.num_computed_tokens == a.num_tokens - 1
    assert s.spec_stats.num_accepted_tokens == 0 and s.spec_stats.num_drafts == 6


def test_a_request_with_drafts_in_flight_is_not_scheduled_again() -> None:
    s = make_scheduler(concurrent=2)
    add(s, "a", PERIODIC)
    prefill(s, {"a": 2})
    first = s.schedule()
    assert steps(first) == {"a": (4, [3, 1, 2])}
    assert s.schedule() is None  # its step verifies the drafts: nothing left to compute
    complete(s, first, {"a": [3, 1, 7]})
    assert steps(s.schedule())["a"][0] >= 1


def test_the_prefix_cache_never_holds_a_rejected_draft() -> None:
    s = make_scheduler()
    requests = [add(s, "a", PERIODIC, max_tokens=12), add(s, "b", [2, 2, 2, 5], max_tokens=12)]
    prefill(s, {"a": 2, "b": 2})
    rejections = itertools.cycle([0, 1, 0, 2])
    while s.has_unfinished_requests():
        batch = s.schedule()
        rows = {}
        for rid, (_, drafts) in steps(batch).items():
            accepted = drafts[:next(rejections)]
            rows[rid] = [*accepted, 40 + len(s.requests[rid].all_token_ids) % 7]
        complete(s, batch, rows)
        assert_cache_holds_real_tokens(s.block_manager, [r.all_token_ids for r in requests])
    assert s.spec_stats.num_draft_tokens > s.spec_stats.num_accepted_tokens > 0
    assert s.block_manager.num_free_blocks == 999
    assert s.block_manager._cached  # the requests' full blocks stay cached, by real tokens
