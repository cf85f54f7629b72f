"""Greedy generation matches transformers token for token (float32), in every scheduling regime."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_core import LLM, SamplingParams
from tests.conftest import FAMILIES

PROMPT_LENGTHS = [1, 5, 17, 64, 150, 300]
MAX_TOKENS = 24


def make_prompts(vocab_size: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


def hf_greedy(model_dir: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one at a time (no padding)."""
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    results = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_tokens,
                pad_token_id=0,
            )
            results.append(out[0, len(prompt) :].tolist())
    return results


def engine_greedy(
    model_dir: str, prompts: list[list[int]], max_tokens: int, **engine_kwargs
) -> tuple[list[list[int]], LLM]:
    llm = LLM(model_dir, dtype="float32", **engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs], llm


@pytest.fixture(scope="module", params=FAMILIES)
def family_case(request, checkpoint_factory):
    model_dir = checkpoint_factory(request.param)
    from engine_core.models import load_model_config

    prompts = make_prompts(load_model_config(model_dir).vocab_size)
    return model_dir, prompts, hf_greedy(model_dir, prompts, MAX_TOKENS)


def test_greedy_matches_transformers(family_case):
    model_dir, prompts, expected = family_case
    got, llm = engine_greedy(model_dir, prompts, MAX_TOKENS)
    llm.shutdown()
    assert got == expected


def test_chunked_prefill_matches(family_case):
    model_dir, prompts, expected = family_case
    got, llm = engine_greedy(model_dir, prompts, MAX_TOKENS, max_num_batched_tokens=48)
    llm.shutdown()
    assert got == expected


def test_preemption_matches(family_case):
    model_dir, prompts, expected = family_case
    # 512 tokens per request at most (32 blocks); 40 blocks cannot hold all six requests at once
    got, llm = engine_greedy(
        model_dir,
        prompts,
        MAX_TOKENS,
        max_model_len=512,
        num_kv_blocks=41,
        max_num_batched_tokens=128,
    )
    preemptions = llm.engine.scheduler.num_preemptions
    free_after = llm.engine.block_manager.num_free_blocks
    llm.shutdown()
    assert preemptions > 0
    assert free_after == 40
    assert got == expected


def test_prefix_caching_on_off_identical(checkpoint_factory):
    model_dir = checkpoint_factory("qwen2")
    rng = random.Random(1)
    shared = [rng.randrange(3, 500) for _ in range(70)]
    prompts = [shared + [rng.randrange(3, 500) for _ in range(n)] for n in (1, 9, 40)]
    prompts.append(list(shared))  # a full hit up to the last token
    expected = hf_greedy(model_dir, prompts, 16)
    outs = {}
    for caching in (True, False):
        llm = LLM(
            model_dir, dtype="float32", enable_prefix_caching=caching, max_num_batched_tokens=64
        )
        params = SamplingParams(temperature=0.0, max_tokens=16)
        # twice: the second round hits the blocks cached by the first
        first = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        second = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        outs[caching] = (
            [o.outputs[0].token_ids for o in first],
            [o.outputs[0].token_ids for o in second],
            [o.num_cached_tokens for o in second],
        )
        llm.shutdown()
    assert outs[True][0] == outs[True][1] == outs[False][0] == outs[False][1] == expected
    assert all(n > 0 for n in outs[True][2])
    assert all(n == 0 for n in outs[False][2])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_logprobs_match_transformers(checkpoint_factory, family):
    model_dir = checkpoint_factory(family)
    prompt = make_prompts(500, [23])[0]
    llm = LLM(model_dir, dtype="float32")
    out = llm.generate(
        {"prompt_token_ids": prompt},
        SamplingParams(temperature=0.0, max_tokens=8, logprobs=5),
        use_tqdm=False,
    )[0].outputs[0]
    llm.shutdown()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0]
    ref = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 : -1]  # [8, vocab]
    assert len(out.logprobs) == len(out.token_ids) == 8
    for pos, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert token in entry and entry[token].rank == 1
        top = torch.topk(ref[pos], 5)
        assert set(top.indices.tolist()) <= set(entry)
        for token_id, logprob in entry.items():
            assert abs(logprob.logprob - ref[pos, token_id].item()) < 1e-4
    assert (
        abs(out.cumulative_logprob - sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))
        < 1e-6
    )



@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_close_to_transformers(checkpoint_factory, family):
    """bf16 runs its own CPU kernels (packed matmuls, matmul decode attention). Token-exact
    greedy parity is not defined there (tiny random models have near-ties that bf16 rounding
    flips), so: each greedy token is transformers-bf16's argmax up to bf16 noise, and its
    logprob matches transformers' (teacher-forced on the engine's tokens) within that noise."""
    model_dir = checkpoint_factory(family)
    prompts = make_prompts(500, [5, 17, 64, 150], seed=3)
    llm = LLM(model_dir, dtype="bfloat16")
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=8, logprobs=1),
                           use_tqdm=False)
    llm.shutdown()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="eager"
    ).eval()
    worst_gap = worst_diff = 0.0
    for prompt, output in zip(prompts, outputs):
        out = output.outputs[0]
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + out.token_ids])).logits[0]
        ref = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 : -1]  # [8, vocab]
        for pos, token in enumerate(out.token_ids):
            worst_gap = max(worst_gap, (ref[pos].max() - ref[pos, token]).item())
            worst_diff = max(worst_diff, abs(out.logprobs[pos][token].logprob
                                             - ref[pos, token].item()))
    assert worst_gap < 0.05 and worst_diff < 0.05, (worst_gap, worst_diff)
