"""Speculative decoding with n-gram drafts, end to end: it changes speed, never output.

Tiny random float32 checkpoints and prompts that repeat a pattern (random models also loop), so
drafts are proposed, accepted and rejected (each test asserts that through the spec_decode
stats). Greedy output is token-identical to transformers for every family at PP 1, 2 and 3
(in-process stages; one Ray run lives in test_ray_pipeline.py), under chunked prefill,
preemption, prefix caching, stop tokens, EOS, stop strings, max_tokens, min_tokens and logprobs.
Sampling keeps its distribution (two-sample chi-square against the engine without drafts) and a
seeded request its exact tokens. After every run all KV blocks are free, also after aborts in
the middle of a verification, and the prefix cache holds only blocks of real tokens.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence

import msgspec
import pytest
import torch
from engine_core.executors.factory import make_executor
from engine_core.executors.stage_worker import StageWorker
from engine_core.models import load_tokenizer

from engine_core import LLM, SamplingParams
from engine_core.config import EngineArgs
from engine_core.engine import EngineCore
from engine_core.entrypoints.output_processor import OutputProcessor
from engine_core.messages import (
    EngineCoreOutput,
    EngineCoreRequest,
    SampledToken,
    TokenLogprobs,
)
from tests.checkpoints import make_hf_model
from tests.conftest import FAMILIES
from tests.test_generate_parity import hf_greedy
from tests.test_scheduler_spec import assert_cache_holds_real_tokens
from tests.text_checkpoint import add_tokenizer

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
        "prompt_lookup_min": 1}
MAX_TOKENS = 24


def repeating_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Prompts that share an 8-token prefix (prefix-cache hits), then repeat a pattern of 2 to
    13 tokens a few times; the last is random (its drafts can only come from its output)."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab_size) for _ in range(8)]
    prompts = []
    for size, repeats in ((2, 6), (3, 4), (5, 3), (8, 2), (13, 1)):
        pattern = [rng.randrange(3, vocab_size) for _ in range(size)]
        prompts.append(shared + pattern * repeats + pattern[:size // 2])
    doubled, other = rng.randrange(3, vocab_size), rng.randrange(3, vocab_size)
    # "d d o" three times, then "d": a model that repeats its last token has "o" proposed
    # after "o d d" (rejected)
    prompts.append(shared + [doubled, doubled, other] * 3 + [doubled])
    prompts.append(shared + [rng.randrange(3, vocab_size) for _ in range(30)])
    return prompts


def make_llm(model_dir: str, pp: int = 1, speculate: bool = True, **kwargs) -> LLM:
    """An engine on float32, speculating with SPEC unless told not to; PP > 1 in-process."""
    if speculate:
        kwargs.setdefault("speculative_config", SPEC)
    if pp > 1:
        kwargs.update(pipeline_parallel_size=pp, distributed_executor_backend="inprocess")
    return LLM(model_dir, dtype="float32", **kwargs)


def greedy(max_tokens: int = MAX_TOKENS, **params) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **params)


def token_ids(llm: LLM, prompts: Sequence[Sequence[int]],
              params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params,
                           use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def assert_drafts_accepted_and_rejected(llm: LLM) -> None:
    stats = llm.engine.stats().spec_decode
    assert stats.num_draft_tokens > stats.num_accepted_tokens > 0, stats


def assert_clean(llm: LLM, token_lists: Iterable[Sequence[int]]) -> None:
    """Every KV block free, nothing left in the engine, and every prefix-cache hash that of a
    block of real tokens (`token_lists`: every prompt + output the engine ran)."""
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    assert not engine.scheduler.requests and not engine.in_flight
    assert_cache_holds_real_tokens(engine.block_manager, token_lists)


def record_outputs(llm: LLM) -> list[tuple[list[int], EngineCoreOutput]]:
    """Every EngineCoreOutput the engine core makes from now on, with the drafts its request's
    step verified (appended as the engine steps)."""
    recorded: list[tuple[list[int], EngineCoreOutput]] = []
    scheduler = llm.engine.scheduler
    update = scheduler.update

    def recording_update(batch, output):
        drafts = {item.request_id: list(item.draft_token_ids) for item in batch.cached_requests}
        outputs = update(batch, output)
        recorded.extend((drafts.get(o.request_id, []), o) for o in outputs)
        return outputs

    scheduler.update = recording_update  # type: ignore[method-assign]
    return recorded


def ended_on_an_accepted_draft(recorded: list[tuple[list[int], EngineCoreOutput]]) -> bool:
    """Whether some request finished ("stop") on a token that was an accepted draft."""
    return any(o.finish_reason == "stop" and len(o.new_token_ids) > 1
               and o.new_token_ids == drafts[:len(o.new_token_ids)] for drafts, o in recorded)


@pytest.fixture(scope="module", params=FAMILIES)
def family_case(request, checkpoint_factory):
    model_dir = checkpoint_factory(request.param)
    prompts = repeating_prompts(512)
    return model_dir, prompts, hf_greedy(model_dir, prompts, MAX_TOKENS)


# ---- greedy parity -----------------------------------------------------------------------------
@pytest.mark.parametrize("pp", [1, 2, 3])
def test_greedy_matches_transformers(family_case, pp) -> None:
    """Also the prefix cache: the second round hits blocks the first wrote (with drafts)."""
    model_dir, prompts, expected = family_case
    llm = make_llm(model_dir, pp, block_size=4)
    assert llm.config.scheduler.max_concurrent_batches == pp
    first = token_ids(llm, prompts, greedy())
    again = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(), use_tqdm=False)
    assert first == expected
    assert [o.outputs[0].token_ids for o in again] == expected
    assert all(o.num_cached_tokens > 0 for o in again)
    assert_drafts_accepted_and_rejected(llm)
    assert_clean(llm, [p + e for p, e in zip(prompts, expected)])
    llm.shutdown()


REGIMES = {
    # drafts compete with prompt chunks for a small budget (split over the microbatches)
    "chunked": dict(max_num_batched_tokens=12),
    # 24 blocks of 4 tokens cannot hold the six requests (about 12 blocks each) at once
    "preemption": dict(block_size=4, num_kv_blocks=25, max_model_len=96,
                       max_num_batched_tokens=32),
    "no_prefix_caching": dict(enable_prefix_caching=False, block_size=4),
}


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_matches_transformers_in_every_regime(checkpoint_factory, family, regime,
                                                     pp) -> None:
    model_dir = checkpoint_factory(family)
    prompts = repeating_prompts(512)
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    llm = make_llm(model_dir, pp, **REGIMES[regime])
    assert token_ids(llm, prompts, greedy()) == expected
    if regime == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    assert_drafts_accepted_and_rejected(llm)
    assert_clean(llm, [p + e for p, e in zip(prompts, expected)])
    llm.shutdown()


def test_greedy_matches_transformers_on_the_triton_backend(checkpoint_factory) -> None:
    """The verification step through the Triton attention kernels (interpreted on a CPU: one
    family, they are slow)."""
    model_dir = checkpoint_factory("llama")
    prompts = repeating_prompts(512)
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    llm = make_llm(model_dir, attention_backend="triton", block_size=4)
    assert token_ids(llm, prompts, greedy()) == expected
    assert_drafts_accepted_and_rejected(llm)
    assert_clean(llm, [p + e for p, e in zip(prompts, expected)])
    llm.shutdown()


# ---- where a request ends ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def loop_case(checkpoint_factory):
    """llama, with prompts that end in the model's own greedy loop: its next tokens are drafts
    the target accepts, so a stop token can be one of them."""
    model_dir = checkpoint_factory("llama")
    first = repeating_prompts(512)
    prompts = [p + e[:12] for p, e in zip(first, hf_greedy(model_dir, first, 12))]
    return model_dir, prompts, hf_greedy(model_dir, prompts, MAX_TOKENS)


def stop_index(prompt: list[int], output: list[int]) -> int:
    """Where to end `output` with a stop id: at the latest first occurrence of a token the
    prompt holds (drafts propose it), past the first output (which has no drafts)."""
    firsts = {token: output.index(token) for token in set(output)}
    drafted = [index for token, index in firsts.items() if token in prompt and index >= 1]
    return max(drafted or firsts.values())


@pytest.mark.parametrize("pp", [1, 2])
def test_stop_token_ids_and_max_tokens_end_the_output_where_greedy_does(loop_case, pp) -> None:
    model_dir, prompts, expected = loop_case
    llm = make_llm(model_dir, pp)
    recorded = record_outputs(llm)
    stops = [stop_index(p, e) for p, e in zip(prompts, expected)]
    params = [greedy(stop_token_ids=[e[i]]) for e, i in zip(expected, stops)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for output, e, i in zip(outputs, expected, stops):
        out = output.outputs[0]
        assert (out.token_ids, out.finish_reason, out.stop_reason) == (e[:i + 1], "stop", e[i])
    assert ended_on_an_accepted_draft(recorded)
    lengths = [2, 3, 4, 5, 7, 9, 13]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           [greedy(max_tokens=n) for n in lengths], use_tqdm=False)
    for output, e, n in zip(outputs, expected, lengths):
        assert (output.outputs[0].token_ids, output.outputs[0].finish_reason) == (e[:n], "length")
    assert any(o.finish_reason == "length" and len(o.new_token_ids) > 1 for _, o in recorded)
    assert_drafts_accepted_and_rejected(llm)
    assert_clean(llm, [p + e for p, e in zip(prompts, expected)])
    llm.shutdown()


def test_max_model_len_ends_the_output_where_it_does_without_drafts(loop_case) -> None:
    """No max_tokens: each request runs to max_model_len, its last steps' drafts bounded by
    it."""
    model_dir, prompts, expected = loop_case
    max_model_len = max(len(p) for p in prompts) + 4
    assert all(max_model_len - len(p) <= MAX_TOKENS for p in prompts)
    llm = make_llm(model_dir, max_model_len=max_model_len)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=None),
                           use_tqdm=False)
    for prompt, output, e in zip(prompts, outputs, expected):
        out = output.outputs[0]
        assert (out.token_ids, out.finish_reason) == (e[:max_model_len - len(prompt)], "length")
    assert_drafts_accepted_and_rejected(llm)
    assert_clean(llm, [p + e for p, e in zip(prompts, expected)])
    llm.shutdown()


def test_eos_among_accepted_drafts_ends_the_output(checkpoint_factory, loop_case) -> None:
    """The same weights with an EOS id from a loop (transformers stops there too)."""
    _, prompts, plain = loop_case
    eos = plain[1][stop_index(prompts[1], plain[1])]
    model_dir = checkpoint_factory("llama", eos_token_id=eos)
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    assert expected != plain and expected[1][-1] == eos
    llm = make_llm(model_dir)
    recorded = record_outputs(llm)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    for output in outputs:
        out = output.outputs[0]
        assert out.finish_reason == ("stop" if out.token_ids[-1] == eos else "length")
        assert out.stop_reason is None
    assert ended_on_an_accepted_draft(recorded)
    assert_clean(llm, [p + e for p, e in zip(prompts, expected)])
    llm.shutdown()


def test_min_tokens_gives_what_it_gives_without_drafts(loop_case) -> None:
    """Stop ids are masked until min_tokens outputs: drafts of them are rejected until then."""
    model_dir, prompts, expected = loop_case
    params = [greedy(min_tokens=6, stop_token_ids=[e[0], e[stop_index(p, e)]])
              for p, e in zip(prompts, expected)]
    results = {}
    for speculate in (False, True):
        llm = make_llm(model_dir, speculate=speculate)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
        results[speculate] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason,
                               o.outputs[0].stop_reason) for o in outputs]
        if speculate:
            assert_drafts_accepted_and_rejected(llm)
            assert_clean(llm, [p + r[0] for p, r in zip(prompts, results[True])])
        llm.shutdown()
    assert results[True] == results[False]
    assert all(len(tokens) >= 6 for tokens, _, _ in results[True])
    assert sum(reason == "stop" for _, reason, _ in results[True]) >= 3


# ---- logprobs and streaming ---------------------------------------------------------------------
@pytest.mark.parametrize("params", [
    dict(temperature=0.0),
    dict(temperature=0.8, seed=7, top_k=20, repetition_penalty=1.1),
], ids=["greedy", "seeded"])
def test_logprobs_are_those_without_drafts(checkpoint_factory, params) -> None:
    model_dir = checkpoint_factory("qwen2")
    prompts = repeating_prompts(512)
    sampling = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3, **params)
    outs = {}
    for speculate in (False, True):
        llm = make_llm(model_dir, speculate=speculate)
        outs[speculate] = [o.outputs[0] for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)]
        if speculate:
            assert_drafts_accepted_and_rejected(llm)
        llm.shutdown()
    for plain, spec in zip(outs[False], outs[True]):
        assert spec.token_ids == plain.token_ids
        assert len(spec.logprobs) == len(spec.token_ids)
        for want, got in zip(plain.logprobs, spec.logprobs):
            assert set(got) == set(want)
            for token, logprob in want.items():
                assert abs(got[token].logprob - logprob.logprob) < 1e-5
                assert got[token].rank == logprob.rank
        assert abs(spec.cumulative_logprob - plain.cumulative_logprob) < 1e-4


def test_streamed_outputs_grow_to_the_output_without_drafts(checkpoint_factory) -> None:
    """Stepping the engine as a stream does: every snapshot extends the last one."""
    model_dir = checkpoint_factory("mistral")
    prompts = repeating_prompts(512)
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    llm = make_llm(model_dir, pp=2)
    processor = OutputProcessor(None)
    for i, prompt in enumerate(prompts):
        request = EngineCoreRequest(str(i), prompt, greedy())
        processor.add_request(str(i), None, [request])
        llm.engine.add_request(request)
    seen: dict[str, list[list[int]]] = {str(i): [] for i in range(len(prompts))}
    while llm.engine.has_unfinished_requests():
        changed, to_abort = processor.process(llm.engine.step())
        assert to_abort == []
        for output in changed:
            seen[output.request_id].append(list(output.outputs[0].token_ids))
    for i, e in enumerate(expected):
        snapshots = seen[str(i)]
        assert snapshots[-1] == e
        assert all(later[:len(earlier)] == earlier and len(later) > len(earlier)
                   for earlier, later in itertools.pairwise(snapshots))
    assert any(len(b) - len(a) > 1 for s in seen.values() for a, b in itertools.pairwise(s))
    assert_drafts_accepted_and_rejected(llm)
    assert_clean(llm, [p + e for p, e in zip(prompts, expected)])
    llm.shutdown()


# ---- stop strings ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_model(checkpoint_factory, tmp_path_factory):
    return add_tokenizer(checkpoint_factory("llama"), str(tmp_path_factory.mktemp("spec-tok")))


TEXT_PROMPTS = ["def f(x): return x + x + x + x", "import json\nimport json\nimport",
                "aaaa bbbb aaaa bbbb"]


def test_an_output_of_several_tokens_stops_at_the_token_that_completes_a_stop_string(
        text_model) -> None:
    """The output processor alone: one output of several tokens ends exactly as the same tokens
    one at a time do (token ids, logprobs, text, finish and stop reasons, the abort)."""
    tokenizer = load_tokenizer(text_model)
    ids = tokenizer.encode("ab cd ef gh", add_special_tokens=False)
    assert len(ids) >= 4
    stop = tokenizer.decode(ids[:2])
    logprobs = [TokenLogprobs([t], [-0.5 - t], [1]) for t in ids]
    cases = [  # (stop strings, include them, the core's finish reason with the last token)
        ([stop], False, None), ([stop], True, None), ([stop], False, "length"),
        (["zzz"], False, "length"), ([tokenizer.decode(ids)], False, "length"),
        ([tokenizer.decode(ids)], False, None), ([], False, "stop")]
    for stops, include, finish in cases:
        params = SamplingParams(stop=stops, include_stop_str_in_output=include, logprobs=1)
        results = []
        for outputs in ([EngineCoreOutput("r", [t], logprobs[i:i + 1],
                                          finish if i == len(ids) - 1 else None)
                         for i, t in enumerate(ids)],
                        [EngineCoreOutput("r", ids, logprobs, finish)]):
            processor = OutputProcessor(tokenizer)
            processor.add_request("r", "p", [EngineCoreRequest("r", [5, 6], params)])
            snapshots, aborts = [], []
            for output in outputs:
                changed, to_abort = processor.process([output])
                snapshots += changed
                aborts += to_abort
            out = snapshots[-1].outputs[0]
            results.append((out.token_ids, out.text, out.finish_reason, out.stop_reason,
                            out.logprobs, out.cumulative_logprob, snapshots[-1].finished,
                            aborts))
        one_by_one, at_once = results
        assert at_once[:-1] == one_by_one[:-1], (stops, include, finish)
        # the core is told to stop the sequence unless it has finished it already
        assert at_once[-1] == (one_by_one[-1] if finish is None else [])
    # spelled out for the first case: the tokens after the stop string are dropped
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", "p", [EngineCoreRequest("r", [5, 6], SamplingParams(
        stop=[stop], logprobs=1))])
    (output,), to_abort = processor.process([EngineCoreOutput("r", ids, logprobs)])
    out = output.outputs[0]
    assert (out.token_ids, out.text, out.finish_reason, out.stop_reason) == \
        (ids[:2], "", "stop", stop)
    assert [list(entry) for entry in out.logprobs] == [[ids[0]], [ids[1]]]
    assert to_abort == ["r"] and output.finished


def test_a_stop_string_completed_by_the_last_token_wins_over_max_tokens(text_model) -> None:
    """As in vLLM: the token that reaches max_tokens also completes a stop string, so the text
    ends at the stop string and finish_reason is "stop" (one token or several at once)."""
    tokenizer = load_tokenizer(text_model)
    ids = tokenizer.encode("ab cd ef gh", add_special_tokens=False)
    stop = tokenizer.decode(ids[-2:])
    for outputs in ([EngineCoreOutput("r", [t], None, "length" if i == len(ids) - 1 else None)
                     for i, t in enumerate(ids)], [EngineCoreOutput("r", ids, None, "length")]):
        processor = OutputProcessor(tokenizer)
        processor.add_request("r", "p", [EngineCoreRequest("r", [5, 6], SamplingParams(
            stop=[stop]))])
        for output in outputs:
            changed, to_abort = processor.process([output])
            assert to_abort == []  # the core finished it already
        out = changed[-1].outputs[0]
        assert (out.finish_reason, out.stop_reason) == ("stop", stop)
        assert out.text == tokenizer.decode(ids)[:-len(stop)] and changed[-1].finished


@pytest.mark.parametrize("pp", [1, 2])
def test_stop_strings_end_the_output_where_they_do_without_drafts(text_model, pp) -> None:
    plain_llm = make_llm(text_model, speculate=False)
    llm = make_llm(text_model, pp)
    tokenizer = llm.get_tokenizer()
    base = plain_llm.generate(TEXT_PROMPTS, greedy(), use_tqdm=False)
    prompts, params = [], []
    for output in base:  # stop at each token: at the text up to it, included or not
        ids = output.outputs[0].token_ids
        for i in range(2, 18):
            prompts.append(output.prompt)
            params.append(greedy(max_tokens=MAX_TOKENS if i % 3 else i + 1, logprobs=1,
                                 stop=[tokenizer.decode(ids[:i])],
                                 include_stop_str_in_output=bool(i % 2)))
    recorded = record_outputs(llm)
    want = plain_llm.generate(prompts, params, use_tqdm=False)
    got = llm.generate(prompts, params, use_tqdm=False)
    for w, g in zip(want, got):
        w, g = w.outputs[0], g.outputs[0]
        assert (g.text, g.token_ids, g.finish_reason, g.stop_reason) == \
            (w.text, w.token_ids, w.finish_reason, w.stop_reason)
        assert [list(entry) for entry in g.logprobs] == [list(entry) for entry in w.logprobs]
    assert any(len(o.new_token_ids) > 1 for _, o in recorded)
    assert sum(w.outputs[0].finish_reason == "stop" for w in want) > len(want) // 2
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    plain_llm.shutdown()
    llm.shutdown()


# ---- aborts in the middle of a verification -----------------------------------------------------
def test_aborts_during_a_verification_step_leak_nothing(checkpoint_factory) -> None:
    """Two microbatches in flight (PP 2 in-process): requests are aborted while a step that
    verifies their drafts is in flight, its output then ignored; all blocks come back and the
    prefix cache holds only real tokens."""
    model_dir = checkpoint_factory("llama")
    config = EngineArgs(model=model_dir, dtype="float32", pipeline_parallel_size=2,
                        distributed_executor_backend="inprocess", block_size=4,
                        speculative_config=SPEC).resolve()
    engine = EngineCore(config, make_executor(config))
    prompts = repeating_prompts(512)
    for round_index in range(2):  # the second round hits what the first left in the cache
        for i, prompt in enumerate(prompts):
            engine.add_request(EngineCoreRequest(f"{round_index}-{i}", prompt, greedy()))
        aborted: set[str] = set()
        tokens = {f"{round_index}-{i}": list(p) for i, p in enumerate(prompts)}
        while engine.has_unfinished_requests():
            verifying = [item.request_id for batch, _ in engine.in_flight
                         for item in batch.cached_requests
                         if item.draft_token_ids and item.request_id not in aborted]
            if verifying and len(aborted) < 4:
                engine.abort_requests(verifying[:1])
                aborted.add(verifying[0])
            for output in engine.step():
                tokens[output.request_id] += output.new_token_ids
                if output.request_id in aborted:
                    assert output.new_token_ids == [] and output.finish_reason == "abort"
        assert len(aborted) == 4
        assert not engine.in_flight and not engine.scheduler.requests
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
        assert_cache_holds_real_tokens(engine.block_manager, tokens.values())
    stats = engine.stats().spec_decode
    assert stats.num_draft_tokens > stats.num_accepted_tokens > 0
    engine.shutdown()


def test_a_verification_the_stage_gets_wrong_fails_only_its_request(checkpoint_factory,
                                                                    monkeypatch) -> None:
    """The last stage returns accepted rows that are not the drafts for one request: it fails
    alone (finish_reason "error"), the others match transformers, nothing leaks."""
    model_dir = checkpoint_factory("llama")
    prompts = repeating_prompts(512)
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    real_sample = StageWorker._sample

    def planted(self, step_id, scheduled, hidden, logits_indices):
        output = real_sample(self, step_id, scheduled, hidden, logits_indices)
        for i, request_id in enumerate(output.request_ids):
            if request_id == "0" and i + 1 < len(output.request_ids) \
                    and output.request_ids[i + 1] == "0":  # an accepted draft: change it
                output.sampled[i] = SampledToken(output.sampled[i].token_id + 1)
                break
        return output

    monkeypatch.setattr(StageWorker, "_sample", planted)
    llm = make_llm(model_dir, pp=2, block_size=4)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(), use_tqdm=False)
    failed = outputs[0].outputs[0]
    assert failed.finish_reason == "error" and "not the step's drafts" in failed.error
    assert failed.token_ids == expected[0][:len(failed.token_ids)]
    assert [o.outputs[0].token_ids for o in outputs[1:]] == expected[1:]
    assert_clean(llm, [p + e for p, e in zip(prompts, expected)])
    llm.shutdown()


# ---- sampling: the same distribution, the same seeded tokens ------------------------------------
@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    """A 2-layer llama with 12 tokens, its LM head scaled so that its distributions are peaked
    (drafts get accepted and rejected), and a prompt made of its own greedy loop."""
    path = str(tmp_path_factory.mktemp("spec-vocab12"))
    model = make_hf_model("llama", seed=3, vocab_size=12, num_hidden_layers=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path)
    llm = make_llm(path, speculate=False)
    loop = token_ids(llm, [[3, 4, 5]], greedy(max_tokens=12))[0]
    llm.shutdown()
    return path, [3, 4, 5, *loop]


SAMPLED_TOKENS = 4
NUM_SAMPLES = 3000
# spec: drafts for every request, however many run
SPEC_ALWAYS = {**SPEC, "num_speculative_tokens": 3, "disable_by_batch_size": 100_000}
SAMPLING_CASES = {
    "plain": dict(temperature=1.0),
    "filtered_penalised": dict(temperature=0.9, top_k=4, top_p=0.95, min_p=0.02,
                               repetition_penalty=1.3, frequency_penalty=0.4),
}


def sample_sequences(model_dir: str, prompt: list[int], speculate: bool,
                     params: SamplingParams, count: int, seeded: bool = False
                     ) -> tuple[list[tuple[int, ...]], LLM]:
    """`count` sampled sequences of the prompt: n = count / 4 for four copies of it, or `count`
    requests seeded 0, 1, ... (the engine is returned open). The engine's own seed differs with
    and without speculation, so that unseeded samples are independent (one seed would draw the
    same first tokens in both)."""
    llm = make_llm(model_dir, speculate=speculate, max_num_seqs=512, seed=int(speculate),
                   **({"speculative_config": SPEC_ALWAYS} if speculate else {}))
    if seeded:
        all_params = [_with(params, seed=i) for i in range(count)]
        outputs = llm.generate([{"prompt_token_ids": prompt}] * count, all_params,
                               use_tqdm=False)
    else:
        outputs = llm.generate([{"prompt_token_ids": prompt}] * 4,
                               _with(params, n=count // 4), use_tqdm=False)
    return [tuple(c.token_ids) for o in outputs for c in o.outputs], llm


def _with(params: SamplingParams, **changes) -> SamplingParams:
    return msgspec.structs.replace(params, **changes)


def chi_square_critical(df: int) -> float:
    """The 0.999 quantile of chi-square with `df` degrees of freedom (Wilson-Hilferty: within
    about 1 % of the exact value for df >= 3; scipy is not a dependency). 3.0902 is the standard
    normal's 0.999 quantile."""
    z, h = 3.0902, 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def two_sample_chi_square(a: Counter, b: Counter) -> tuple[float, int]:
    """Whether two samples of equal size come from one distribution: (statistic, degrees of
    freedom). Cells with fewer than 10 observations in both samples together are pooled."""
    total_a, total_b = sum(a.values()), sum(b.values())
    assert total_a == total_b
    cells, small_a, small_b = [], 0, 0
    for key in set(a) | set(b):
        if a[key] + b[key] < 10:
            small_a, small_b = small_a + a[key], small_b + b[key]
        else:
            cells.append((a[key], b[key]))
    if small_a + small_b:
        cells.append((small_a, small_b))
    statistic = sum((x - y) ** 2 / (x + y) for x, y in cells)
    return statistic, len(cells) - 1


def distribution_gap(first: list[tuple[int, ...]], second: list[tuple[int, ...]]
                     ) -> list[tuple[float, float]]:
    """(statistic, 0.999 critical value) for each position's token and for the first pair."""
    views = [lambda s, j=j: s[j] for j in range(SAMPLED_TOKENS)] + [lambda s: s[:2]]
    results = []
    for view in views:
        statistic, df = two_sample_chi_square(Counter(map(view, first)),
                                              Counter(map(view, second)))
        assert df >= 2  # the view varies: the test has something to tell apart
        results.append((statistic, chi_square_critical(df)))
    return results


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_sampling_keeps_its_distribution(small_vocab_model, case) -> None:
    model_dir, prompt = small_vocab_model
    params = SamplingParams(max_tokens=SAMPLED_TOKENS, ignore_eos=True, **SAMPLING_CASES[case])
    plain, llm = sample_sequences(model_dir, prompt, False, params, NUM_SAMPLES)
    llm.shutdown()
    spec, llm = sample_sequences(model_dir, prompt, True, params, NUM_SAMPLES)
    assert_drafts_accepted_and_rejected(llm)
    assert llm.engine.block_manager.num_free_blocks == \
        llm.engine.block_manager.num_usable_blocks
    llm.shutdown()
    assert all(len(s) == SAMPLED_TOKENS for s in plain + spec)
    for statistic, critical in distribution_gap(plain, spec):
        assert statistic < critical, (statistic, critical)


def test_the_chi_square_test_tells_a_different_distribution(small_vocab_model) -> None:
    """The test above has power: a slightly hotter temperature is told apart."""
    model_dir, prompt = small_vocab_model
    base = dict(max_tokens=SAMPLED_TOKENS, ignore_eos=True)
    plain, llm = sample_sequences(model_dir, prompt, False,
                                  SamplingParams(temperature=1.0, **base), NUM_SAMPLES)
    llm.shutdown()
    hotter, llm = sample_sequences(model_dir, prompt, True,
                                   SamplingParams(temperature=1.25, **base), NUM_SAMPLES)
    llm.shutdown()
    assert any(statistic > critical for statistic, critical in distribution_gap(plain, hotter))


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_seeded_requests_give_the_tokens_they_give_without_drafts(small_vocab_model,
                                                                  case) -> None:
    """The verification draws each position with the sampler's own seeded rule, so a seeded
    request's tokens do not depend on the drafts: the same with and without speculation."""
    model_dir, prompt = small_vocab_model
    params = SamplingParams(max_tokens=8, ignore_eos=True, **SAMPLING_CASES[case])
    plain, llm = sample_sequences(model_dir, prompt, False, params, 200, seeded=True)
    llm.shutdown()
    spec, llm = sample_sequences(model_dir, prompt, True, params, 200, seeded=True)
    again = [tuple(o.outputs[0].token_ids) for o in llm.generate(
        [{"prompt_token_ids": prompt}] * 200, [_with(params, seed=i) for i in range(200)],
        use_tqdm=False)]
    assert_drafts_accepted_and_rejected(llm)
    llm.shutdown()
    assert spec == plain
    assert again == spec
    assert len(set(plain)) > 20  # the seeds do sample different sequences
