"""Prefix-aware routing for data parallelism (`--dp-routing prefix`).

Block hashes are deterministic across engines (`block_manager.hash_block_tokens`: a sha256
chain over the token ids of each full block), so the front-end can compute a prompt's block
hashes itself and remember which engine it sent which blocks to. A request then goes to the
engine that already holds the longest run of its leading blocks, unless that engine's load is
more than `load_slack` above the least loaded one's (or no engine holds any of them): then
plain load routing decides. The index is a bounded LRU per engine, an approximation of what the
engine's cache holds (the engine may have evicted a block since).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from engine_core.block_manager import hash_block_tokens

__all__ = ["PrefixIndex"]


class PrefixIndex:
    """Which engine was sent which prompt blocks (by chained block hash)."""

    def __init__(self, num_engines: int, block_size: int, capacity: int = 1 << 16) -> None:
        self.block_size = block_size
        self.capacity = capacity  # block hashes remembered per engine
        self._blocks: list[OrderedDict[bytes, None]] = [OrderedDict()
                                                         for _ in range(num_engines)]

    def hashes(self, token_ids: Sequence[int]) -> list[bytes]:
        """The chained hashes of the prompt's full blocks, as the engines compute them."""
        bs, parent, out = self.block_size, b"", []
        for start in range(0, len(token_ids) - bs + 1, bs):
            parent = hash_block_tokens(parent, token_ids[start:start + bs])
            out.append(parent)
        return out

    def match(self, rank: int, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of `hashes` engine `rank` was sent before."""
        held = self._blocks[rank]
        count = 0
        for block_hash in hashes:
            if block_hash not in held:
                break
            count += 1
        return count

    def record(self, rank: int, hashes: Sequence[bytes]) -> None:
        held = self._blocks[rank]
        for block_hash in hashes:
            held[block_hash] = None
            held.move_to_end(block_hash)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def forget(self, rank: int) -> None:
        """The engine died: whatever it cached is gone."""
        self._blocks[rank].clear()
