"""The KV block manager: one pool of block ids shared by every pipeline stage.

Pure Python, no tensors. Each stage holds KV tensors for its own layers only, indexed by the
same global block ids, so one manager in the engine core decides for all of them.

- Block 0 is the null block: reserved, never handed out (padding slots can point at it).
- Free blocks sit in a queue in eviction order (least recently freed first).
- With prefix caching, every full block gets a chained hash of (parent hash, its token ids).
  A freed block keeps its hash and can be reused by a later request with the same prefix
  until allocation pops it from the front of the free queue (LRU eviction).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

NULL_BLOCK_ID = 0

# Parent "hash" of the first block of every sequence.
_ROOT_HASH = b""


def hash_block_tokens(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """Chained hash of one full block: sha256(parent digest || token ids as little-endian int64).

    Deterministic across processes and machines (no Python `hash()`, fixed byte order), so a
    hash can name the same KV content on another engine instance.
    """
    h = hashlib.sha256(parent_hash)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full and registered in the cache


@dataclass
class _RequestBlocks:
    block_ids: list[int] = field(default_factory=list)
    num_hashed: int = 0  # block_ids[:num_hashed] have had their hash computed (chain position)
    last_hash: bytes = _ROOT_HASH  # hash of block_ids[num_hashed - 1]; parent of the next one


class KVBlockManager:
    """Owns every KV block id of the engine (one instance in the engine core, shared by all
    pipeline stages)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        """Block 0 is the reserved null block; usable blocks are 1..num_blocks-1."""
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Eviction order: the front is popped first. Values are unused.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> block id
        self._requests: dict[str, _RequestBlocks] = {}

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocate() can hand out now: free ones, cached-but-unreferenced included."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by at least one request."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    # ---- prefix cache lookup -----------------------------------------------------------------

    def get_computed_blocks(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """Longest prefix of full blocks already cached, as (block_ids, num_computed_tokens).

        Never covers the whole sequence: at least one token is left to compute (the last
        position's logits are needed), so at most (len(token_ids) - 1) // block_size blocks.
        Takes no references: pass the result straight to allocate() for this request, before
        any other allocate() call can evict the blocks. Empty when prefix caching is off.
        """
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        hits: list[int] = []
        parent = _ROOT_HASH
        for i in range(max(len(token_ids) - 1, 0) // bs):
            parent = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs])
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            hits.append(block_id)
        return hits, len(hits) * bs

    # ---- allocation ----------------------------------------------------------------------------

    def allocate(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_new_tokens: int,
        num_computed_tokens: int,
        computed_blocks: Sequence[int] = (),
    ) -> list[int] | None:
        """Make the request own enough blocks for num_computed_tokens + num_new_tokens tokens.

        On the request's first allocation (or the first after free()), computed_blocks from
        get_computed_blocks() are taken first: ref count +1, removed from the free queue if
        they were free. Returns the ids newly appended to the request's block table, in table
        order (computed blocks included on the first call), or None if there are not enough
        free blocks; then nothing changes (atomic).

        With prefix caching, every block that is full with known tokens (positions below
        min(num_computed_tokens + num_new_tokens, len(token_ids))) gets its chained hash
        registered so later requests can hit it. Blocks whose tokens are not yet in token_ids
        are hashed on a later call. If a hash is already registered to another block, the
        first block keeps it and this one stays unhashed.

        Raises ValueError on caller bugs: negative counts, computed_blocks passed for a
        request that already has a table, or computed blocks that are no longer cached.
        """
        if num_new_tokens < 0 or num_computed_tokens < 0:
            raise ValueError(
                f"num_new_tokens ({num_new_tokens}) and num_computed_tokens "
                f"({num_computed_tokens}) must be >= 0"
            )
        req = self._requests.get(request_id)
        if req is None:
            # First allocation: the record starts with the verified cache hits as its prefix.
            last_hit_hash = self._check_computed_blocks(
                computed_blocks, token_ids, num_computed_tokens
            )
            record = _RequestBlocks([], len(computed_blocks), last_hit_hash)
        elif computed_blocks:
            raise ValueError(
                f"request {request_id!r} already has blocks; computed_blocks are only "
                "accepted on its first allocation"
            )
        else:
            record = req

        num_held = len(record.block_ids) + len(computed_blocks)
        num_required = -(-(num_computed_tokens + num_new_tokens) // self.block_size)
        num_to_pop = max(num_required - num_held, 0)
        # Computed blocks with ref 0 leave the free queue too, so they count against it.
        num_revived = sum(1 for b in computed_blocks if self._blocks[b].ref_count == 0)
        if num_to_pop + num_revived > len(self._free):
            return None

        new_ids: list[int] = []
        for block_id in computed_blocks:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            new_ids.append(block_id)
        for _ in range(num_to_pop):
            new_ids.append(self._pop_free_block())
        record.block_ids.extend(new_ids)
        self._requests[request_id] = record

        if self.enable_prefix_caching:
            num_known = min(num_computed_tokens + num_new_tokens, len(token_ids))
            self._hash_full_blocks(record, token_ids, num_known // self.block_size)
        return new_ids

    def free(self, request_id: str, num_valid_tokens: int | None = None) -> None:
        """Drop the request's references and forget its table. Unknown id: no-op.

        Blocks whose ref count reaches 0 go back to the free queue; hashed ones stay reusable
        by hash until evicted. They are appended tail first, so the request's tail blocks are
        evicted before its head blocks (a shared prefix outlives its suffixes).

        `num_valid_tokens`: only the KV of the request's first that many tokens was written (a
        step that was allocated and hashed never ran); blocks holding later tokens lose their
        hash, so no later request can hit KV that does not exist.
        """
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        first_invalid = len(req.block_ids)
        if num_valid_tokens is not None:
            first_invalid = num_valid_tokens // self.block_size
        for index, block_id in reversed(list(enumerate(req.block_ids))):
            block = self._blocks[block_id]
            if index >= first_invalid and block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a copy); empty for an unknown id."""
        req = self._requests.get(request_id)
        return list(req.block_ids) if req is not None else []

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Only possible when no block is referenced: returns False
        (and changes nothing) if some request still holds blocks, True otherwise."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        self._cached.clear()
        for block in self._blocks:
            block.block_hash = None
        return True

    # ---- internals -----------------------------------------------------------------------------

    def _check_computed_blocks(
        self, computed_blocks: Sequence[int], token_ids: Sequence[int], num_computed: int
    ) -> bytes:
        """Verify computed_blocks are still the cached prefix of token_ids; return the last
        block's hash. Guards against a stale get_computed_blocks() result whose blocks were
        evicted (and maybe re-registered with other content) in between."""
        if len(computed_blocks) * self.block_size > min(num_computed, len(token_ids)):
            raise ValueError(
                f"{len(computed_blocks)} computed blocks cover more than "
                f"num_computed_tokens={num_computed} or the known token ids"
            )
        bs = self.block_size
        parent = _ROOT_HASH
        for i, block_id in enumerate(computed_blocks):
            parent = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs])
            if self._cached.get(parent) != block_id:
                raise ValueError(
                    f"computed block {block_id} is no longer cached for this prefix; call "
                    "allocate() right after get_computed_blocks()"
                )
        return parent

    def _pop_free_block(self) -> int:
        """Take the least recently freed block, evicting its cached hash if it has one."""
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def _hash_full_blocks(
        self, req: _RequestBlocks, token_ids: Sequence[int], num_full: int
    ) -> None:
        """Hash and register req.block_ids[req.num_hashed:num_full] (incremental)."""
        bs = self.block_size
        for i in range(req.num_hashed, num_full):
            h = hash_block_tokens(req.last_hash, token_ids[i * bs : (i + 1) * bs])
            if h not in self._cached:  # same content registered first elsewhere: keep that one
                block_id = req.block_ids[i]
                self._cached[h] = block_id
                self._blocks[block_id].block_hash = h
            req.last_hash = h
        req.num_hashed = max(req.num_hashed, num_full)
