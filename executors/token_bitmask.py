"""Structured outputs at the last stage: a step's token bitmasks applied to its logits.

A bitmask row (`engine_core.grammars`) holds `words = ceil(vocab / 32)` little-endian int32
words; bit `t % 32` of word `t // 32` is set when token t is allowed. Tokens past the row's bits
(a model vocabulary padded beyond the tokenizer's) and every cleared bit get -inf, before the
sampler runs, so every sampled token, its logprobs and the top logprobs are those of the allowed
tokens (as in vLLM, where the bitmask is applied to the logits before sampling).
"""

from __future__ import annotations

import torch

__all__ = ["apply_token_bitmasks", "bitmask_error"]

_BIT = torch.arange(32, dtype=torch.int32)  # [32] a constant, never written


def bitmask_error(bitmask: bytes, num_rows: int, vocab_size: int) -> str | None:
    """Why `bitmask` cannot be the bitmask of `num_rows` rows over `vocab_size` tokens, or None."""
    expected = num_rows * ((vocab_size + 31) // 32) * 4
    if len(bitmask) != expected:
        return (f"token bitmask of {len(bitmask)} bytes, expected {expected} for {num_rows} "
                f"row(s) of a {vocab_size}-token vocabulary")
    return None


def apply_token_bitmasks(logits: torch.Tensor, rows: list[int], bitmasks: list[bytes]
                         ) -> torch.Tensor:
    """`logits` [num_rows, vocab] with every token the bitmasks forbid at -inf: `bitmasks[i]`
    (checked by `bitmask_error`) covers the consecutive rows from `rows[i]` on. Returns a new
    tensor; `logits` is not modified."""
    vocab = logits.shape[-1]
    words = (vocab + 31) // 32
    packed = torch.frombuffer(bytearray(b"".join(bitmasks)), dtype=torch.int32)
    packed = packed.view(-1, words)  # [num_masked_rows, words]
    index = torch.tensor([row + j for row, bitmask in zip(rows, bitmasks)
                          for j in range(len(bitmask) // (words * 4))], dtype=torch.int64)
    allowed = ((packed.unsqueeze(-1) >> _BIT) & 1).view(len(index), words * 32)[:, :vocab]
    allowed = allowed.to(device=logits.device, dtype=torch.bool)  # [num_masked_rows, vocab]
    index = index.to(logits.device)
    masked = logits.clone()
    masked[index] = masked[index].masked_fill(~allowed, float("-inf"))
    return masked
