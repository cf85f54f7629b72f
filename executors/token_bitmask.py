"""Structured outputs at the last stage: a step's token bitmasks applied to its logits.

A bitmask row (`engine_core.grammars`) holds `words = ceil(vocab / 32)` little-endian int32
words; bit `t % 32` of word `t // 32` is set when token t is allowed. Tokens past the row's bits
(a model vocabulary padded beyond the tokenizer's) and every cleared bit get -inf, before the
sampler runs, so every sampled token, its logprobs and the top logprobs are those of the allowed
tokens (as in vLLM, where the bitmask is applied to the logits before sampling).
"""

from __future__ import annotations

import torch

from engine_core.grammars import bitmask_words

__all__ = ["NO_ALLOWED_TOKEN", "apply_token_bitmasks", "bitmask_error", "bitmask_words"]

# a sampling row's error when its bitmask allows no token with a finite logit
NO_ALLOWED_TOKEN = ("structured_outputs: no token of the vocabulary can continue the "
                    "constraint here")

# [256, 8] bool: bit i of byte value b (the bitmask's bytes hold tokens 8k..8k+7, lowest bit
# first, since its int32 words are little-endian)
_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()


def bitmask_error(bitmask: bytes, num_rows: int, vocab_size: int) -> str | None:
    """Why `bitmask` cannot be the bitmask of `num_rows` rows over `vocab_size` tokens, or None."""
    expected = num_rows * bitmask_words(vocab_size) * 4
    if len(bitmask) != expected:
        return (f"token bitmask of {len(bitmask)} bytes, expected {expected} for {num_rows} "
                f"row(s) of a {vocab_size}-token vocabulary")
    return None


def apply_token_bitmasks(logits: torch.Tensor, rows: list[int], bitmasks: list[bytes]) -> None:
    """Set every token the bitmasks forbid to -inf in `logits` [num_rows, vocab], in place:
    `bitmasks[i]` (checked by `bitmask_error`) covers the consecutive rows from `rows[i]` on."""
    num_rows, vocab = logits.shape
    row_bytes = bitmask_words(vocab) * 4
    packed = torch.frombuffer(bytearray(b"".join(bitmasks)), dtype=torch.uint8)
    packed = packed.view(-1, row_bytes)  # [num_masked_rows, row_bytes]
    allowed = _BYTE_BITS[packed.long()].view(len(packed), row_bytes * 8)[:, :vocab]
    allowed = allowed.to(logits.device, non_blocking=True)  # [num_masked_rows, vocab]
    index = [row + j for row, bitmask in zip(rows, bitmasks)
             for j in range(len(bitmask) // row_bytes)]
    if index == list(range(num_rows)):  # every row constrained, in order
        logits.masked_fill_(~allowed, float("-inf"))
        return
    at = torch.tensor(index, dtype=torch.int64).to(logits.device, non_blocking=True)
    logits.index_copy_(0, at, logits.index_select(0, at).masked_fill_(~allowed, float("-inf")))
