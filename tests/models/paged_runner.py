"""A toy driver for LlamaModel stages in tests: a block allocator and one-step execution."""

from __future__ import annotations

import torch
from engine_core.models import AttentionMetadata, LlamaModel


class PagedRunner:
    """Runs steps through a chain of stages with a paged KV cache.

    Blocks are handed out in a shuffled order so block tables are not contiguous.
    """

    def __init__(self, stages: list[LlamaModel], num_blocks: int = 128, block_size: int = 4):
        self.stages = stages
        self.block_size = block_size
        dtype = next(stages[0].parameters()).dtype
        self.caches = [
            LlamaModel.kv_caches_from(
                torch.zeros(stage.kv_cache_shape(num_blocks, block_size), dtype=dtype)
            )
            for stage in stages
        ]
        generator = torch.Generator().manual_seed(1)
        self.free_blocks = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
        self.block_tables: dict[int, list[int]] = {}
        self.num_computed: dict[int, int] = {}

    def step(self, batch: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Run (seq_id, new token ids) for each sequence; return each one's last-token logits
        `[num_seqs, vocab]`."""
        query_lens, computed, tables, token_ids = [], [], [], []
        for seq_id, ids in batch:
            done = self.num_computed.get(seq_id, 0)
            table = self.block_tables.setdefault(seq_id, [])
            while len(table) * self.block_size < done + len(ids):
                table.append(self.free_blocks.pop())
            query_lens.append(len(ids))
            computed.append(done)
            tables.append(list(table))
            token_ids.extend(ids)
        meta = AttentionMetadata.build(query_lens, computed, tables, self.block_size, "cpu")
        input_ids = torch.tensor(token_ids)
        hidden = None
        with torch.no_grad():
            for stage, caches in zip(self.stages, self.caches):
                hidden = stage(input_ids if stage.is_first else None, hidden, caches, meta)
            assert hidden is not None
            last_rows = [end - 1 for end in meta.query_start_loc[1:]]
            logits = self.stages[-1].compute_logits(hidden[last_rows])
        for seq_id, ids in batch:
            self.num_computed[seq_id] = self.num_computed.get(seq_id, 0) + len(ids)
        return logits
