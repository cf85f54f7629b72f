"""Paged attention in Triton (placeholder: the reference until the kernel lands)."""

from __future__ import annotations

import torch
from engine_core.models.triton_attention import reference_paged_attention


def triton_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           query_start_loc: torch.Tensor, max_query_len: int, scale: float,
                           out: torch.Tensor) -> None:
    """Write into `out` [num_tokens, H, D] the causal attention of each sequence's new tokens
    over its context in the paged cache."""
    out.copy_(reference_paged_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                        query_start_loc, scale))
