"""Prompt-lookup (n-gram) proposals: the tokens that followed the last occurrence of the
request's own suffix.

The last n tokens, for n from `prompt_lookup_max` down to `prompt_lookup_min`, are looked for
earlier in the request's tokens (prompt and output); the longest n that occurs wins, at its most
recent occurrence, and the `max_drafts` tokens after it are the drafts (where they run into the
end, the text is taken to repeat: a match `p` tokens back proposes the last `p` tokens again).
Code, quoted text and a model that repeats itself make this pay; a text that never repeats
costs one scan.
"""

from __future__ import annotations

from engine_core.proposer import DraftRequest, Proposer

__all__ = ["NgramProposer", "propose_ngram"]

# Tokens scanned back from the end at most: a match further back is rarely worth the scan.
MAX_LOOKBACK = 4096


class NgramProposer(Proposer):
    """`Proposer` for `speculative_config.method == "ngram"`."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, requests: list[DraftRequest]) -> list[list[int]]:
        return [propose_ngram(r.token_ids, r.max_drafts, self.min_n, self.max_n)
                for r in requests]


def propose_ngram(token_ids: list[int], max_drafts: int, min_n: int, max_n: int) -> list[int]:
    """The drafts for `token_ids` (see the module docstring); [] when no suffix of length
    min_n..max_n occurred before."""
    num_tokens = len(token_ids)
    if max_drafts < 1 or num_tokens < min_n + 1:
        return []
    start = max(0, num_tokens - MAX_LOOKBACK)
    last = token_ids[-1]
    best_n, best_end = 0, -1  # the longest match so far, ending (exclusive) at best_end
    # Scan the earlier positions of the last token, most recent first; extend each backwards.
    for position in range(num_tokens - 2, start - 1, -1):
        if token_ids[position] != last:
            continue
        n = 1
        while (n < max_n and position - n >= start
               and token_ids[position - n] == token_ids[num_tokens - 1 - n]):
            n += 1
        if n > best_n:
            best_n, best_end = n, position + 1
            if n == max_n:
                break
    if best_n < min_n:
        return []
    # The text from best_end on repeats with period `num_tokens - best_end` if the match holds:
    # continue it past the end (a loop of one token proposes that token again and again).
    period = num_tokens - best_end
    return [token_ids[best_end + i % period] for i in range(max_drafts)]
