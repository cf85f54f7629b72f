"""The Triton attention backend: per-step metadata as device tensors, and the attention op.

Where the torch backend (`attention.py`) gathers each context into a padded tensor, this
backend hands the block table itself to one kernel (`triton_paged_attention.py`), which reads
K/V straight from the cache blocks. Everything a step needs is a tensor whose shape depends on
the batch size alone, never on the context lengths, so a decode step can be captured as a CUDA
graph (`executors/cuda_graphs.py`) and replayed with new contents in the same buffers.

The host side of a step builds plain int64 arrays (`host_arrays`); the caller moves them to the
device in one transfer together with its own (`executors/step_inputs.py`) and wraps the device
views with `TritonAttentionMetadata.from_arrays`.

The kernel is reached through the custom op `torch.ops.pp_engine.paged_attention`: on meta
tensors (and under torch.compile) its fake implementation only shapes the output, so a captured
region can be checked for host traffic without a GPU (`tests/test_cuda_graphs.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from engine_core.models.attention import step_layout

# Names of the arrays a step's attention needs (see `host_arrays`).
ATTENTION_ARRAYS = ("positions", "slot_mapping", "seq_lens", "query_start_loc", "block_tables")


@dataclass
class TritonAttentionMetadata:
    """One step's batch layout for the Triton backend, shared by all layers of a stage. Tokens
    of one sequence are contiguous, sequences in batch order."""

    positions: torch.Tensor  # [num_tokens] int64 absolute position of each new token
    slot_mapping: torch.Tensor  # [num_tokens] int64 cache slot of each new token
    seq_lens: torch.Tensor  # [num_seqs] int64 context length after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int64 token offset of each sequence
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with the null block 0
    max_query_len: int  # the most new tokens of one sequence (1: a decode-only step)
    max_seq_len: int  # an upper bound of seq_lens (positions are below it)

    @staticmethod
    def host_arrays(query_lens: list[int], num_computed_tokens: list[int],
                    block_tables: list[list[int]], block_size: int,
                    max_blocks: int | None = None) -> dict[str, torch.Tensor]:
        """The step's `ATTENTION_ARRAYS` as CPU int64 tensors: sequence i contributes
        `query_lens[i]` new tokens at positions `num_computed_tokens[i]...`, whose K/V go to the
        blocks `block_tables[i]` (which must cover the whole context). `max_blocks` widens the
        block table (a CUDA graph's fixed width); default: the longest table."""
        return step_layout(query_lens, num_computed_tokens, block_tables, block_size,
                           max_blocks)

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor], max_query_len: int,
                    max_seq_len: int) -> TritonAttentionMetadata:
        """Wrap `ATTENTION_ARRAYS` already on the device (no copy)."""
        return cls(positions=arrays["positions"], slot_mapping=arrays["slot_mapping"],
                   seq_lens=arrays["seq_lens"], query_start_loc=arrays["query_start_loc"],
                   block_tables=arrays["block_tables"], max_query_len=max_query_len,
                   max_seq_len=max_seq_len)

    @classmethod
    def build(cls, query_lens: list[int], num_computed_tokens: list[int],
              block_tables: list[list[int]], block_size: int,
              device: torch.device | str) -> TritonAttentionMetadata:
        """`host_arrays` moved to `device` one array at a time (tests; a stage moves them
        together with its other inputs)."""
        arrays = cls.host_arrays(query_lens, num_computed_tokens, block_tables, block_size)
        return cls.from_arrays({k: v.to(device) for k, v in arrays.items()}, max(query_lens),
                               int(arrays["seq_lens"].max()))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """Store the step's new K/V in the cache, then attend causally over each sequence's
        whole context. q: [num_tokens, H, D]; k, v: [num_tokens, Hkv, D]; caches
        [num_blocks, block_size, Hkv, D]. Returns [num_tokens, H * D]."""
        num_tokens, num_kv_heads, head_dim = k.shape
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, self.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, self.slot_mapping, v)
        out = torch.ops.pp_engine.paged_attention(
            q, k_cache, v_cache, self.block_tables, self.seq_lens, self.query_start_loc,
            self.max_query_len, scale)  # [num_tokens, H, D]
        return out.view(num_tokens, -1)


@torch.library.custom_op("pp_engine::paged_attention", mutates_args=())
def paged_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_tables: torch.Tensor, seq_lens: torch.Tensor,
                       query_start_loc: torch.Tensor, max_query_len: int,
                       scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its context in the paged cache (the
    new tokens' K/V already stored). q: [num_tokens, H, D] -> [num_tokens, H, D]."""
    from engine_core.models.triton_paged_attention import triton_paged_attention

    out = torch.empty_like(q)
    triton_paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                           max_query_len, scale, out)
    return out


@paged_attention_op.register_fake
def _paged_attention_fake(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, seq_lens: torch.Tensor,
                          query_start_loc: torch.Tensor, max_query_len: int,
                          scale: float) -> torch.Tensor:
    return torch.empty_like(q)


def reference_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """What `paged_attention_op` computes, one sequence at a time in float32 (a test oracle,
    not a fast path). Same arguments; returns [num_tokens, H, D] in q's dtype."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        start, end = starts[i], starts[i + 1]
        positions = torch.arange(seq_len)
        slots = block_tables[i, positions // block_size] * block_size + positions % block_size
        k = k_cache.flatten(0, 1)[slots].float()  # [seq_len, Hkv, D]
        v = v_cache.flatten(0, 1)[slots].float()
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)  # [seq_len, H, D]
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale
        query_positions = torch.arange(seq_len - (end - start), seq_len)
        allowed = positions[None, :] <= query_positions[:, None]  # [n, seq_len]
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out
