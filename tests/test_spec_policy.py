"""The adaptive draft rule (`engine_core/spec_policy.py`): how many drafts a request asks for,
and how a request whose drafts keep failing pauses with a doubling backoff."""

from __future__ import annotations

import pytest

from engine_core.spec_policy import (
    INITIAL_ACCEPTANCE,
    MAX_PAUSE_STEPS,
    MIN_ACCEPTANCE,
    DraftHistory,
)


@pytest.mark.parametrize(("acceptance", "k", "expected"), [
    (INITIAL_ACCEPTANCE, 5, 3),  # ceil(0.6 / 0.4) + 1
    (INITIAL_ACCEPTANCE, 2, 2),  # capped at num_speculative_tokens
    (INITIAL_ACCEPTANCE, 1, 1),
    (0.75, 8, 4),  # ceil(3) + 1
    (0.5, 8, 2),
    (0.2, 8, 2),
    (0.0, 8, 1),
    (1.0, 7, 7),  # every draft accepted so far: all it may
])
def test_drafts_asked_for_follow_the_acceptance(acceptance, k, expected) -> None:
    assert DraftHistory(acceptance=acceptance).num_drafts(k) == expected


def test_acceptance_is_an_exponential_average_of_the_verifications() -> None:
    history = DraftHistory()
    history.record(4, 4)
    assert history.acceptance == pytest.approx(0.8)
    history.record(4, 1)
    assert history.acceptance == pytest.approx(0.525)
    history.record(0, 0)  # no drafts: nothing learnt
    assert history.acceptance == pytest.approx(0.525)
    assert history.num_drafts(5) == 3  # ceil(0.525 / 0.475) + 1
    assert history.pause_steps == 0


def fail_until_paused(history: DraftHistory) -> int:
    """Record rejected verifications until the request pauses; returns how many it took."""
    for count in range(1, 10):
        assert history.num_drafts(4) > 0
        history.record(3, 0)
        if history.pause_steps:
            return count
    raise AssertionError("never paused")


def paused_steps(history: DraftHistory) -> int:
    """Decode steps without drafts before the next probe."""
    steps = 0
    while history.num_drafts(4) == 0:
        steps += 1
    return steps


def test_rejections_pause_the_request_for_doubling_numbers_of_steps() -> None:
    history = DraftHistory()
    # 0.6 -> 0.3 -> 0.15 (not below MIN_ACCEPTANCE) -> 0.075: the third rejection pauses
    assert fail_until_paused(history) == 3
    assert history.acceptance == INITIAL_ACCEPTANCE  # the probe after the pause starts afresh
    pauses = []
    for _ in range(9):
        pauses.append(paused_steps(history))  # also consumes the probe's num_drafts call
        history.record(3, 0)
        fail_until_paused(history)
    assert pauses == [1, 2, 4, 8, 16, 32, 64, 64, 64]
    assert MAX_PAUSE_STEPS == 64 and MIN_ACCEPTANCE == 0.15


def test_an_accepted_draft_resets_the_backoff() -> None:
    history = DraftHistory()
    fail_until_paused(history)
    assert paused_steps(history) == 1
    history.record(3, 0)
    fail_until_paused(history)
    assert paused_steps(history) == 2
    history.record(3, 2)  # accepted: the next pause is short again
    assert history.pause_steps == 0 and history.next_pause == 1
    fail_until_paused(history)
    assert paused_steps(history) == 1


def test_a_paused_request_asks_for_no_drafts_whatever_its_limit() -> None:
    history = DraftHistory(pause_steps=2)
    assert [history.num_drafts(k) for k in (1, 32, 5)] == [0, 0, 3]


def test_a_small_batch_asks_for_every_draft_a_larger_one_for_what_it_expects():
    """Up to SMALL_BATCH running requests a draft is a free chance: all k are asked for; in a
    larger batch, the expected accepted run plus one; a pause holds in both."""
    from engine_core.spec_policy import SMALL_BATCH

    history = DraftHistory(acceptance=0.5)
    assert history.num_drafts(6, SMALL_BATCH) == 6
    assert history.num_drafts(6, SMALL_BATCH + 1) == 2  # ceil(0.5 / 0.5) + 1
    assert history.num_drafts(6) == 2  # no batch size given: the larger batch's rule
    history.pause_steps = 1
    assert history.num_drafts(6, 1) == 0
