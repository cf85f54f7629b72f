"""Invariants where data crosses a boundary: whatever the logits, the parameters or a stage
returns, token ids stay in the vocabulary, logprobs stay finite and only the request at fault
fails (issue 18).

The sampler is fed hand-made rows of NaN, +inf, -inf and ties beside clean rows; the engine is
fed planted out-of-range tokens, non-finite logprobs, missing rows and out-of-range block ids.
Each engine test checks the other requests' greedy tokens against a clean run and that every KV
block is back in the pool.
"""

from __future__ import annotations

import math

import pytest
import torch
from engine_core.executors.sampler import LOGPROB_FLOOR, Sampler, SamplingRow
from engine_core.models import load_tokenizer

from engine_core import LLM, SamplingParams, StructuredOutputsParams
from engine_core.invariants import checked_step_output
from engine_core.messages import (
    CachedRequest,
    EngineCoreRequest,
    NewRequest,
    SampledToken,
    StepBatch,
    StepOutput,
    TokenLogprobs,
)
from engine_core.request import Request, RequestStatus
from engine_core.scheduler import Scheduler
from tests.text_checkpoint import add_tokenizer

NAN, INF = float("nan"), float("inf")
VOCAB = 64


def row(prompt=(1, 2, 3), output=(4, 4, 5), stop_ids=(), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prompt), list(output), stop_ids)


def clean_logits(num_rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def hostile_rows() -> torch.Tensor:
    """[6, VOCAB]: one NaN, all NaN, +inf at two ids, -inf but one, all -inf, all tied."""
    rows = clean_logits(6, seed=1)
    rows[0, 7] = NAN
    rows[1, :] = NAN
    rows[2, 9] = rows[2, 30] = INF
    rows[3, :] = -INF
    rows[3, 11] = 0.5
    rows[4, :] = -INF
    rows[5, :] = 2.0
    return rows


def param_id(params: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


# Parameter sets for the rows: greedy, random, seeded random, filtered, penalised, logprobs.
PARAMS = [
    dict(temperature=0),
    dict(temperature=1.0),
    dict(temperature=0.7, seed=11),
    dict(temperature=0.9, top_k=3, top_p=0.5, min_p=0.2, seed=3),
    dict(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=-1),
    dict(temperature=1.0, logprobs=5, seed=5),
    dict(temperature=0, logprobs=20, min_tokens=2),
]


@pytest.mark.parametrize("params", PARAMS, ids=param_id)
def test_hostile_rows_give_ids_in_range_and_leave_the_clean_rows_alone(params) -> None:
    clean = clean_logits(3, seed=2)
    logits = torch.cat([clean[:1], hostile_rows(), clean[1:]])  # clean rows 0, 7, 8
    rows = [row(stop_ids=(1, 2), **params) for _ in range(len(logits))]
    got = Sampler(seed=9)(logits, rows)
    alone = Sampler(seed=9)(clean, [row(stop_ids=(1, 2), **params) for _ in range(3)])

    for i, token in enumerate(got):
        if token.error is not None:
            assert token.token_id == -1
            continue
        assert 0 <= token.token_id < VOCAB, (i, token)
        if token.logprobs is not None:
            assert all(math.isfinite(x) and x >= LOGPROB_FLOOR for x in token.logprobs.logprobs)
            assert all(0 <= t < VOCAB for t in token.logprobs.token_ids)
    # Nothing to pick in the all-NaN and all -inf rows: those two requests alone fail.
    assert [i for i, t in enumerate(got) if t.error is not None] == [2, 5]
    # +inf wins over everything finite; the only finite logit of a -inf row is taken.
    assert got[3].token_id in (9, 30)
    assert got[4].token_id == 11
    # Greedy and seeded rows do not depend on the batch: the clean rows are as if alone.
    if params["temperature"] == 0 or "seed" in params:
        assert [got[i].token_id for i in (0, 7, 8)] == [t.token_id for t in alone]
    if params["temperature"] == 0 and "repetition_penalty" not in params:
        assert got[1].token_id == int(torch.nan_to_num(logits[1], nan=-INF).argmax())
        assert got[6].token_id == 0  # a tie goes to the lowest id


EXTREMES = [
    dict(top_p=1e-320),
    dict(top_p=5e-324, top_k=1, min_p=1.0),
    dict(min_p=1e-45),
    dict(temperature=1e308),
    dict(temperature=3.5e38, top_p=1e-310),
    dict(temperature=1e-5),
    dict(repetition_penalty=1e-300, presence_penalty=-2, frequency_penalty=-2),
    dict(repetition_penalty=5e-324, presence_penalty=2, frequency_penalty=2),
    dict(repetition_penalty=1e308),
    dict(repetition_penalty=3.5e38, top_p=1e-320, logprobs=20),
    dict(temperature=-0.0, presence_penalty=-0.0, repetition_penalty=1e-300, logprobs=3),
]


@pytest.mark.parametrize("params", EXTREMES, ids=param_id)
def test_extreme_valid_parameters_sample_a_token_in_range(params) -> None:
    logits = clean_logits(4, seed=4)
    got = Sampler()(logits, [row(**params) for _ in range(4)])
    for token in got:
        assert token.error is None and 0 <= token.token_id < VOCAB
        if token.logprobs is not None:
            assert all(math.isfinite(x) for x in token.logprobs.logprobs)


def test_a_tiny_top_p_keeps_exactly_the_top_token() -> None:
    logits = clean_logits(5, seed=6)
    got = Sampler()(logits, [row(top_p=1e-320, seed=i) for i in range(5)])
    assert [t.token_id for t in got] == logits.argmax(dim=-1).tolist()


def test_an_overflowing_repetition_penalty_takes_a_seen_token() -> None:
    """1e-300 makes the seen tokens' positive logits +inf: the row is greedy among them."""
    logits = clean_logits(1, seed=7).abs()  # every logit positive
    got = Sampler()(logits, [row(prompt=(20,), output=(40, 41), repetition_penalty=1e-300)])
    assert got[0].token_id in (20, 40, 41)


def test_logprobs_of_minus_inf_logits_are_floored() -> None:
    logits = torch.full((1, VOCAB), -INF)
    logits[0, :3] = torch.tensor([1.0, 0.5, 0.0])
    got = Sampler()(logits, [row(temperature=0, logprobs=10)])[0]
    assert got.token_id == 0 and len(got.logprobs.logprobs) == 11
    assert got.logprobs.logprobs[4:] == [LOGPROB_FLOOR] * 7


# ---- the engine's check of a step's output ----------------------------------------------------
def _batch_and_requests(num: int = 3):
    scheduler_requests = {}
    new = []
    for i in range(num):
        core = EngineCoreRequest(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=4))
        request = Request(core, max_model_len=32)
        request.status = RequestStatus.RUNNING
        scheduler_requests[core.request_id] = request
        new.append(NewRequest(core.request_id, [1, 2, 3], [], core.sampling_params, [], [1], 0, 3))
    return StepBatch(7, new, [], []), scheduler_requests


def test_checked_output_turns_each_broken_row_into_that_requests_error() -> None:
    batch, requests = _batch_and_requests(4)
    nan_logprobs = TokenLogprobs([5], [NAN], [1])
    output = StepOutput(7, ["r0", "r1", "r2", "ghost", "r0"], [
        SampledToken(5),
        SampledToken(VOCAB),  # outside the vocabulary
        SampledToken(3, nan_logprobs),
        SampledToken(1),  # not in the batch: dropped
        SampledToken(6),  # r0 twice: dropped
    ])  # and r3 got no row although it reached the end of its tokens
    checked = checked_step_output(batch, output, requests, VOCAB)
    assert checked.request_ids == ["r0", "r1", "r2", "r3"]
    assert checked.sampled[0] == SampledToken(5)
    for token in checked.sampled[1:]:
        assert token.token_id == -1 and token.error


def test_checked_output_skips_chunks_that_sample_nothing() -> None:
    core = EngineCoreRequest("long", list(range(1, 20)), SamplingParams())
    request = Request(core, max_model_len=32)
    request.status = RequestStatus.RUNNING
    batch = StepBatch(0, [], [CachedRequest("long", [], [], 0, 8)], [])  # a prefill chunk
    checked = checked_step_output(batch, StepOutput(0, [], []), {"long": request}, VOCAB)
    assert checked.request_ids == []


def _verifying_batch(drafts_of: dict[str, list[int]]):
    """A batch of decode steps of prompt [1, 2, 3] + output [4], each verifying its drafts."""
    requests, cached = {}, []
    for request_id, drafts in drafts_of.items():
        request = Request(EngineCoreRequest(request_id, [1, 2, 3], SamplingParams(max_tokens=9)),
                          max_model_len=32)
        request.append_token(4)
        request.status = RequestStatus.RUNNING
        requests[request_id] = request
        cached.append(CachedRequest(request_id, [4], [], 3, 1 + len(drafts), list(drafts)))
    return StepBatch(3, [], cached, []), requests


@pytest.mark.parametrize(("rows", "error"), [
    ([5, 6, 7, 8], "4 tokens for a step with 2 drafts"),  # more rows than 1 + drafts
    ([6, 9], "not the step's drafts"),  # an accepted row that is not the first draft
    ([5, 7, 9], "not the step's drafts"),  # the second accepted row is not the second draft
    ([5, VOCAB], "outside the vocabulary"),  # the target's token out of range
])
def test_rows_that_break_the_draft_rule_fail_only_their_request(rows, error) -> None:
    batch, requests = _verifying_batch({"ok": [5, 6], "bad": [5, 6], "plain": []})
    output = StepOutput(3, ["ok", "ok", "bad"] + ["bad"] * (len(rows) - 1) + ["plain"],
                        [SampledToken(5), SampledToken(11), *map(SampledToken, rows),
                         SampledToken(12)])
    checked = checked_step_output(batch, output, requests, VOCAB)
    assert checked.request_ids == ["ok", "ok", "bad", "plain"]
    assert [t.token_id for t in checked.sampled] == [5, 11, -1, 12]
    assert error in checked.sampled[2].error


@pytest.mark.parametrize("rows", [[9], [5, 9], [5, 6, 9], [5, 6]])
def test_rows_within_the_draft_rule_pass(rows) -> None:
    batch, requests = _verifying_batch({"a": [5, 6]})
    output = StepOutput(3, ["a"] * len(rows), [SampledToken(t) for t in rows])
    checked = checked_step_output(batch, output, requests, VOCAB)
    assert checked.request_ids == ["a"] * len(rows)
    assert [t.token_id for t in checked.sampled] == rows


def test_two_rows_for_a_step_without_drafts_fail_its_request() -> None:
    batch, requests = _verifying_batch({"a": [], "b": [7]})
    output = StepOutput(3, ["a", "a", "b"], [SampledToken(5), SampledToken(6), SampledToken(8)])
    checked = checked_step_output(batch, output, requests, VOCAB)
    assert checked.request_ids == ["a", "b"]
    assert checked.sampled[0].token_id == -1 and "0 drafts" in checked.sampled[0].error
    assert checked.sampled[1] == SampledToken(8)


def test_an_error_in_an_accepted_row_fails_the_request_with_that_error() -> None:
    batch, requests = _verifying_batch({"a": [5, 6], "b": [5]})
    output = StepOutput(3, ["a", "a", "b", "b"], [
        SampledToken(5), SampledToken(-1, error="sampling failed: boom"),
        SampledToken(5), SampledToken(7)])
    checked = checked_step_output(batch, output, requests, VOCAB)
    assert checked.request_ids == ["a", "b", "b"]
    assert checked.sampled[0] == SampledToken(-1, error="sampling failed: boom")
    assert [t.token_id for t in checked.sampled[1:]] == [5, 7]


def test_a_malformed_output_fails_the_step() -> None:
    batch, requests = _batch_and_requests(1)
    with pytest.raises(RuntimeError, match="step 8"):
        checked_step_output(batch, StepOutput(8, ["r0"], [SampledToken(1)]), requests, VOCAB)
    with pytest.raises(RuntimeError, match="1 request ids and 0 tokens"):
        checked_step_output(batch, StepOutput(7, ["r0"], []), requests, VOCAB)


# ---- end to end, with a real model --------------------------------------------------------------
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPTS = ["def hello(world):", "import json\n", "class Foo(object):"]
MARKED = 666  # the seed that marks the request a test plants a fault in


@pytest.fixture(scope="module")
def text_model(checkpoint_factory, tmp_path_factory):
    return add_tokenizer(checkpoint_factory("llama"), str(tmp_path_factory.mktemp("inv-tok")))


@pytest.fixture(scope="module")
def reference(text_model):
    llm = LLM(text_model, dtype="float32")
    out = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    llm.shutdown()
    return out


def _assert_sound(llm: LLM, reference) -> None:
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    assert not engine.scheduler.requests and not engine.in_flight
    again = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == reference


def _run_with_marked(llm: LLM, reference, **marked_params):
    marked = SamplingParams(temperature=0.8, seed=MARKED, max_tokens=10, ignore_eos=True,
                            **marked_params)
    outputs = llm.generate([*PROMPTS, "x = 1"], [GREEDY, GREEDY, GREEDY, marked], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs[:3]] == reference
    return outputs[3].outputs[0]


@pytest.mark.parametrize("pp", [1, 2])
def test_a_sampled_id_outside_the_vocabulary_fails_only_its_request(
        text_model, reference, monkeypatch, pp) -> None:
    real_call = Sampler.__call__

    def planted(self, logits, rows):
        tokens = real_call(self, logits, rows)
        return [SampledToken(logits.shape[1] + 5) if r.params.seed == MARKED and len(
            r.output_token_ids) == 2 else t for t, r in zip(tokens, rows)]

    monkeypatch.setattr(Sampler, "__call__", planted)
    llm = LLM(text_model, dtype="float32", pipeline_parallel_size=pp,
              distributed_executor_backend="inprocess")
    failed = _run_with_marked(llm, reference)
    assert failed.finish_reason == "error" and len(failed.token_ids) == 2
    assert "outside the vocabulary" in failed.error
    _assert_sound(llm, reference)
    llm.shutdown()


@pytest.mark.parametrize("pp", [1, 2])
def test_a_block_id_outside_the_cache_drops_the_request_on_every_stage(
        text_model, reference, monkeypatch, pp) -> None:
    real_build = Scheduler._build_batch

    def planted(self, scheduled):
        batch = real_build(self, scheduled)
        for cached in batch.cached_requests:
            request = self.requests[cached.request_id]
            if request.sampling_params.seed == MARKED and request.num_output_tokens == 3:
                cached.new_block_ids.append(10**6)
        return batch

    monkeypatch.setattr(Scheduler, "_build_batch", planted)
    llm = LLM(text_model, dtype="float32", pipeline_parallel_size=pp,
              distributed_executor_backend="inprocess", block_size=4)
    failed = _run_with_marked(llm, reference)
    assert failed.finish_reason == "error"
    assert "block ids must be in" in failed.error
    assert len(failed.token_ids) == 3
    _assert_sound(llm, reference)
    llm.shutdown()


def test_a_position_past_the_block_table_fails_only_its_request(
        text_model, reference, monkeypatch) -> None:
    real_build = Scheduler._build_batch

    def planted(self, scheduled):
        batch = real_build(self, scheduled)
        for new in batch.new_requests:
            if new.sampling_params.seed == MARKED:
                new.block_ids.clear()  # positions with no block to write their KV to
        return batch

    monkeypatch.setattr(Scheduler, "_build_batch", planted)
    llm = LLM(text_model, dtype="float32")
    failed = _run_with_marked(llm, reference)
    assert failed.finish_reason == "error" and "KV blocks of" in failed.error
    _assert_sound(llm, reference)
    llm.shutdown()


@pytest.mark.parametrize("params", [
    dict(top_p=1e-320),
    dict(repetition_penalty=1e-300, presence_penalty=-2, frequency_penalty=-2),
    dict(repetition_penalty=1e308, logprobs=5),
    dict(temperature=1e308, top_p=1e-320, logprobs=20),
], ids=["top_p", "penalties", "big_penalty", "big_temperature"])
def test_the_reported_bodies_now_generate(text_model, reference, params) -> None:
    """The issue's reproductions killed the engine: now they generate, and so does the rest."""
    llm = LLM(text_model, dtype="float32")
    extreme = SamplingParams(max_tokens=4, **params)
    outputs = llm.generate([*PROMPTS, "x"], [GREEDY, GREEDY, GREEDY, extreme], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs[:3]] == reference
    out = outputs[3].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    if out.logprobs is not None:
        assert all(math.isfinite(lp.logprob) for step in out.logprobs for lp in step.values())
    _assert_sound(llm, reference)
    llm.shutdown()


def test_a_dropped_step_leaves_no_unwritten_kv_in_the_prefix_cache(
        text_model, reference, monkeypatch) -> None:
    """The marked request's prompt step is dropped at the stage (nothing written), yet its
    blocks were hashed when allocated: a later request with the same prompt must not hit them."""
    prompt = {"prompt_token_ids": [1 + (5 * j) % 97 for j in range(40)]}
    clean_llm = LLM(text_model, dtype="float32", block_size=4, enable_prefix_caching=False)
    expected = clean_llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    clean_llm.shutdown()
    real_build = Scheduler._build_batch

    def planted(self, scheduled):
        batch = real_build(self, scheduled)
        for new in batch.new_requests:
            if new.sampling_params.seed == MARKED:
                new.block_ids[-1] = 10**6
        return batch

    monkeypatch.setattr(Scheduler, "_build_batch", planted)
    llm = LLM(text_model, dtype="float32", block_size=4, enable_prefix_caching=True)
    marked = SamplingParams(temperature=0, seed=MARKED, max_tokens=10, ignore_eos=True)
    failed = llm.generate([prompt], marked, use_tqdm=False)[0].outputs[0]
    assert failed.finish_reason == "error" and failed.token_ids == []
    again = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == expected
    assert again.num_cached_tokens == 0
    _assert_sound(llm, reference)
    llm.shutdown()


# ---- structured outputs: the bitmask and the tokens under it -----------------------------------
CONSTRAINED = {"structured_outputs": StructuredOutputsParams(regex=r"[a-z]{30}")}


@pytest.mark.parametrize("pp", [1, 2])
def test_a_bitmask_of_the_wrong_size_fails_only_its_request(
        text_model, reference, monkeypatch, pp) -> None:
    real_build = Scheduler._build_batch

    def planted(self, scheduled):
        batch = real_build(self, scheduled)
        for cached in batch.cached_requests:
            if self.requests[cached.request_id].num_output_tokens == 3 and cached.token_bitmask:
                cached.token_bitmask = cached.token_bitmask[:-4]
        return batch

    monkeypatch.setattr(Scheduler, "_build_batch", planted)
    llm = LLM(text_model, dtype="float32", pipeline_parallel_size=pp,
              distributed_executor_backend="inprocess")
    failed = _run_with_marked(llm, reference, **CONSTRAINED)
    assert failed.finish_reason == "error" and "token bitmask of" in failed.error
    assert len(failed.token_ids) == 3
    _assert_sound(llm, reference)
    llm.shutdown()


def test_a_token_the_grammar_forbids_fails_only_its_request(
        text_model, reference, monkeypatch) -> None:
    """The last stage broke the bitmask (here: the sampler swaps in "{"): the request fails
    without keeping the token, the others go on."""
    real_call = Sampler.__call__
    brace = load_tokenizer(text_model).backend.token_to_id("{")

    def planted(self, logits, rows):
        tokens = real_call(self, logits, rows)
        return [SampledToken(brace) if r.params.seed == MARKED and len(r.output_token_ids) == 2
                else t for t, r in zip(tokens, rows)]

    monkeypatch.setattr(Sampler, "__call__", planted)
    llm = LLM(text_model, dtype="float32")
    failed = _run_with_marked(llm, reference, **CONSTRAINED)
    assert failed.finish_reason == "error"
    assert "breaks the request's structured_outputs constraint" in failed.error
    assert len(failed.token_ids) == 2 and brace not in failed.token_ids
    _assert_sound(llm, reference)
    llm.shutdown()
