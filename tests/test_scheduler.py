"""Scheduler unit tests: pure Python, no model."""

from __future__ import annotations

import itertools

import pytest

from engine_core.block_manager import KVBlockManager
from engine_core.config import SchedulerConfig
from engine_core.messages import EngineCoreRequest, SampledToken, StepBatch, StepOutput
from engine_core.request import Request, RequestStatus
from engine_core.sampling_params import SamplingParams
from engine_core.scheduler import Scheduler
from engine_core.transfer_params import KVTransferParams

BLOCK = 4


def make_scheduler(
    num_blocks=1000, max_num_seqs=256, budget=512, max_len=256, concurrent=1, pipelined=False
):
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_len,
        max_concurrent_batches=concurrent,
        pipelined_chunked_prefill=pipelined,
    )
    return Scheduler(config, KVBlockManager(num_blocks, BLOCK, enable_prefix_caching=True))


_ids = itertools.count()


def add(scheduler, prompt_len, max_tokens=8, first_token=1, **params):
    rid = f"r{next(_ids)}"
    prompt = [first_token + i for i in range(prompt_len)]
    core = EngineCoreRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, **params), [0])
    scheduler.add_request(Request(core, scheduler.config.max_model_len))
    return rid


def scheduled(batch: StepBatch) -> dict[str, int]:
    return {
        r.request_id: r.num_new_tokens
        for r in itertools.chain(batch.new_requests, batch.cached_requests)
    }


def finish(scheduler, batch: StepBatch, token=7):
    """Complete the batch as a last stage would: one token for each request at its end."""
    ids = []
    for r in itertools.chain(batch.new_requests, batch.cached_requests):
        req = scheduler.requests.get(r.request_id)
        if req is not None and req.num_computed_tokens == req.num_tokens:
            ids.append(r.request_id)
    return scheduler.update(
        batch, StepOutput(batch.step_id, ids, [SampledToken(token) for _ in ids])
    )


def test_token_budget_and_chunked_prefill():
    s = make_scheduler(budget=10)
    a = add(s, 25)
    b1 = s.schedule()
    assert scheduled(b1) == {a: 10}
    assert finish(s, b1) == []  # mid-prompt chunk: nothing sampled
    b2 = s.schedule()
    assert scheduled(b2) == {a: 10} and b2.cached_requests[0].num_computed_tokens == 10
    finish(s, b2)
    b3 = s.schedule()
    assert scheduled(b3) == {a: 5}
    outs = finish(s, b3)
    assert [o.new_token_ids for o in outs] == [[7]]
    b4 = s.schedule()
    assert scheduled(b4) == {a: 1}
    assert b4.cached_requests[0].new_token_ids == [7]  # incremental: only the new token


def test_max_num_seqs():
    s = make_scheduler(max_num_seqs=3)
    for _ in range(5):
        add(s, 4)
    batch = s.schedule()
    assert len(scheduled(batch)) == 3
    assert s.num_waiting == 2


def test_in_flight_requests_are_skipped():
    s = make_scheduler(concurrent=2)
    rids = [add(s, 4) for _ in range(4)]
    b1 = s.schedule()
    b2 = s.schedule()
    assert b2 is not None
    assert not set(scheduled(b1)) & set(scheduled(b2))
    assert set(scheduled(b1)) | set(scheduled(b2)) == set(rids)
    assert s.schedule() is None  # everything is in flight
    finish(s, b1)
    b3 = s.schedule()
    assert set(scheduled(b3)) == set(scheduled(b1))


def test_balance_with_two_batches_in_flight():
    s = make_scheduler(concurrent=2, budget=4096, num_blocks=4000)
    rids = [add(s, 8, max_tokens=100) for _ in range(64)]
    b1, b2 = s.schedule(), s.schedule()
    finish(s, b1)
    finish(s, b2)
    for _ in range(6):  # steady-state decode, two microbatches alternating
        batch = s.schedule()
        assert batch is not None
        assert len(scheduled(batch)) <= 32
        finish(s, batch)
    assert all(s.requests[r].status == RequestStatus.RUNNING for r in rids)
    assert len(scheduled(b1)) == len(scheduled(b2)) == 32


def test_preemption_frees_and_requeues_latest():
    # 9 usable blocks of 4 tokens; two 12-token prompts take 3 blocks each
    s = make_scheduler(num_blocks=10, max_len=40)
    a = add(s, 12, max_tokens=30, first_token=1)
    b = add(s, 12, max_tokens=30, first_token=100)
    finish(s, s.schedule())
    preempted = False
    for _ in range(30):
        batch = s.schedule()
        if batch is None:
            break
        finish(s, batch)
        if s.num_preemptions:
            preempted = True
            break
    assert preempted
    req_b = s.requests[b]
    assert req_b.status == RequestStatus.PREEMPTED and req_b.num_computed_tokens == 0
    assert s.waiting.peek(s.seats) is req_b
    assert s.requests[a].status == RequestStatus.RUNNING
    assert s.block_manager.block_ids(b) == []


def test_abort_frees_blocks_and_defers_when_in_flight():
    s = make_scheduler()
    a, b = add(s, 6), add(s, 6)
    batch = s.schedule()
    free_before = s.block_manager.num_free_blocks
    s.abort_requests([a, b])
    assert s.block_manager.num_free_blocks == free_before  # steps in flight keep their blocks
    assert finish(s, batch) == []
    assert s.block_manager.num_free_blocks == s.block_manager.num_usable_blocks
    assert not s.has_unfinished_requests()
    c = add(s, 3)
    s.abort_requests([c])  # waiting: freed at once
    assert not s.has_unfinished_requests()


def test_stop_conditions():
    s = make_scheduler()
    eos = add(s, 3, max_tokens=10)
    stop = add(s, 3, max_tokens=10, stop_token_ids=[9], ignore_eos=True)
    batch = s.schedule()
    outs = {o.request_id: o for o in finish(s, batch, token=0)}  # 0 is EOS
    assert outs[eos].finish_reason == "stop"
    assert outs[stop].finish_reason is None
    outs = {o.request_id: o for o in finish(s, s.schedule(), token=9)}
    assert outs[stop].finish_reason == "stop" and outs[stop].stop_reason == 9


def test_min_tokens_and_ignore_eos_and_length():
    s = make_scheduler()
    rid = add(s, 3, max_tokens=3, min_tokens=2)
    reasons = [finish(s, s.schedule(), token=0)[0].finish_reason for _ in range(2)]
    assert reasons == [None, "stop"]
    rid = add(s, 3, max_tokens=3, ignore_eos=True)
    reasons = [finish(s, s.schedule(), token=0)[0].finish_reason for _ in range(3)]
    assert reasons == [None, None, "length"]
    assert rid not in s.requests


def test_max_model_len_caps_generation():
    s = make_scheduler(max_len=10)
    add(s, 8, max_tokens=100)
    reasons = [finish(s, s.schedule())[0].finish_reason for _ in range(2)]
    assert reasons == [None, "length"]


def test_prefix_cache_hit_skips_computed_tokens():
    s = make_scheduler()
    a = add(s, 9, first_token=5)
    finish(s, s.schedule())
    b = add(s, 9, first_token=5)
    batch = s.schedule()
    new = {r.request_id: r for r in batch.new_requests}
    assert new[b].num_computed_tokens == 8 and new[b].num_new_tokens == 1
    assert scheduled(batch)[a] == 1


def test_pipelined_chunked_prefill_schedules_next_chunk_in_flight():
    s = make_scheduler(concurrent=2, budget=20, pipelined=True)
    a = add(s, 30)
    b1 = s.schedule()
    b2 = s.schedule()
    assert scheduled(b1) == {a: 10} and scheduled(b2) == {a: 10}
    s2 = make_scheduler(concurrent=2, budget=20, pipelined=False)
    a2 = add(s2, 30)
    assert scheduled(s2.schedule()) == {a2: 10}
    assert s2.schedule() is None


def add_remote(scheduler, prompt_len, num_kv_tokens, max_tokens=4, first_token=1):
    """A decode instance's request whose first `num_kv_tokens` tokens' KV a prefill made."""
    rid = f"r{next(_ids)}"
    prompt = [first_token + i for i in range(prompt_len)]
    params = KVTransferParams(kv_endpoint="tcp://127.0.0.1:1",
                              block_ids=list(range(num_kv_tokens // BLOCK)),
                              num_tokens=num_kv_tokens, compat_hash="h", lease_id=rid,
                              send_type="GET")
    core = EngineCoreRequest(rid, prompt, SamplingParams(max_tokens=max_tokens), [0],
                             kv_transfer_params=params)
    scheduler.add_request(Request(core, scheduler.config.max_model_len))
    return rid


def test_remote_kv_request_waits_at_the_head_for_blocks_and_fetches_once():
    s = make_scheduler(num_blocks=10, max_len=36)  # 9 usable blocks of 4 tokens
    a = add(s, 24, max_tokens=2)  # 6 blocks, then a 7th for its decode step
    finish(s, s.schedule())
    r = add_remote(s, 17, 16, first_token=100)  # needs 5 blocks for its prompt: 3 free
    c = add(s, 3, first_token=200)
    batch = s.schedule()
    assert scheduled(batch) == {a: 1}  # neither r nor c behind it (FCFS) got in
    assert s.waiting.peek(s.seats).request_id == r and not s.waiting_for_kv
    assert s.requests[r].status == RequestStatus.WAITING
    assert finish(s, batch)[0].finish_reason == "length"  # a is done: its blocks free
    batch = s.schedule()
    assert scheduled(batch) == {c: 3}  # r moved on to fetch its KV, c went on
    assert list(s.waiting_for_kv) == [r]
    assert s.requests[r].status == RequestStatus.WAITING_FOR_REMOTE_KV
    assert len(s.block_manager.block_ids(r)) == 5  # its whole prompt, tail included
    prompt_r = list(range(100, 117))
    assert s.block_manager.get_computed_blocks(prompt_r) == ([], 0)  # no KV yet: not cached
    finish(s, batch)
    s.remote_kv_ready(r, ok=False)  # the fetch failed: blocks freed, back at the head
    assert s.waiting.peek(s.seats).request_id == r and s.block_manager.block_ids(r) == []
    batch = s.schedule()
    new = {n.request_id: n for n in batch.new_requests}
    assert new[r].num_computed_tokens == 0 and new[r].num_new_tokens == 17  # computed here
    assert not s.waiting_for_kv
    finish(s, batch)
    s._preempt(s.requests[r])  # after a preemption it recomputes, never fetches again
    while s.has_unfinished_requests():
        batch = s.schedule()
        assert not s.waiting_for_kv
        finish(s, batch)
    assert s.block_manager.num_free_blocks == s.block_manager.num_usable_blocks


def test_remote_kv_ready_counts_the_fetched_tokens_and_abort_before_fetch_releases():
    s = make_scheduler(num_blocks=20)
    r = add_remote(s, 17, 16)
    assert s.schedule() is None and list(s.waiting_for_kv) == [r]
    s.remote_kv_ready(r, ok=True)
    batch = s.schedule()
    new = {n.request_id: n for n in batch.new_requests}
    assert new[r].num_computed_tokens == 16 and new[r].num_new_tokens == 1
    assert s.num_prompt_tokens_computed == 1
    finish(s, batch)
    # aborted while waiting for blocks: parked for the connector to give its transfer up
    a = add(s, 60, max_tokens=30)
    b = add_remote(s, 17, 16)
    s.abort_requests([b])
    assert s.waiting_for_kv[b].is_finished and b not in [q.request_id for q in s.waiting]
    s.remote_kv_ready(b, ok=False)
    assert b not in s.requests and not s.waiting_for_kv
    s.abort_requests([a, r])
    while s.has_unfinished_requests():
        finish(s, s.schedule())
    assert s.block_manager.num_free_blocks == s.block_manager.num_usable_blocks


# ---- fair share and priority ------------------------------------------------------------------
def make_fair(fair_share=True, policy="fcfs", num_blocks=4000, max_num_seqs=16, budget=512,
              max_len=256, concurrent=1, pipelined=False):
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             max_model_len=max_len, max_concurrent_batches=concurrent,
                             policy=policy, fair_share=fair_share,
                             pipelined_chunked_prefill=pipelined)
    return Scheduler(config, KVBlockManager(num_blocks, BLOCK, enable_prefix_caching=True))


def add_owned(scheduler, owner, prompt_len=8, max_tokens=8, first_token=1, priority=0,
              arrival=0.0):
    """One sequence of the user request `owner`."""
    rid = f"{owner}-{next(_ids)}"
    prompt = [first_token + i for i in range(prompt_len)]
    core = EngineCoreRequest(rid, prompt, SamplingParams(max_tokens=max_tokens), [0],
                             arrival_time=arrival, owner_id=owner, priority=priority)
    scheduler.add_request(Request(core, scheduler.config.max_model_len))
    return rid


def add_giant(scheduler, owner="giant", prompts=64, n=16, max_tokens=256):
    """64 prompts x n=16 sequences of one user request (distinct prompts, shared by n)."""
    return [add_owned(scheduler, owner, max_tokens=max_tokens, first_token=10 + 8 * p)
            for p in range(prompts) for _ in range(n)]


def run_round(scheduler):
    batch = scheduler.schedule()
    outputs = finish(scheduler, batch) if batch is not None else []
    return batch, outputs


def owners_of(batch) -> list[str]:
    return [r.request_id.rsplit("-", 1)[0] for r in batch.new_requests]


def drain(scheduler, max_rounds=10_000):
    for _ in range(max_rounds):
        if not scheduler.has_unfinished_requests():
            return
        assert run_round(scheduler)[0] is not None
    raise AssertionError("the scheduler did not drain")


def assert_all_blocks_free(scheduler):
    assert not scheduler.has_unfinished_requests()
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_usable_blocks


@pytest.mark.parametrize("fair_share", [True, False])
def test_small_request_behind_a_giant_gets_its_first_token_within_two_rounds(fair_share):
    s = make_fair(fair_share, max_num_seqs=32)
    giant = add_giant(s)  # 1,024 sequences x 256 tokens
    for _ in range(3):
        run_round(s)
    assert s.num_running == 32 and s.seats["giant"] == 32
    small = add_owned(s, "small", max_tokens=8)
    first_token_round = None
    for round_no in range(1, 21):
        _, outputs = run_round(s)
        if any(o.request_id == small for o in outputs):
            first_token_round = round_no
            break
    if fair_share:
        assert first_token_round == 1  # admitted at once, a giant sequence preempted for it
        assert s.num_preemptions == 1
    else:  # FCFS: behind all 1,024 sequences of the giant
        assert first_token_round is None and s.num_preemptions == 0
    s.abort_requests([*giant, small])
    assert_all_blocks_free(s)


def test_admission_round_robins_across_user_requests_not_sequences():
    s = make_fair(max_num_seqs=6)
    for owner, count in (("a", 6), ("b", 6), ("c", 2)):
        for _ in range(count):
            add_owned(s, owner, first_token=1 + ord(owner))
    assert owners_of(s.schedule()) == ["a", "b", "c", "a", "b", "c"]
    fcfs = make_fair(fair_share=False, max_num_seqs=6)
    for owner, count in (("a", 6), ("b", 6), ("c", 2)):
        for _ in range(count):
            add_owned(fcfs, owner, first_token=1 + ord(owner))
    assert owners_of(fcfs.schedule()) == ["a"] * 6


def test_over_share_owner_is_preempted_newest_first_and_gets_its_seats_back():
    s = make_fair(max_num_seqs=8)
    giant = [add_owned(s, "giant", max_tokens=12, first_token=1 + i) for i in range(12)]
    run_round(s)
    admitted = [r.request_id for r in s.running]
    assert admitted == giant[:8]
    small = [add_owned(s, "small", max_tokens=3, first_token=100 + i) for i in range(3)]
    batch, _ = run_round(s)
    assert set(small) <= set(scheduled(batch))  # all three in one step: 3 < fair share 4
    assert s.seats == {"giant": 5, "small": 3}
    preempted = [rid for rid in admitted if s.requests[rid].status == RequestStatus.WAITING
                 or s.requests[rid].status == RequestStatus.PREEMPTED]
    assert preempted == admitted[-3:]  # the latest admitted gave way
    max_giant_seats = 0
    while s.has_unfinished_requests():
        run_round(s)
        if not any(rid in s.requests for rid in small):  # the small one is done
            max_giant_seats = max(max_giant_seats, s.num_running)
    assert max_giant_seats == 8  # the giant alone takes every seat again
    assert s.num_preemptions == 3  # and nothing was preempted back and forth
    assert_all_blocks_free(s)


def test_a_request_admitted_by_fair_share_is_scheduled_once_in_its_step():
    """With pipelined chunked prefill (the engine's default) the running pass may schedule a
    request with a step in flight: it must skip the one fair share just admitted, whose
    computed tokens only advance when the batch is built (else its prompt ran twice in one
    batch and the engine stalled with more computed tokens than it has)."""
    s = make_fair(max_num_seqs=16, pipelined=True, concurrent=2)
    for i in range(4):
        add_owned(s, "giant", max_tokens=6, first_token=1 + i)
    first = s.schedule()  # the giant's prompts, still in flight
    small = add_owned(s, "small", max_tokens=3, first_token=100)
    second = s.schedule()  # fair share admits the small one; the running giants wait
    ids = [r.request_id for r in (*second.new_requests, *second.cached_requests)]
    assert small in ids and len(ids) == len(set(ids)), ids
    finish(s, first)
    finish(s, second)
    for request in s.requests.values():
        assert request.num_computed_tokens <= request.num_tokens
    drain(s)
    assert_all_blocks_free(s)


def test_fair_share_preempts_for_blocks_when_seats_are_free():
    # 40 usable blocks of 4 tokens: 4 giant sequences of 36 tokens take 36, 12 seats stay free
    s = make_fair(num_blocks=41, max_num_seqs=16, max_len=64)
    giant = [add_owned(s, "giant", prompt_len=36, max_tokens=20, first_token=1 + 50 * i)
             for i in range(6)]
    run_round(s)
    assert s.num_running == 4 and s.block_manager.num_free_blocks == 4
    small = add_owned(s, "small", prompt_len=24, max_tokens=4, first_token=400)  # 6 blocks
    batch, _ = run_round(s)
    assert small in scheduled(batch) and s.seats["small"] == 1
    assert s.num_preemptions >= 1
    s.abort_requests(giant)
    drain(s)
    assert_all_blocks_free(s)


def test_a_lone_giant_uses_every_slot_and_is_never_preempted():
    s = make_fair(max_num_seqs=16)
    add_giant(s, prompts=4, n=10, max_tokens=6)
    rounds = 0
    while s.has_unfinished_requests():
        batch, _ = run_round(s)
        rounds += 1
        if s.num_waiting:
            assert len(scheduled(batch)) == 16
    assert s.num_preemptions == 0
    assert_all_blocks_free(s)
    fcfs = make_fair(fair_share=False, max_num_seqs=16)
    add_giant(fcfs, prompts=4, n=10, max_tokens=6)
    fcfs_rounds = 0
    while fcfs.has_unfinished_requests():
        run_round(fcfs)
        fcfs_rounds += 1
    assert rounds == fcfs_rounds  # the same schedule as plain FCFS


def test_two_giants_split_the_seats_without_churn():
    s = make_fair(max_num_seqs=16)
    a = add_giant(s, owner="a", prompts=2, n=16, max_tokens=40)
    for _ in range(2):
        run_round(s)
    b = add_giant(s, owner="b", prompts=2, n=16, max_tokens=40)
    for _ in range(30):
        run_round(s)
    assert s.seats == {"a": 8, "b": 8}
    assert s.num_preemptions == 8  # a gave up its excess once, then nothing moved
    s.abort_requests(a + b)
    assert_all_blocks_free(s)


def test_fair_share_never_preempts_a_step_in_flight():
    s = make_fair(max_num_seqs=8, concurrent=2)
    giant = [add_owned(s, "giant", max_tokens=30, first_token=1 + i) for i in range(16)]
    b1 = s.schedule()
    b2 = s.schedule()
    finish(s, b1)
    b3 = s.schedule()
    finish(s, b2)
    assert s.num_running == 8
    small = add_owned(s, "small", max_tokens=4, first_token=300)
    in_flight = set(scheduled(b3))
    b4 = s.schedule()
    assert small in scheduled(b4)
    assert all(s.requests[rid].status == RequestStatus.RUNNING for rid in in_flight)
    finish(s, b3)
    finish(s, b4)
    s.abort_requests([*giant, small])
    drain(s)
    assert_all_blocks_free(s)


def test_prefix_cache_hits_survive_fair_share_preemption():
    s = make_fair(max_num_seqs=4)
    giant = [add_owned(s, "giant", prompt_len=16, max_tokens=20) for _ in range(6)]
    run_round(s)
    run_round(s)
    add_owned(s, "small", max_tokens=2, first_token=200)
    run_round(s)
    assert s.num_preemptions == 1
    victim = next(s.requests[r] for r in giant if s.requests[r].status == RequestStatus.PREEMPTED)
    batch = None
    while victim.status != RequestStatus.RUNNING:
        batch, _ = run_round(s)
    new = {r.request_id: r for r in batch.new_requests}
    assert new[victim.request_id].num_computed_tokens >= 16  # its prompt's blocks were cached
    s.abort_requests(giant)
    drain(s)
    assert_all_blocks_free(s)


def test_abort_of_a_waiting_giant_and_its_preempted_sequences_frees_everything():
    s = make_fair(max_num_seqs=8)
    giant = add_giant(s, prompts=8, n=16, max_tokens=50)
    run_round(s)
    small = [add_owned(s, "small", max_tokens=50, first_token=300 + i) for i in range(4)]
    run_round(s)
    assert s.num_preemptions == 4
    s.abort_requests(giant)
    assert s.waiting.owners == set() and s.seats["small"] == 4
    s.abort_requests(small)
    drain(s)
    assert_all_blocks_free(s)


def test_priority_orders_the_waiting_queue_by_priority_then_arrival():
    s = make_fair(fair_share=False, policy="priority", max_num_seqs=3)
    low = add_owned(s, "low", priority=5, arrival=1.0)
    late = add_owned(s, "late", priority=-1, arrival=3.0)
    early = add_owned(s, "early", priority=-1, arrival=2.0)
    mid = add_owned(s, "mid", priority=0, arrival=0.5)
    batch = s.schedule()
    assert [r.request_id for r in batch.new_requests] == [early, late, mid]
    assert s.waiting.peek(s.seats).request_id == low


def test_priority_victim_is_the_largest_priority_then_latest_arrival():
    s = make_fair(fair_share=False, policy="priority")
    ids = {name: add_owned(s, name, priority=prio, arrival=arrival) for name, prio, arrival in
           (("urgent", -3, 4.0), ("lax-early", 7, 1.0), ("lax-late", 7, 2.0), ("mid", 0, 3.0))}
    finish(s, s.schedule())
    assert s._pick_victim().request_id == ids["lax-late"]
    s._preempt(s.requests[ids["lax-late"]])
    assert s._pick_victim().request_id == ids["lax-early"]
    fcfs = make_fair(fair_share=False)
    add_owned(fcfs, "a")
    b = add_owned(fcfs, "b")
    finish(fcfs, fcfs.schedule())
    assert fcfs._pick_victim().request_id == b  # fcfs: the latest admitted


def test_fair_share_never_preempts_a_more_urgent_request():
    s = make_fair(policy="priority", max_num_seqs=4)
    urgent = [add_owned(s, "urgent", priority=-1, max_tokens=30, first_token=1 + i)
              for i in range(6)]
    run_round(s)
    add_owned(s, "lax", priority=1, first_token=200)
    run_round(s)
    assert s.num_preemptions == 0 and s.seats == {"urgent": 4}
    s.abort_requests(urgent)
    drain(s)
    assert_all_blocks_free(s)


def test_fcfs_refuses_priority():
    s = make_fair()
    with pytest.raises(ValueError, match=r"^priority 3 needs priority scheduling"):
        add_owned(s, "x", priority=3)
    assert not s.has_unfinished_requests()
    p = make_fair(policy="priority")
    with pytest.raises(ValueError, match=r"^priority must be an int64"):
        add_owned(p, "x", priority=1 << 63)
    add_owned(p, "x", priority=-(1 << 63))
    with pytest.raises(ValueError, match="scheduling_policy"):
        make_fair(policy="lottery")


def test_fair_share_makes_room_for_a_decode_instance_request_and_its_fetch():
    s = make_fair(max_num_seqs=4)
    giant = [add_owned(s, "giant", max_tokens=30, first_token=1 + i) for i in range(6)]
    run_round(s)
    r = add_remote(s, 17, 16, first_token=100)  # its own owner
    batch, _ = run_round(s)
    assert list(s.waiting_for_kv) == [r] and s.num_running == 3  # a giant seat gave way
    assert r not in scheduled(batch)
    s.remote_kv_ready(r, ok=True)
    batch, _ = run_round(s)
    new = {n.request_id: n for n in batch.new_requests}
    assert new[r].num_computed_tokens == 16 and new[r].num_new_tokens == 1
    assert s.num_preemptions == 1
    s.abort_requests(giant)
    drain(s)
    assert_all_blocks_free(s)


def test_request_queue_removes_lazily_and_takes_a_request_back():
    from engine_core.request_queue import RequestQueue

    queue = RequestQueue("fcfs", fair_share=True)
    requests = []
    for i, owner in enumerate(["a", "a", "b"]):
        core = EngineCoreRequest(f"q{i}", [1, 2], SamplingParams(), owner_id=owner)
        request = Request(core, 64)
        request.order = i
        requests.append(request)
        queue.add(request)
    first, second, other = requests
    assert queue.peek({}) is first
    queue.remove(first)  # admitted
    assert queue.peek({"a": 1}) is other  # b holds fewer seats
    queue.add(first)  # preempted: back before its owner's later sequence
    assert queue.peek({}) is first and len(queue) == 3 and first in queue
    queue.remove(other)
    assert queue.owners == {"a"} and set(queue) == {first, second}
    with pytest.raises(ValueError, match="already waiting"):
        queue.add(first)
