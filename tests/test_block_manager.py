"""CPU-only tests of the KV block manager: unit tests, then a Hypothesis state machine."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from engine_core import block_manager as bm_module
from engine_core.block_manager import NULL_BLOCK_ID, KVBlockManager, hash_block_tokens


def ref_count(bm: KVBlockManager, block_id: int) -> int:
    return bm._blocks[block_id].ref_count


def snapshot(bm: KVBlockManager) -> tuple:
    """Everything observable about the manager's state, for atomicity checks."""
    return (
        {rid: (list(r.block_ids), r.num_hashed, r.last_hash) for rid, r in bm._requests.items()},
        [(b.ref_count, b.block_hash) for b in bm._blocks],
        list(bm._free),
        dict(bm._cached),
    )


def admit(bm: KVBlockManager, rid: str, prompt: list[int]) -> list[int] | None:
    """What the scheduler does for a new request: prefix lookup, then allocate the rest."""
    hits, num_computed = bm.get_computed_blocks(prompt)
    return bm.allocate(rid, prompt, len(prompt) - num_computed, num_computed, hits)


# ---- construction and sizes ---------------------------------------------------------------------


@pytest.mark.parametrize(("num_blocks", "block_size"), [(1, 16), (0, 16), (8, 0)])
def test_invalid_construction(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError):
        KVBlockManager(num_blocks, block_size)


def test_initial_sizes() -> None:
    bm = KVBlockManager(num_blocks=10, block_size=4)
    assert bm.num_usable_blocks == 9
    assert bm.num_free_blocks == 9
    assert bm.usage == 0.0


@pytest.mark.parametrize(
    ("num_tokens", "num_blocks"), [(1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)]
)
def test_allocation_size_at_block_boundaries(num_tokens: int, num_blocks: int) -> None:
    bm = KVBlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    new = bm.allocate("r", list(range(num_tokens)), num_tokens, 0)
    assert new is not None and len(new) == num_blocks
    assert bm.block_ids("r") == new
    assert bm.num_free_blocks == 9 - num_blocks


def test_growth_adds_a_block_only_when_crossing_a_boundary() -> None:
    bm = KVBlockManager(num_blocks=10, block_size=4)
    tokens = list(range(4))
    assert len(bm.allocate("r", tokens, 4, 0) or []) == 1
    tokens.append(4)  # decode step: token at position 4 needs a second block
    new = bm.allocate("r", tokens, 1, 4)
    assert new is not None and len(new) == 1
    assert bm.block_ids("r")[-1] == new[0]
    for pos in range(5, 8):  # positions 5..7 fit in the second block
        tokens.append(pos)
        assert bm.allocate("r", tokens, 1, pos) == []
    assert len(bm.block_ids("r")) == 2


def test_chunked_prefill_allocates_per_chunk() -> None:
    bm = KVBlockManager(num_blocks=10, block_size=4)
    prompt = list(range(10))
    assert len(bm.allocate("r", prompt, 3, 0) or []) == 1
    assert len(bm.allocate("r", prompt, 3, 3) or []) == 1
    assert len(bm.allocate("r", prompt, 4, 6) or []) == 1
    assert len(bm.block_ids("r")) == 3


def test_null_block_never_handed_out() -> None:
    bm = KVBlockManager(num_blocks=6, block_size=2)
    new = bm.allocate("r", list(range(10)), 10, 0)
    assert new is not None and sorted(new) == [1, 2, 3, 4, 5]
    assert NULL_BLOCK_ID not in new
    assert bm.num_free_blocks == 0
    assert bm.usage == 1.0
    assert bm.allocate("s", [1], 1, 0) is None


# ---- atomic failure, free ------------------------------------------------------------------------


def test_allocation_failure_is_atomic() -> None:
    bm = KVBlockManager(num_blocks=5, block_size=4)
    assert bm.allocate("a", list(range(12)), 12, 0) is not None  # 3 of 4 usable blocks
    before = snapshot(bm)
    assert bm.allocate("b", list(range(100, 108)), 8, 0) is None  # needs 2
    assert snapshot(bm) == before
    assert bm.block_ids("b") == []
    # Growing an existing request fails atomically too.
    assert bm.allocate("a", list(range(20)), 8, 12) is None
    assert snapshot(bm) == before


def test_allocation_failure_is_atomic_with_free_cached_blocks() -> None:
    bm = KVBlockManager(num_blocks=4, block_size=2)  # 3 usable
    prompt = [1, 2, 3, 4, 5]
    assert admit(bm, "a", prompt) is not None  # 3 blocks, the first 2 hashed
    bm.free("a")
    hits, num_computed = bm.get_computed_blocks([*prompt, 6, 7, 8])
    assert len(hits) == 2 and num_computed == 4
    before = snapshot(bm)
    # Taking the 2 free cached blocks leaves 1 free block; 2 more are needed.
    assert bm.allocate("b", [*prompt, 6, 7, 8], 4, num_computed, hits) is None
    assert snapshot(bm) == before


def test_free_returns_blocks() -> None:
    bm = KVBlockManager(num_blocks=10, block_size=4)
    assert bm.allocate("r", list(range(10)), 10, 0) is not None
    assert bm.num_free_blocks == 6
    assert bm.usage == pytest.approx(3 / 9)
    bm.free("r")
    assert bm.num_free_blocks == 9
    assert bm.usage == 0.0
    assert bm.block_ids("r") == []
    bm.free("r")  # second free and unknown ids are no-ops
    bm.free("never-seen")
    assert bm.num_free_blocks == 9


# ---- prefix caching ------------------------------------------------------------------------------


def test_prefix_hit_on_second_request_shares_blocks() -> None:
    bm = KVBlockManager(num_blocks=10, block_size=4)
    prompt = list(range(10))
    first = admit(bm, "a", prompt)
    assert first is not None and len(first) == 3

    hits, num_computed = bm.get_computed_blocks(prompt)
    assert hits == first[:2] and num_computed == 8
    assert all(ref_count(bm, b) == 1 for b in first)  # lookup takes no references

    second = bm.allocate("b", prompt, len(prompt) - num_computed, num_computed, hits)
    assert second is not None and second[:2] == first[:2] and second[2] != first[2]
    assert bm.block_ids("b") == second
    assert [ref_count(bm, b) for b in first] == [2, 2, 1]
    assert bm.num_free_blocks == 9 - 4

    bm.free("a")
    assert [ref_count(bm, b) for b in second] == [1, 1, 1]
    assert bm.num_free_blocks == 9 - 3


def test_hit_cap_leaves_at_least_one_token() -> None:
    bm = KVBlockManager(num_blocks=10, block_size=4)
    prompt = list(range(8))  # exactly two full blocks
    assert admit(bm, "a", prompt) is not None
    hits, num_computed = bm.get_computed_blocks(prompt)
    assert len(hits) == 1 and num_computed == 4
    longer = [*prompt, 8]
    hits, num_computed = bm.get_computed_blocks(longer)
    assert len(hits) == 2 and num_computed == 8
    assert bm.get_computed_blocks(prompt[:4]) == ([], 0)
    assert bm.get_computed_blocks([]) == ([], 0)


def test_different_prompts_do_not_hit() -> None:
    bm = KVBlockManager(num_blocks=10, block_size=4)
    assert admit(bm, "a", list(range(10))) is not None
    assert bm.get_computed_blocks(list(range(100, 110))) == ([], 0)
    assert bm.get_computed_blocks([0, 1, 2, 99, 4, 5, 6, 7, 8]) == ([], 0)  # first block differs


def test_hash_is_chained_on_the_prefix() -> None:
    bm = KVBlockManager(num_blocks=10, block_size=4)
    tail = [5, 6, 7, 8]
    a = admit(bm, "a", [1, 2, 3, 4, *tail, 0])
    b = admit(bm, "b", [9, 9, 9, 9, *tail, 0])
    assert a is not None and b is not None
    assert set(a).isdisjoint(b)  # same second block content, different prefix: no sharing
    # Both second blocks are registered under different hashes.
    assert len(bm._cached) == 4
    assert hash_block_tokens(hash_block_tokens(b"", [1, 2, 3, 4]), tail) != hash_block_tokens(
        hash_block_tokens(b"", [9, 9, 9, 9]), tail
    )
    assert bm.get_computed_blocks([9, 9, 9, 9, *tail, 1]) == (b[:2], 8)


def test_hash_is_stable() -> None:
    h = hash_block_tokens(b"", [1, 2, 3])
    assert h == hash_block_tokens(b"", (1, 2, 3))
    assert len(h) == 32
    assert h != hash_block_tokens(b"", [1, 2, 4])
    assert h != hash_block_tokens(h, [1, 2, 3])


def test_decode_tokens_fill_blocks_that_later_requests_hit() -> None:
    bm = KVBlockManager(num_blocks=10, block_size=4)
    tokens = [1, 2, 3]
    assert admit(bm, "a", tokens) is not None
    for t in [4, 5, 6, 7, 8]:  # each decode step feeds the last sampled token
        tokens.append(t)
        assert bm.allocate("a", tokens, 1, len(tokens) - 1) is not None
    # Blocks [1,2,3,4] and [5,6,7,8] are full now.
    hits, num_computed = bm.get_computed_blocks([*tokens, 9])
    assert hits == bm.block_ids("a")[:2] and num_computed == 8


def test_hashing_waits_for_unknown_tokens() -> None:
    bm = KVBlockManager(num_blocks=10, block_size=4)
    # Slots for 8 tokens, but only 6 token ids known yet: the second block is not hashed.
    assert bm.allocate("a", [1, 2, 3, 4, 5, 6], 8, 0) is not None
    assert len(bm._cached) == 1
    assert bm.allocate("a", [1, 2, 3, 4, 5, 6, 7, 8], 0, 8) == []
    assert len(bm._cached) == 2
    assert bm.get_computed_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9])[1] == 8


def test_concurrent_identical_blocks_keep_the_first_registration() -> None:
    bm = KVBlockManager(num_blocks=10, block_size=4)
    prompt = list(range(9))
    assert bm.allocate("a", prompt, 3, 0) is not None  # chunked: nothing full yet
    b = admit(bm, "b", prompt)  # no hit; registers its two full blocks
    assert b is not None
    assert bm.allocate("a", prompt, 6, 3) is not None  # a's blocks fill with the same content
    a = bm.block_ids("a")
    assert set(a).isdisjoint(b)
    assert bm.get_computed_blocks(prompt) == (b[:2], 8)
    assert all(bm._blocks[x].block_hash is None for x in a)
    bm.free("b")
    assert bm.get_computed_blocks(prompt) == (b[:2], 8)  # still cached while free


def test_freed_cached_blocks_are_reused_then_evicted_lru() -> None:
    bm = KVBlockManager(num_blocks=5, block_size=2)  # 4 usable
    prompt = [1, 2, 3, 4, 5]
    a = admit(bm, "a", prompt)  # blocks [1,2] [3,4] [5]; the first two hashed
    assert a is not None and len(a) == 3
    bm.free("a")
    assert bm.num_free_blocks == 4
    # Free queue: the untouched block first, then a's blocks tail first.
    assert list(bm._free) == [4, a[2], a[1], a[0]]

    hits, num_computed = bm.get_computed_blocks(prompt)
    assert hits == a[:2] and num_computed == 4

    # A different 5-token prompt needs 3 blocks: the untouched one, a's tail, then a[1]
    # (evicting its hash). a[0] survives as the head of the cached prefix.
    c = admit(bm, "c", [7, 7, 7, 7, 7])
    assert c == [4, a[2], a[1]]
    assert bm._blocks[a[1]].block_hash is None  # evicted; now c's partial tail block
    assert bm.get_computed_blocks(prompt) == ([a[0]], 2)

    # Hitting a free cached block takes it out of the free queue.
    d = admit(bm, "d", prompt)
    assert d is None  # a[0] taken + 2 more needed, only a[0] is free
    bm.free("c")
    d = admit(bm, "d", prompt)
    assert d is not None and d[0] == a[0] and ref_count(bm, a[0]) == 1
    assert a[0] not in bm._free


def test_computed_blocks_must_still_be_cached() -> None:
    bm = KVBlockManager(num_blocks=3, block_size=2)  # 2 usable
    prompt = [1, 2, 3]
    assert admit(bm, "a", prompt) is not None
    bm.free("a")
    hits, num_computed = bm.get_computed_blocks(prompt)
    assert len(hits) == 1
    # Evicts both blocks; hits[0] gets re-registered with x's second block content.
    assert bm.allocate("x", [9, 9, 9, 9], 4, 0) is not None
    assert bm._blocks[hits[0]].block_hash is not None
    bm.free("x")
    with pytest.raises(ValueError, match="no longer cached"):
        bm.allocate("b", prompt, 1, num_computed, hits)


def test_computed_blocks_only_on_first_allocation() -> None:
    bm = KVBlockManager(num_blocks=10, block_size=2)
    assert admit(bm, "a", [1, 2, 3]) is not None
    assert bm.allocate("b", [5], 1, 0) is not None
    hits, num_computed = bm.get_computed_blocks([1, 2, 3])
    with pytest.raises(ValueError):
        bm.allocate("b", [1, 2, 3], 1, num_computed, hits)
    with pytest.raises(ValueError):
        bm.allocate("c", [1, 2, 3], 3, 0, hits)  # hits cover more than num_computed_tokens
    with pytest.raises(ValueError):
        bm.allocate("c", [1, 2, 3], -1, 0)


def test_reset_prefix_cache() -> None:
    bm = KVBlockManager(num_blocks=10, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    assert admit(bm, "a", prompt) is not None
    assert bm.reset_prefix_cache() is False
    assert bm.get_computed_blocks(prompt)[1] == 4  # nothing dropped
    bm.free("a")
    assert bm.reset_prefix_cache() is True
    assert bm.get_computed_blocks(prompt) == ([], 0)
    assert all(b.block_hash is None for b in bm._blocks)
    assert bm.num_free_blocks == 9


def test_no_hashing_when_caching_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> bytes:
        raise AssertionError("hash computed with prefix caching off")

    monkeypatch.setattr(bm_module, "hash_block_tokens", boom)
    bm = KVBlockManager(num_blocks=10, block_size=2, enable_prefix_caching=False)
    prompt = [1, 2, 3, 4, 5]
    assert admit(bm, "a", prompt) is not None
    assert admit(bm, "b", prompt) is not None
    assert set(bm.block_ids("a")).isdisjoint(bm.block_ids("b"))
    assert bm.get_computed_blocks(prompt) == ([], 0)
    assert not bm._cached


# ---- stateful property test ---------------------------------------------------------------------


NUM_BLOCKS = 16
BLOCK_SIZE = 2
# Prompts share prefixes often: a prefix of one of a few base prompts plus a short random tail.
BASE_PROMPTS = ([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], [0, 1, 1, 0, 0, 1, 1, 0, 0, 1], [2] * 10)
prompts = st.builds(
    lambda base, n, tail: (base[:n] + tail) or [0],
    st.sampled_from(BASE_PROMPTS),
    st.integers(0, 10),
    st.lists(st.integers(0, 2), max_size=3),
)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random admit / chunked prefill / decode / free against the manager.

    Besides the bookkeeping invariants it simulates the KV contents: every computed token is
    "written" into its slot, so a prefix hit must return blocks whose contents equal the
    prompt, and a write must never land in a block shared with another request.
    """

    requests = Bundle("requests")

    @initialize(caching=st.booleans())
    def setup(self, caching: bool) -> None:
        self.bm = KVBlockManager(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=caching)
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        # block id -> simulated KV slots, each the token prefix it was computed from
        self.content: dict[int, list[tuple[int, ...] | None]] = {}
        self.next_id = 0

    def _compute(self, rid: str, start: int, end: int) -> None:
        table = self.bm.block_ids(rid)
        for pos in range(start, end):
            block_id = table[pos // BLOCK_SIZE]
            assert ref_count(self.bm, block_id) == 1, "write into a shared block"
            # A token's KV depends on every token up to it, so the slot holds that prefix.
            self.content[block_id][pos % BLOCK_SIZE] = tuple(self.tokens[rid][: pos + 1])
        self.computed[rid] = end

    @rule(target=requests, prompt=prompts, chunk=st.integers(1, 12))
    def add_request(self, prompt: list[int], chunk: int) -> str | None:
        rid = f"r{self.next_id}"
        self.next_id += 1
        hits, num_computed = self.bm.get_computed_blocks(prompt)
        assert num_computed == len(hits) * BLOCK_SIZE < len(prompt)
        for i, block_id in enumerate(hits):  # a hit must hold exactly this prefix's KV
            start = i * BLOCK_SIZE
            expected = [tuple(prompt[: pos + 1]) for pos in range(start, start + BLOCK_SIZE)]
            assert self.content[block_id] == expected
        num_new = min(chunk, len(prompt) - num_computed)
        before = snapshot(self.bm)
        new = self.bm.allocate(rid, prompt, num_new, num_computed, hits)
        if new is None:
            assert snapshot(self.bm) == before
            return None  # a None in the bundle stands for a request that was never admitted
        num_blocks = -(-(num_computed + num_new) // BLOCK_SIZE)
        assert len(new) == num_blocks and new[: len(hits)] == hits
        assert self.bm.block_ids(rid) == new
        for block_id in new[len(hits) :]:
            self.content[block_id] = [None] * BLOCK_SIZE  # fresh block: garbage
        self.tokens[rid] = list(prompt)
        self.computed[rid] = num_computed
        self._compute(rid, num_computed, num_computed + num_new)
        return rid

    @rule(rid=requests, token=st.integers(0, 2), chunk=st.integers(1, 12))
    def step(self, rid: str | None, token: int, chunk: int) -> None:
        """One scheduler step for a running request: next prefill chunk or one decode token."""
        if rid is None or rid not in self.tokens:
            return
        tokens, start = self.tokens[rid], self.computed[rid]
        if start == len(tokens):
            tokens.append(token)  # the token sampled last step is fed in now
        num_new = min(chunk, len(tokens) - start)
        old_len = len(self.bm.block_ids(rid))
        before = snapshot(self.bm)
        new = self.bm.allocate(rid, tokens, num_new, start)
        if new is None:
            assert snapshot(self.bm) == before
            return
        needed = -(-(start + num_new) // BLOCK_SIZE)
        assert len(new) == max(needed - old_len, 0)
        assert self.bm.block_ids(rid)[old_len:] == new
        for block_id in new:
            self.content[block_id] = [None] * BLOCK_SIZE
        self._compute(rid, start, start + num_new)

    @rule(rid=consumes(requests))
    def free(self, rid: str | None) -> None:
        if rid is None:
            return
        self.bm.free(rid)
        self.tokens.pop(rid, None)
        self.computed.pop(rid, None)
        assert self.bm.block_ids(rid) == []

    @rule()
    def reset_prefix_cache(self) -> None:
        assert self.bm.reset_prefix_cache() == (not self.tokens)

    @invariant()
    def bookkeeping_is_consistent(self) -> None:
        bm = self.bm
        refs = [0] * NUM_BLOCKS
        for rid in self.tokens:
            table = bm.block_ids(rid)
            assert len(set(table)) == len(table), "block owned twice by one request"
            assert NULL_BLOCK_ID not in table
            for block_id in table:
                refs[block_id] += 1
        assert not set(bm._requests) - set(self.tokens)
        for block in bm._blocks:
            assert block.ref_count == refs[block.block_id] >= 0
            assert (block.block_id in bm._free) == (block.ref_count == 0 and block.block_id != 0)
            if block.block_hash is not None:
                assert bm._cached[block.block_hash] == block.block_id
        assert len(bm._cached) == sum(b.block_hash is not None for b in bm._blocks)
        referenced = sum(1 for r in refs if r > 0)
        assert bm.num_free_blocks + referenced == bm.num_usable_blocks
        assert bm.usage == pytest.approx(referenced / bm.num_usable_blocks)
        if not bm.enable_prefix_caching:
            assert not bm._cached

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for rid in list(self.tokens):
            self.bm.free(rid)
        assert self.bm.num_free_blocks == self.bm.num_usable_blocks
        assert all(b.ref_count == 0 for b in self.bm._blocks)
        assert self.bm.reset_prefix_cache() is True


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestBlockManagerMachine = BlockManagerMachine.TestCase


def test_free_with_unwritten_tail_uncaches_only_those_blocks() -> None:
    """A step that was allocated (and hashed) but never ran: its blocks must leave the cache."""
    bm = KVBlockManager(10, 4)
    prompt = list(range(1, 13))  # 3 full blocks
    bm.allocate("a", prompt, 8, 0)  # blocks 0-1 written by a step that ran
    bm.allocate("a", prompt, 4, 8)  # block 2 hashed, but its step never runs
    bm.free("a", num_valid_tokens=8)
    assert bm.num_free_blocks == 9
    hits, num_computed = bm.get_computed_blocks(prompt)
    assert num_computed == 8 and len(hits) == 2
