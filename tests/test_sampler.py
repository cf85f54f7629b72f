"""The sampler, each behaviour checked against a direct (naive, per-row) computation."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import pytest
import torch
from engine_core.executors.sampler import (
    Sampler,
    SamplingRow,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
)

from engine_core.sampling_params import SamplingParams


def make_row(
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    stop_ids: tuple[int, ...] = (),
    **params: object,
) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prompt), list(output), stop_ids)


def random_logits(num_rows: int, vocab: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab, generator=generator) * scale


def allowed_tokens(
    logits: Sequence[float], temperature: float, top_k: int, top_p: float, min_p: float
) -> set[int]:
    """The tokens a random row may draw, computed directly in float64 (vLLM V1 order)."""
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    probs = [math.exp(x - top) for x in scaled]
    probs = [q / sum(probs) for q in probs]
    kept = [t for t, q in enumerate(probs) if q >= min_p * max(probs)]
    kept.sort(key=lambda t: -probs[t])
    if top_k > 0:
        kept = kept[:top_k]
    mass, total, nucleus = 0.0, sum(probs[t] for t in kept), []
    for t in kept:
        if mass >= top_p:
            break
        nucleus.append(t)
        mass += probs[t] / total
    return set(nucleus)


def naive_penalties(logits: list[float], row: SamplingRow) -> list[float]:
    p = row.params
    seen = set(row.prompt_token_ids) | set(row.output_token_ids)
    counts = Counter(row.output_token_ids)
    out = []
    for token, x in enumerate(logits):
        if token in seen:
            x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        x -= p.frequency_penalty * counts[token]
        x -= p.presence_penalty * (counts[token] > 0)
        out.append(x)
    return out


# --- greedy ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = random_logits(16, 300).to(dtype)
    tokens = Sampler()(logits, [make_row(temperature=0) for _ in range(16)])
    assert [t.token_id for t in tokens] == logits.float().argmax(dim=-1).tolist()
    assert all(t.logprobs is None for t in tokens)


def test_greedy_rows_in_a_mixed_batch_are_argmax() -> None:
    logits = random_logits(8, 300)
    rows = [make_row(temperature=0 if i % 2 else 1.0, top_k=i) for i in range(8)]
    tokens = Sampler()(logits, rows)
    expected = logits.argmax(dim=-1).tolist()
    assert [tokens[i].token_id for i in (1, 3, 5, 7)] == [expected[i] for i in (1, 3, 5, 7)]


def test_input_logits_are_not_modified() -> None:
    logits = random_logits(4, 50)
    before = logits.clone()
    rows = [
        make_row(temperature=0, output=[1, 2], repetition_penalty=1.5),
        make_row(output=[3], stop_ids=(4,), min_tokens=5, frequency_penalty=1.0),
        make_row(top_k=5, top_p=0.5, min_p=0.1, logprobs=2),
        make_row(temperature=0.3, seed=1),
    ]
    Sampler()(logits, rows)
    assert torch.equal(logits, before)


def test_batch_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="logits must be"):
        Sampler()(random_logits(3, 10), [make_row()])
    assert Sampler()(torch.empty(0, 10), []) == []


# --- logprobs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_come_from_raw_logits(dtype: torch.dtype) -> None:
    logits = random_logits(7, 200, seed=3).to(dtype)
    rows = [
        make_row(temperature=0, logprobs=0),
        make_row(temperature=0, logprobs=5, output=[1, 1, 2], repetition_penalty=1.7),
        make_row(temperature=1.5, logprobs=3, frequency_penalty=1.0, output=[5, 6]),
        make_row(temperature=2.0, logprobs=20, top_k=50, top_p=0.9, seed=4),
        make_row(temperature=0.7, logprobs=None),
        make_row(temperature=5.0, logprobs=1, min_p=0.05),
        make_row(temperature=0, logprobs=2, stop_ids=(0,), min_tokens=1),
    ]
    tokens = Sampler(seed=1)(logits, rows)
    reference = torch.log_softmax(logits.float(), dim=-1)  # [7, 200]
    for row, token, ref in zip(rows, tokens, reference):
        k = row.params.logprobs
        if k is None:
            assert token.logprobs is None
            continue
        lp = token.logprobs
        assert lp is not None
        assert len(lp.token_ids) == len(lp.logprobs) == len(lp.ranks) == k + 1
        assert lp.token_ids[0] == token.token_id
        assert lp.ranks[0] == 1 + int((ref > ref[token.token_id]).sum())
        top = ref.topk(k)
        assert lp.token_ids[1:] == top.indices.tolist()
        assert lp.ranks[1:] == list(range(1, k + 1))
        expected = [ref[token.token_id].item(), *top.values.tolist()]
        assert lp.logprobs == pytest.approx(expected, abs=1e-6)


def test_logprob_rank_of_a_non_top_token() -> None:
    # min_tokens masks the best token, so greedy picks the runner-up: rank 2 in the raw logits.
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    [token] = Sampler()(logits, [make_row(temperature=0, logprobs=1, stop_ids=(1,), min_tokens=1)])
    assert token.token_id == 2
    assert token.logprobs is not None
    assert token.logprobs.token_ids == [2, 1]
    assert token.logprobs.ranks == [2, 1]


def test_more_logprobs_than_the_vocabulary_returns_them_all() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0], [1.0, 0.0, 0.5]])
    rows = [make_row(temperature=0, logprobs=20), make_row(temperature=0, logprobs=2)]
    first, second = Sampler()(logits, rows)
    assert first.logprobs.token_ids == [1, 1, 2, 0] and first.logprobs.ranks == [1, 1, 2, 3]
    assert second.logprobs.token_ids == [0, 0, 2]


# --- filters and temperature -------------------------------------------------------------------

# Distinct probabilities, none tied, with the top-p / min-p boundaries far from any cut.
FILTER_PROBS = [0.30, 0.20, 0.15, 0.10, 0.08, 0.055, 0.045, 0.03, 0.02, 0.012, 0.005, 0.003]
FILTER_LOGITS = [math.log(q) for q in FILTER_PROBS]


@pytest.mark.parametrize(
    "filters",
    [
        {"top_k": 4},
        {"top_p": 0.6},
        {"top_p": 0.9, "temperature": 0.8},
        {"min_p": 0.25},
        {"min_p": 0.1, "temperature": 1.3},
        {"top_k": 6, "top_p": 0.75},
        {"min_p": 0.3, "top_p": 0.6},
        {"top_k": 1},
        {"top_k": 3, "min_p": 0.6},
    ],
)
@pytest.mark.parametrize("seeded", [False, True])
def test_filters_draw_exactly_the_allowed_tokens(filters: dict, seeded: bool) -> None:
    num_draws = 3000
    logits = torch.tensor([FILTER_LOGITS] * num_draws)
    rows = [make_row(seed=i if seeded else None, **filters) for i in range(num_draws)]
    drawn = Counter(t.token_id for t in Sampler(seed=2)(logits, rows))
    p = rows[0].params
    allowed = allowed_tokens(FILTER_LOGITS, p.temperature, p.top_k, p.top_p, p.min_p)
    assert set(drawn) == allowed


def test_top_k_top_p_and_min_p_masks_match_direct_computation() -> None:
    logits = random_logits(40, 64, seed=5)
    generator = torch.Generator().manual_seed(6)
    top_k = torch.randint(1, 65, (40,), generator=generator)
    top_p = torch.rand(40, generator=generator) * 0.95 + 0.05
    min_p = torch.rand(40, generator=generator) * 0.2
    masked = apply_top_k_top_p(apply_min_p(logits.clone(), min_p), top_k, top_p)
    for i in range(40):
        row = logits[i].tolist()
        expected = allowed_tokens(row, 1.0, int(top_k[i]), float(top_p[i]), float(min_p[i]))
        kept = set(torch.nonzero(masked[i] > float("-inf")).flatten().tolist())
        assert kept == expected, i
        assert torch.equal(masked[i, list(kept)], logits[i, list(kept)])


def test_top_k_alone_and_off_values() -> None:
    logits = random_logits(3, 20, seed=7)
    masked = apply_top_k_top_p(logits.clone(), torch.tensor([1, 5, 20]), None)
    assert (masked > float("-inf")).sum(dim=-1).tolist() == [1, 5, 20]
    assert torch.equal(apply_top_k_top_p(logits.clone(), None, torch.ones(3)), logits)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("seeded", [False, True])
def test_frequencies_follow_softmax_over_temperature(temperature: float, seeded: bool) -> None:
    num_draws = 20_000
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 0.8])
    logits = base.expand(num_draws, -1)
    rows = [
        make_row(temperature=temperature, seed=i + 1000 if seeded else None)
        for i in range(num_draws)
    ]
    drawn = Counter(t.token_id for t in Sampler(seed=3)(logits, rows))
    expected = torch.softmax(base.double() / temperature, dim=-1).tolist()
    chi_square = sum(
        (drawn[t] - num_draws * q) ** 2 / (num_draws * q) for t, q in enumerate(expected)
    )
    assert chi_square < 20.5  # the 0.999 quantile for 5 degrees of freedom


# --- penalties and min_tokens ------------------------------------------------------------------


def test_penalties_match_naive_computation() -> None:
    vocab = 40
    generator = torch.Generator().manual_seed(8)
    logits = random_logits(12, vocab, seed=9)
    settings = [
        {},
        {"repetition_penalty": 1.8},
        {"repetition_penalty": 0.6},
        {"frequency_penalty": 0.7},
        {"presence_penalty": -1.2},
        {"repetition_penalty": 1.3, "frequency_penalty": -0.4, "presence_penalty": 1.5},
    ]
    rows = []
    for i in range(12):
        prompt = torch.randint(
            0, vocab, (int(torch.randint(0, 30, (1,), generator=generator)),), generator=generator
        ).tolist()
        output = torch.randint(0, vocab // 3, (i * 3,), generator=generator).tolist()
        rows.append(make_row(prompt=prompt, output=output, **settings[i % len(settings)]))
    penalised = apply_penalties(logits.clone(), rows)
    for i, row in enumerate(rows):
        expected = torch.tensor(naive_penalties(logits[i].tolist(), row))
        torch.testing.assert_close(penalised[i], expected, rtol=1e-6, atol=1e-6)
    unpenalised = [i for i, row in enumerate(rows) if not row.has_penalties]
    assert torch.equal(penalised[unpenalised], logits[unpenalised])


def test_greedy_sampling_uses_penalised_logits() -> None:
    logits = random_logits(6, 30, seed=10)
    rows = [
        make_row(
            temperature=0,
            prompt=[int(logits[i].argmax())],
            output=[1, 1, 2],
            repetition_penalty=3.0,
            frequency_penalty=0.5,
            presence_penalty=0.5,
        )
        for i in range(6)
    ]
    tokens = Sampler()(logits, rows)
    for i, (row, token) in enumerate(zip(rows, tokens)):
        penalised = naive_penalties(logits[i].tolist(), row)
        assert token.token_id == max(range(30), key=penalised.__getitem__)


def test_min_tokens_masks_stop_ids() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 1.5, 8.0]]).expand(4, -1)
    stop = (3, 5)
    rows = [
        make_row(temperature=0, stop_ids=stop, min_tokens=2, output=[]),
        make_row(temperature=0, stop_ids=stop, min_tokens=2, output=[1]),
        make_row(temperature=0, stop_ids=stop, min_tokens=2, output=[1, 1]),
        make_row(temperature=0, stop_ids=(), min_tokens=2, output=[]),
    ]
    assert [t.token_id for t in Sampler()(logits, rows)] == [2, 2, 3, 3]

    # Random rows at a high temperature would draw the stop ids often; masked, never.
    many = torch.tensor([[0.0, 1.0, 2.0, 9.0, 1.5, 8.0]]).expand(2000, -1)
    rows = [make_row(temperature=5.0, stop_ids=stop, min_tokens=1) for _ in range(2000)]
    drawn = Counter(t.token_id for t in Sampler()(many, rows))
    assert set(drawn) == {0, 1, 2, 4}


# --- seeds -------------------------------------------------------------------------------------


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    vocab = 1000
    target = random_logits(1, vocab, seed=11, scale=0.5)  # flat-ish: the noise decides
    for seed in range(20):
        output = list(range(seed % 5))
        alone = Sampler(seed=0)(target, [make_row(seed=seed, output=output, temperature=0.9)])

        others = random_logits(5, vocab, seed=100 + seed)
        logits = torch.cat([others[:2], target, others[2:]])  # the seeded row third
        rows = [
            make_row(),
            make_row(seed=seed + 1, top_k=10),
            make_row(seed=seed, output=output, temperature=0.9),
            make_row(temperature=0, logprobs=3),
            make_row(top_p=0.5, min_p=0.1, repetition_penalty=1.2, output=[1, 2, 3]),
            make_row(seed=seed, output=[*output, 7], temperature=0.9),
        ]
        in_batch = Sampler(seed=12345)(logits, rows)
        assert in_batch[2].token_id == alone[0].token_id


def test_seeded_rows_survive_recompute() -> None:
    # After preemption the request resumes with the same outputs: same (seed, position), same token.
    logits = random_logits(1, 500, seed=12, scale=0.3)
    first = Sampler(seed=1)(logits, [make_row(seed=42, output=[5, 6, 7])])
    again = Sampler(seed=2)(logits, [make_row(seed=42, output=[5, 6, 7])])
    assert first == again


def test_different_seeds_and_positions_draw_differently() -> None:
    logits = random_logits(1, 500, seed=13, scale=0.3).expand(50, -1)
    by_seed = Sampler()(logits, [make_row(seed=s) for s in range(50)])
    by_position = Sampler()(logits, [make_row(seed=7, output=[0] * n) for n in range(50)])
    assert len({t.token_id for t in by_seed}) > 30
    assert len({t.token_id for t in by_position}) > 30


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    logits = random_logits(32, 500, seed=14, scale=0.3)
    rows = [make_row() for _ in range(32)]
    assert Sampler(seed=5)(logits, rows) == Sampler(seed=5)(logits, rows)
    assert Sampler(seed=5)(logits, rows) != Sampler(seed=6)(logits, rows)
