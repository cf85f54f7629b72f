"""Prompt-lookup drafts (`engine_core/ngram_proposer.py`): the longest suffix match wins, at its
most recent occurrence; drafts running into the end continue the text periodically."""

from __future__ import annotations

import random

import pytest

from engine_core.ngram_proposer import MAX_LOOKBACK, NgramProposer, propose_ngram
from engine_core.proposer import DraftRequest


def reference_ngram(tokens: list[int], max_drafts: int, min_n: int, max_n: int) -> list[int]:
    """The rule written out plainly: for n from max_n down, the latest earlier occurrence of
    the last n tokens (it may overlap them), then the tokens after it, periodically."""
    if max_drafts < 1:
        return []
    for n in range(max_n, min_n - 1, -1):
        suffix = tokens[len(tokens) - n:] if n <= len(tokens) else None
        for end in range(len(tokens) - 1, n - 1, -1):  # the match is tokens[end - n:end]
            if tokens[end - n:end] == suffix:
                period = len(tokens) - end
                return [tokens[end + i % period] for i in range(max_drafts)]
    return []


def test_the_longest_suffix_match_wins_over_a_more_recent_shorter_one() -> None:
    tokens = [5, 1, 2, 3, 4, 9, 2, 3, 6, 1, 2, 3]
    # [1, 2, 3] occurs at 1..3 (followed by 4); [2, 3] more recently at 6..7 (followed by 6)
    assert propose_ngram(tokens, 3, 1, 3) == [4, 9, 2]
    # max_n = 2 caps the match: the most recent [2, 3] wins, and its continuation runs into
    # the end (period 4: 6, 1, 2, 3, 6, ...)
    assert propose_ngram(tokens, 6, 1, 2) == [6, 1, 2, 3, 6, 1]


def test_the_most_recent_occurrence_of_the_longest_match_is_taken() -> None:
    assert propose_ngram([1, 2, 7, 1, 2, 8, 1, 2], 2, 2, 2) == [8, 1]
    assert propose_ngram([1, 2, 7, 1, 2, 8, 1, 2], 2, 1, 4) == [8, 1]


def test_a_match_running_into_the_end_continues_periodically() -> None:
    assert propose_ngram([4, 5, 4, 5, 4], 5, 1, 2) == [5, 4, 5, 4, 5]
    assert propose_ngram([9, 7, 7], 4, 1, 3) == [7, 7, 7, 7]  # a loop of one token
    assert propose_ngram([3, 1, 2, 3], 7, 1, 1) == [1, 2, 3, 1, 2, 3, 1]


def test_min_n_refuses_shorter_matches() -> None:
    tokens = [1, 2, 3, 9, 3]
    assert propose_ngram(tokens, 2, 2, 3) == []  # only [3] occurred before
    assert propose_ngram(tokens, 2, 1, 3) == [9, 3]


@pytest.mark.parametrize("tokens", [[], [5], [1, 2, 3, 4], list(range(50))])
def test_no_match_proposes_nothing(tokens) -> None:
    assert propose_ngram(tokens, 4, 1, 4) == []


def test_max_drafts_bounds_the_proposal() -> None:
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    assert propose_ngram(tokens, 1, 1, 2) == [3]
    assert propose_ngram(tokens, 4, 1, 2) == [3, 4, 5, 6]
    assert propose_ngram(tokens, 0, 1, 2) == []


def test_a_match_further_back_than_the_lookback_is_not_found() -> None:
    filler = list(range(100, 100 + MAX_LOOKBACK - 3))  # no repeats
    within = [7, 8, *filler, 7]  # the earlier 7 is the first of the last MAX_LOOKBACK tokens
    assert len(within) == MAX_LOOKBACK
    assert propose_ngram(within, 2, 1, 1) == [8, 100]
    assert propose_ngram([7, 8, 0, *filler, 7], 2, 1, 1) == []  # one token further back


def test_random_sequences_match_the_plain_rule() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(0, 24))]
        min_n = rng.randrange(1, 4)
        max_n = rng.randrange(min_n, 6)
        max_drafts = rng.randrange(0, 6)
        assert propose_ngram(tokens, max_drafts, min_n, max_n) == \
            reference_ngram(tokens, max_drafts, min_n, max_n), (tokens, min_n, max_n)


def test_the_proposer_answers_each_request_within_its_max_drafts() -> None:
    proposer = NgramProposer(prompt_lookup_min=1, prompt_lookup_max=3)
    got = proposer.propose([DraftRequest("a", [1, 2, 3, 1, 2], 2, []),
                            DraftRequest("b", [1, 2, 3], 5, []),
                            DraftRequest("c", [6, 6], 3, [])])
    assert got == [[3, 1], [], [6, 6, 6]]
    assert proposer.needs_blocks is False
