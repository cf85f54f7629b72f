"""Speculative decoding with a draft model (`executors/draft_model.py`): greedy output stays
token-identical to transformers (float32) whatever the draft proposes, in every scheduling
regime; a draft equal to the target gets its drafts accepted; the draft's KV is caught up
incrementally exactly as a fresh start would compute it."""

from __future__ import annotations

import dataclasses
import random

import pytest
from engine_core.executors.draft_model import DraftModelProposer
from engine_core.executors.factory import make_proposer

from engine_core import LLM, SamplingParams
from engine_core.config import EngineArgs, EngineConfig
from engine_core.proposer import DraftRequest
from engine_core.speculative_config import SpeculativeConfig
from tests.test_generate_parity import hf_greedy, make_prompts

MAX_TOKENS = 24
VOCAB = 512  # tests/checkpoints.py


@pytest.fixture(scope="module")
def target(checkpoint_factory) -> str:
    return checkpoint_factory("llama")


@pytest.fixture(scope="module")
def unrelated_draft(checkpoint_factory) -> str:
    """A random model with the target's vocabulary and nothing else in common."""
    return checkpoint_factory("llama", seed=1, num_hidden_layers=2, hidden_size=32,
                              intermediate_size=64)


def _spec(draft: str, k: int = 4) -> dict:
    return {"method": "draft_model", "model": draft, "num_speculative_tokens": k}


def _generate(target: str, draft: str, prompts: list[list[int]],
              **engine_kwargs) -> tuple[list[list[int]], LLM]:
    llm = LLM(target, dtype="float32", device="cpu", speculative_config=_spec(draft),
              **engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs], llm


@pytest.fixture(scope="module")
def plain_case(target):
    prompts = make_prompts(VOCAB, lengths=[1, 5, 17, 40])
    return prompts, hf_greedy(target, prompts, MAX_TOKENS)


def test_draft_equal_to_target_matches_transformers_and_is_accepted(target, plain_case):
    prompts, expected = plain_case
    got, llm = _generate(target, target, prompts)
    spec = llm.engine.stats().spec_decode
    llm.shutdown()
    assert got == expected
    assert spec.num_draft_tokens > 0
    assert spec.num_accepted_tokens >= 0.95 * spec.num_draft_tokens


def test_unrelated_draft_matches_transformers(target, unrelated_draft, plain_case):
    prompts, expected = plain_case
    got, llm = _generate(target, unrelated_draft, prompts)
    spec = llm.engine.stats().spec_decode
    llm.shutdown()
    assert got == expected
    assert spec.num_draft_tokens > 0
    assert spec.num_accepted_tokens < 0.5 * spec.num_draft_tokens


@pytest.mark.parametrize("which", ["target", "unrelated"])
def test_prefix_caching_chunked_prefill_and_preemption_match(target, unrelated_draft, which):
    rng = random.Random(3)
    shared = [rng.randrange(3, VOCAB) for _ in range(40)]
    prompts = [shared + [rng.randrange(3, VOCAB) for _ in range(n)] for n in (1, 7, 20, 33)]
    prompts.append(list(shared))
    expected = hf_greedy(target, prompts, MAX_TOKENS)
    # 8 blocks of 16 per request at most; 9 usable blocks cannot hold the five at once
    llm = LLM(target, dtype="float32", device="cpu",
              speculative_config=_spec(target if which == "target" else unrelated_draft),
              enable_prefix_caching=True, max_num_batched_tokens=24, max_model_len=128,
              num_kv_blocks=10)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    stats = llm.engine.stats()
    blocks = llm.engine.block_manager
    free, usable = blocks.num_free_blocks, blocks.num_usable_blocks
    llm.shutdown()
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert sum(o.num_cached_tokens > 0 for o in outputs) >= 4  # the shared prefix was hit
    assert stats.num_preemptions > 0
    assert stats.spec_decode.num_draft_tokens > 0
    assert free == usable
    if which == "target":
        assert stats.spec_decode.num_accepted_tokens >= 0.95 * stats.spec_decode.num_draft_tokens


def test_pipeline_parallel_in_process_matches(target, unrelated_draft, plain_case):
    prompts, expected = plain_case
    for draft in (target, unrelated_draft):
        got, llm = _generate(target, draft, prompts, pipeline_parallel_size=2,
                             distributed_executor_backend="inprocess")
        spec = llm.engine.stats().spec_decode
        llm.shutdown()
        assert got == expected
        assert spec.num_draft_tokens > 0



def test_seeded_sampling_is_unchanged_by_the_draft(target, plain_case):
    """Greedy drafts verified by sampling: a seeded request draws the same tokens with and
    without speculation (the target samples every draft position as a plain step would)."""
    prompts, _ = plain_case
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=MAX_TOKENS)
              for i in range(len(prompts))]
    got = {}
    for spec in (None, _spec(target)):
        llm = LLM(target, dtype="float32", device="cpu", speculative_config=spec)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
        got[spec is None] = [o.outputs[0].token_ids for o in outputs]
        drafted = llm.engine.stats().spec_decode.num_draft_tokens
        llm.shutdown()
        assert (drafted > 0) == (spec is not None)
    assert got[True] == got[False]


def test_triton_backend_matches(target, unrelated_draft):
    """The draft runs on the target's attention backend (the GPU's layout; on a CPU the
    kernels run under Triton's interpreter, so this stays small)."""
    prompts = make_prompts(VOCAB, lengths=[3, 20])
    expected = hf_greedy(target, prompts, 10)
    for draft in (target, unrelated_draft):
        llm = LLM(target, dtype="float32", device="cpu", attention_backend="triton",
                  speculative_config=_spec(draft, k=3))
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)
        spec = llm.engine.stats().spec_decode
        llm.shutdown()
        assert [o.outputs[0].token_ids for o in outputs] == expected
        assert spec.num_draft_tokens > 0
        assert (spec.num_accepted_tokens == spec.num_draft_tokens) == (draft == target)

# ---- the proposer on its own ------------------------------------------------------------------
def _config(target: str, draft: str, **engine_kwargs) -> EngineConfig:
    return EngineArgs(model=target, dtype="float32", device="cpu",
                      speculative_config=_spec(draft), **engine_kwargs).resolve()


def test_incremental_catch_up_matches_a_fresh_start(target, unrelated_draft):
    """Round after round, a request's tokens grow by some of its drafts and then a token
    that differs from the next draft (or by all of them and one more), and maybe by tokens of
    steps without drafts: the proposer computes
    only the positions after the valid draft KV, and proposes what a proposer starting from
    position 0 does."""
    config = _config(target, unrelated_draft, max_num_batched_tokens=16)
    incremental = DraftModelProposer(config, num_blocks=16)
    fresh = DraftModelProposer(config, num_blocks=16)
    computed: list[int] = []  # tokens per forward of `incremental`'s draft model
    assert incremental.model is not None
    forward = incremental.model.forward

    def counting_forward(input_ids, *args):
        computed.append(len(input_ids))
        return forward(input_ids, *args)

    incremental.model.forward = counting_forward  # type: ignore[method-assign]
    rng = random.Random(5)
    tokens = [rng.randrange(3, VOCAB) for _ in range(37)]
    blocks = list(range(1, 16))  # 240 positions
    k = 4
    catch_up = len(tokens)  # a request it does not know starts at position 0
    for _ in range(8):
        computed.clear()
        request = DraftRequest("r", list(tokens), k, blocks)
        drafts = incremental.propose([request])[0]
        fresh.drop("r")
        assert drafts == fresh.propose([request])[0]
        assert len(drafts) == k
        # the catch-up in forwards of at most 16 tokens, then one token per further draft
        chunks = [16] * (catch_up // 16) + ([catch_up % 16] if catch_up % 16 else [])
        assert computed == [*chunks, 1, 1, 1]
        accepted = rng.randrange(0, k + 1)
        correction = (drafts[accepted] + 1) % VOCAB if accepted < k else 7
        # its draft KV holds the tokens and drafts 1..k-1: valid up to the first rejected
        # draft, or up to the last draft fed back
        valid = len(tokens) + min(accepted, k - 1)
        # then some decode steps without drafts (a paused request)
        tokens += [*drafts[:accepted], correction,
                   *(rng.randrange(3, VOCAB) for _ in range(rng.choice([0, 0, 3])))]
        catch_up = len(tokens) - valid
    incremental.shutdown()
    fresh.shutdown()


def test_drafts_stay_inside_the_blocks_and_the_draft_positions(target, checkpoint_factory):
    short = checkpoint_factory("llama", seed=2, num_hidden_layers=1, max_position_embeddings=64)
    proposer = DraftModelProposer(_config(target, short), num_blocks=9)
    tokens = list(range(3, 63))  # 60 tokens; positions 60, 61, 62 may still be fed
    requests = [
        DraftRequest("a", tokens, 8, [1, 2, 3, 4, 5]),  # 80 positions: the draft's limit binds
        DraftRequest("b", tokens[:30], 8, [6, 7]),  # 32 positions: its blocks bind
        DraftRequest("c", [*tokens, 3, 4, 5, 6, 7], 2, [1, 2, 3, 4, 5]),  # 65 tokens: past it
        DraftRequest("d", tokens[:5], 2, [8]),
    ]
    drafts = proposer.propose(requests)
    proposer.shutdown()
    assert [len(d) for d in drafts] == [5, 3, 0, 2]
    assert all(0 <= t < VOCAB for d in drafts for t in d)


def test_draft_with_another_vocabulary_is_refused(target, checkpoint_factory):
    other = checkpoint_factory("llama", vocab_size=256)
    with pytest.raises(ValueError, match=r"vocabulary \(256 tokens\)"):
        LLM(target, dtype="float32", speculative_config=_spec(other))
    # the proposer checks it too, should a config skip EngineArgs
    config = dataclasses.replace(_config(target, target), speculative=SpeculativeConfig(
        method="draft_model", model=other, num_speculative_tokens=2))
    with pytest.raises(ValueError, match=f"{other}.*256 tokens.*512"):
        DraftModelProposer(config, num_blocks=4)


def test_missing_draft_model_is_refused(target, tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="no-such-model"):
        LLM(target, dtype="float32", speculative_config=_spec(missing))


def test_make_proposer_shuts_the_executor_down_when_the_draft_fails(target, checkpoint_factory):
    class FakeExecutor:
        num_kv_blocks = 4
        shut_down = False

        def shutdown(self) -> None:
            self.shut_down = True

    other = checkpoint_factory("llama", vocab_size=256)
    config = _config(target, target)
    executor = FakeExecutor()
    assert make_proposer(dataclasses.replace(config, speculative=None), executor) is None
    ngram = dataclasses.replace(config, speculative=SpeculativeConfig(
        method="ngram", num_speculative_tokens=2))
    assert make_proposer(ngram, executor) is None
    proposer = make_proposer(config, executor)
    assert isinstance(proposer, DraftModelProposer) and proposer.num_blocks == 4
    proposer.shutdown()
    assert not executor.shut_down
    bad = dataclasses.replace(config, speculative=SpeculativeConfig(
        method="draft_model", model=other, num_speculative_tokens=2))
    with pytest.raises(ValueError, match="vocabulary"):
        make_proposer(bad, executor)
    assert executor.shut_down


def test_engine_process_loads_the_draft(target, plain_case):
    """`pp-engine serve`'s path (`client/core_process.py`, one per data-parallel rank): the
    engine-core process builds its own draft proposer."""
    prompts, expected = plain_case
    llm = LLM(target, dtype="float32", device="cpu", speculative_config=_spec(target),
              engine_process=True)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
        spec = llm.engine.stats().spec_decode
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert spec.num_draft_tokens > 0
    assert spec.num_accepted_tokens >= 0.95 * spec.num_draft_tokens
