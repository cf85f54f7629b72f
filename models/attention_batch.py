"""What a model layer needs of a step's attention metadata, whichever backend built it."""

from __future__ import annotations

from typing import Protocol

import torch


class AttentionBatch(Protocol):
    """One step's batch layout for every attention layer of a stage: the torch backend's
    `AttentionMetadata` (attention.py) or the Triton backend's `TritonAttentionMetadata`
    (triton_attention.py)."""

    positions: torch.Tensor  # [num_tokens] int64 absolute position of each new token
    max_seq_len: int  # an upper bound of the positions (exclusive), known on the host

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """Store the step's new K/V in the cache, then attend causally over each sequence's
        whole context. q: [num_tokens, H, D]; k, v: [num_tokens, Hkv, D]; caches
        [num_blocks, block_size, Hkv, D]. Returns [num_tokens, H * D]."""
        ...
