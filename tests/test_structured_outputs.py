"""Structured outputs offline, end to end: every sampled token obeys the constraint.

Tiny random float32 checkpoints with a byte-level BPE tokenizer: unconstrained, their output is
noise, so every valid output below is the constraint's doing. Greedy output is checked token for
token against transformers with the same xgrammar mask applied step by step (an oracle built
here from xgrammar's own API, not the engine's); outputs are validated with `jsonschema`,
`re.fullmatch` and exact choices, at PP 1 and 2, greedy and sampled (n > 1, penalties,
logprobs), under chunked prefill, preemption, prefix caching and speculative decoding. Bad
constraints fail their own request only, and every KV block is free afterwards.
"""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
import torch

from engine_core import LLM, SamplingParams, StructuredOutputsParams
from engine_core.config import EngineArgs
from engine_core.engine import EngineCore
from engine_core.messages import EngineCoreRequest
from tests.checkpoints import make_checkpoint
from tests.text_checkpoint import add_tokenizer

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "address": {"type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 10},
                                       "zip": {"type": "integer", "minimum": 0,
                                               "maximum": 99999}},
                        "required": ["city", "zip"]},
        },
        "required": ["name", "address"],
    },
    "bounded_array": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
    },
    "enum_and_numbers": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "score": {"type": "number", "minimum": -10, "maximum": 10},
                       "ok": {"type": "boolean"}},
        "required": ["color", "score", "ok"],
    },
    "ref": {
        "$defs": {"point": {"type": "object",
                            "properties": {"x": {"type": "integer", "minimum": 0,
                                                 "maximum": 9},
                                           "y": {"type": "integer", "minimum": 0,
                                                 "maximum": 9}},
                            "required": ["x", "y"]}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"],
    },
}
PROMPTS = ["Give me JSON:", "def f(x):\n    return", "naïve café 日本語", "The answer is"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random llama with a 512-token byte-level BPE tokenizer."""
    root = tmp_path_factory.mktemp("so")
    ckpt = make_checkpoint(str(root / "ckpt"), "llama")
    return add_tokenizer(ckpt, str(root / "model"))


def _llm(model_dir: str, **kwargs) -> LLM:
    return LLM(model_dir, dtype="float32", num_kv_blocks=kwargs.pop("num_kv_blocks", 256),
               max_model_len=kwargs.pop("max_model_len", 512), **kwargs)


def _free(llm: LLM) -> bool:
    stats = llm.engine.stats()
    return stats.num_free_blocks == stats.num_total_blocks


def _texts(llm: LLM, prompts, params):
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [c for o in outputs for c in o.outputs]


# ---- the oracle: transformers' logits, xgrammar's mask, argmax -------------------------------
def hf_constrained_greedy(model_dir: str, prompt_ids: list[int], params: StructuredOutputsParams,
                          max_tokens: int) -> list[int]:
    """Greedy decoding with transformers, the constraint's bitmask applied at every step."""
    import xgrammar as xgr
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    vocab = model.config.vocab_size
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[2])
    compiler = xgr.GrammarCompiler(info)
    kind = params.kind
    if kind == "json":
        # xgrammar's grammar with JSON's string characters (the engine's one deliberate change:
        # xgrammar lets strings hold control characters or UTF-16 surrogates)
        grammar = str(xgr.Grammar.from_json_schema(params.json, any_whitespace=False))
        for loose in ('[^\\"\\\\\\r\\n]', '[^\\0-\\x1f\\"\\\\\\r\\n]'):
            grammar = grammar.replace(loose, '[^\\0-\\x1f\\"\\\\\\r\\n\\uD800-\\uDFFF]')
        compiled = compiler.compile_grammar(grammar)
    elif kind == "regex":
        compiled = compiler.compile_regex(params.regex)
    elif kind == "choice":
        compiled = compiler.compile_grammar(
            "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice))
    else:
        compiled = compiler.compile_grammar(params.grammar)
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    ids, out = list(prompt_ids), []
    with torch.inference_mode():
        while len(out) < max_tokens and not matcher.is_terminated():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), bitmask)
            token = int(logits.argmax())
            assert matcher.accept_token(token)
            ids.append(token)
            out.append(token)
    return out


ORACLE_CASES = [
    StructuredOutputsParams(json=SCHEMAS["nested"]),
    StructuredOutputsParams(regex=r"[a-z]{2,6}-\d{1,3}( [A-Z]+)?"),
    StructuredOutputsParams(choice=["alpha", "beta gamma", "δ ✓"]),
    StructuredOutputsParams(grammar='root ::= "(" item ("," item)* ")"\n'
                                   'item ::= [0-9]+ | "x"'),
]


@pytest.mark.parametrize("pp", [1, 2])
def test_constrained_greedy_matches_transformers_under_the_same_mask(model_dir, pp):
    """Token for token against transformers + xgrammar, for a schema, a regex, a choice and an
    EBNF grammar, in one batch, at PP 1 and 2 (in-process stages)."""
    llm = _llm(model_dir, pipeline_parallel_size=pp, distributed_executor_backend="inprocess")
    try:
        prompt_ids = llm.tokenizer.encode(PROMPTS[0])
        params = [SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=c)
                  for c in ORACLE_CASES]
        outputs = llm.generate([{"prompt_token_ids": prompt_ids}] * len(params), params,
                               use_tqdm=False)
        for constraint, output in zip(ORACLE_CASES, outputs):
            expected = hf_constrained_greedy(model_dir, prompt_ids, constraint, 60)
            got = list(output.outputs[0].token_ids)
            assert got == expected, constraint.kind
            assert output.outputs[0].finish_reason == ("stop" if expected[-1] == 2
                                                       or len(expected) < 60 else "length")
        assert _free(llm)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("greedy, pp", [(True, 1), (False, 1), (False, 2)])
def test_every_output_is_valid(model_dir, greedy, pp):
    """Each schema's outputs parse and validate; regexes match in full; choices are exact; the
    requests finish with "stop" (the grammar completes) well within max_tokens. Sampled: n=2,
    penalties and logprobs on."""
    llm = _llm(model_dir, pipeline_parallel_size=pp, distributed_executor_backend="inprocess")
    try:
        sampling = ({"temperature": 0.0} if greedy else
                    {"temperature": 1.0, "n": 2, "seed": 7, "presence_penalty": 0.5,
                     "repetition_penalty": 1.2, "logprobs": 2, "top_p": 0.95})
        constraints = [StructuredOutputsParams(json=s) for s in SCHEMAS.values()]
        constraints += [StructuredOutputsParams(json_object=True),
                        StructuredOutputsParams(regex=r"\d{3}-[a-z]{2,5}"),
                        StructuredOutputsParams(choice=["yes", "no", "yes!"])]
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(constraints))]
        params = [SamplingParams(max_tokens=400, structured_outputs=c, **sampling)
                  for c in constraints]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        for constraint, output in zip(constraints, outputs):
            assert len(output.outputs) == (1 if greedy else 2)
            for choice in output.outputs:
                text = choice.text
                if constraint.kind == "json_object":  # unbounded keys: a noise model may loop
                    assert text.startswith("{")
                    if choice.finish_reason == "stop":
                        assert isinstance(json.loads(text), dict)
                    continue
                assert choice.finish_reason == "stop", (constraint, choice.text)
                if constraint.kind == "json":
                    jsonschema.validate(json.loads(text), json.loads(constraint.json))
                elif constraint.kind == "regex":
                    assert re.fullmatch(constraint.regex, text), text
                else:
                    assert text in constraint.choice
                if not greedy:
                    assert choice.logprobs is not None and len(choice.logprobs) == len(
                        choice.token_ids)
                    for position in choice.logprobs:  # forbidden tokens have no probability
                        assert all(lp.logprob > -9999.0 for lp in position.values()
                                   if lp.rank == 1)
        assert _free(llm)
    finally:
        llm.shutdown()


def test_constrained_and_free_requests_share_a_batch(model_dir):
    """A constrained request beside unconstrained ones: theirs are exactly what they are alone."""
    llm = _llm(model_dir)
    try:
        free = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        alone = _texts(llm, PROMPTS[:2], free)
        mixed = _texts(llm, [PROMPTS[0], PROMPTS[2], PROMPTS[1]],
                       [free, SamplingParams(temperature=0.0, max_tokens=200,
                                             structured_outputs=StructuredOutputsParams(
                                                 json=SCHEMAS["ref"])), free])
        assert [mixed[0].token_ids, mixed[2].token_ids] == [alone[0].token_ids,
                                                              alone[1].token_ids]
        jsonschema.validate(json.loads(mixed[1].text), SCHEMAS["ref"])
    finally:
        llm.shutdown()


def test_chunked_prefill_preemption_and_prefix_caching_keep_the_output(model_dir):
    """A tight engine (small chunks, few blocks: preemptions happen) and prefix-cache hits give
    the roomy engine's constrained greedy tokens."""
    prompts = [PROMPTS[0] * 6 + str(i) for i in range(6)]  # a shared prefix: cache hits
    params = SamplingParams(temperature=0.0, max_tokens=120,
                            structured_outputs=StructuredOutputsParams(json=SCHEMAS["nested"]))
    roomy = _llm(model_dir, enable_prefix_caching=False)
    try:
        expected = [c.token_ids for c in _texts(roomy, prompts, params)]
    finally:
        roomy.shutdown()
    tight = _llm(model_dir, num_kv_blocks=24, block_size=8, max_num_batched_tokens=16,
                 max_model_len=160)
    try:
        got = [c.token_ids for c in _texts(tight, prompts, params)]
        stats = tight.engine.stats()
        assert stats.num_preemptions > 0
        assert got == expected
        assert _free(tight)
    finally:
        tight.shutdown()


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculative_decoding_under_a_constraint_changes_nothing(model_dir, method):
    """Drafts (n-gram, or a draft model: here the target itself, whose unconstrained drafts
    the grammar often refuses) are trimmed to what the grammar allows and verified under the
    bitmask: greedy output is identical to no speculation; drafts were proposed."""
    prompts = ["ab ab ab ab ab ab ab", "1, 2, 1, 2, 1, 2, 1, 2"]
    params = SamplingParams(temperature=0.0, max_tokens=80, structured_outputs=(
        StructuredOutputsParams(regex=r"[a-z0-9 ,]{10,60}\.")))
    plain = _llm(model_dir)
    try:
        expected = [c.token_ids for c in _texts(plain, prompts, params)]
    finally:
        plain.shutdown()
    config = ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
               "prompt_lookup_min": 1} if method == "ngram" else
              {"method": "draft_model", "model": model_dir, "num_speculative_tokens": 3})
    spec = _llm(model_dir, speculative_config=config)
    try:
        outputs = _texts(spec, prompts, params)
        assert [c.token_ids for c in outputs] == expected
        assert spec.engine.stats().spec_decode.num_draft_tokens > 0
        for c in outputs:
            assert re.fullmatch(r"[a-z0-9 ,]{10,60}\.", c.text)
        assert _free(spec)
    finally:
        spec.shutdown()


def test_stop_strings_min_tokens_and_ignore_eos_under_a_constraint(model_dir):
    """A stop string still cuts the text; min_tokens and ignore_eos never keep a complete
    grammar going (it ends the request)."""
    llm = _llm(model_dir)
    try:
        choice = StructuredOutputsParams(choice=["hello world", "hi"])
        base = _texts(llm, [PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=30,
                                                        structured_outputs=choice))[0]
        cut = _texts(llm, [PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=30,
                                                       stop=["o"], structured_outputs=choice))[0]
        assert base.text in choice.choice
        assert cut.text == base.text.split("o")[0]
        for extra in ({"min_tokens": 25}, {"ignore_eos": True}):
            out = _texts(llm, [PROMPTS[1]], SamplingParams(
                temperature=0.0, max_tokens=30, structured_outputs=choice, **extra))[0]
            assert (out.text, out.finish_reason) == (base.text, "stop"), extra
        assert _free(llm)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("constraint, field", [
    ({"json": {"type": "foo"}}, "structured_outputs.json"),
    ({"json": "{not json"}, "structured_outputs.json"),
    ({"regex": "(("}, "structured_outputs.regex"),
    ({"grammar": "root ::= [z-a]"}, "structured_outputs.grammar"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"json": {"type": "object"}, "regex": "a"}, "exactly one"),
    ({}, "exactly one"),
])
def test_a_bad_constraint_is_a_value_error_naming_the_field(model_dir, constraint, field):
    llm = _llm(model_dir)
    try:
        with pytest.raises(ValueError, match=re.escape(field)):
            llm.generate([PROMPTS[0]], SamplingParams(
                structured_outputs=StructuredOutputsParams(**constraint)), use_tqdm=False)
        # the engine is untouched: a good request right after works
        ok = _texts(llm, [PROMPTS[0]], SamplingParams(
            temperature=0.0, max_tokens=30,
            structured_outputs=StructuredOutputsParams(choice=["a", "b"])))[0]
        assert ok.text in ("a", "b")
    finally:
        llm.shutdown()


def _core(model_dir: str) -> EngineCore:
    from engine_core.executors.factory import make_executor

    config = EngineArgs(model=model_dir, dtype="float32", num_kv_blocks=64,
                        max_model_len=256).resolve()
    return EngineCore(config, make_executor(config))


def _run(engine: EngineCore, requests: list[EngineCoreRequest], timeout_s: float = 60.0):
    for request in requests:
        engine.add_request(request)
    tokens = {r.request_id: [] for r in requests}
    final = {}
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the engine did not finish in time"
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finish_reason is not None:
                final[out.request_id] = out
    return tokens, final


def test_a_grammar_that_fails_to_compile_in_the_engine_fails_its_request_alone(model_dir):
    """Requests that bypassed the front-end's check: a compile that fails in the engine, and a
    grammar no token can start, each finish with an error saying so; the others run; every
    block is free."""
    engine = _core(model_dir)
    try:
        bad = SamplingParams(structured_outputs=StructuredOutputsParams(regex="(("))
        good = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        empty = SamplingParams(structured_outputs=StructuredOutputsParams(
            grammar="root ::= root"))  # compiles, but no token can ever start it
        tokens, final = _run(engine, [EngineCoreRequest("bad", [1, 5, 6], bad, [2]),
                                      EngineCoreRequest("empty", [1, 5, 6], empty, [2]),
                                      EngineCoreRequest("good", [1, 5, 6], good, [2])])
        assert final["bad"].finish_reason == "error"
        assert "structured_outputs.regex" in final["bad"].error
        assert final["empty"].finish_reason == "error"
        assert "no token of the vocabulary can continue" in final["empty"].error
        assert final["good"].finish_reason == "length" and len(tokens["good"]) == 8
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks
    finally:
        engine.shutdown()


def test_compile_timeout_and_abort_while_compiling(model_dir, monkeypatch):
    """A grammar not ready by its deadline fails its request (and is compiled again next time);
    a request aborted while its grammar compiles leaves nothing behind."""
    import engine_core.engine as engine_module

    engine = _core(model_dir)
    try:
        constraint = StructuredOutputsParams(json=SCHEMAS["nested"])
        params = SamplingParams(temperature=0.0, max_tokens=200, structured_outputs=constraint)
        monkeypatch.setattr(engine_module, "COMPILE_TIMEOUT_S", -1.0)
        _, final = _run(engine, [EngineCoreRequest("late", [1, 5], params, [2])])
        assert final["late"].finish_reason == "error" and "longer than" in final["late"].error
        monkeypatch.undo()
        engine.add_request(EngineCoreRequest("gone", [1, 5], params, [2]))
        engine.abort_requests(["gone"])
        assert not engine.has_unfinished_requests()
        _, final = _run(engine, [EngineCoreRequest("ok", [1, 5], params, [2])])
        assert final["ok"].finish_reason == "stop"
        stats = engine.stats().structured_outputs
        assert (stats.num_requests, stats.num_compiles) == (3, 2)  # the late one recompiled
        assert stats.num_cache_hits == 1 and stats.compile_seconds > 0
    finally:
        engine.shutdown()


def test_structured_output_stats_count_requests_compiles_and_cache_hits(model_dir):
    llm = _llm(model_dir)
    try:
        one = StructuredOutputsParams(json=SCHEMAS["ref"])
        other = StructuredOutputsParams(regex="[ab]{3}")
        _texts(llm, [PROMPTS[0]] * 3, [SamplingParams(temperature=0.0, max_tokens=100,
                                                      structured_outputs=c)
                                       for c in (one, other, one)])
        stats = llm.engine.stats().structured_outputs
        assert (stats.num_requests, stats.num_compiles, stats.num_cache_hits) == (3, 2, 1)
        _texts(llm, [PROMPTS[0]], SamplingParams(max_tokens=4))  # unconstrained: not counted
        assert llm.engine.stats().structured_outputs.num_requests == 3
    finally:
        llm.shutdown()


@pytest.mark.parametrize("vocab", [32, 70, 512])
def test_token_bitmasks_mask_exactly_the_cleared_bits(vocab):
    """Against a plain loop over bits: rows of several requests (one with 3 rows), a vocabulary
    that is and is not a multiple of 32; unmasked rows untouched."""
    from engine_core.executors.token_bitmask import apply_token_bitmasks, bitmask_error

    generator = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    logits = torch.randn(6, vocab, generator=generator)
    before = logits.clone()
    masks = {0: torch.randint(-2**31, 2**31 - 1, (1, words), dtype=torch.int32,
                              generator=generator),
             2: torch.randint(-2**31, 2**31 - 1, (3, words), dtype=torch.int32,
                              generator=generator)}
    blobs = [m.numpy().astype("<i4").tobytes() for m in masks.values()]
    assert all(bitmask_error(b, len(m), vocab) is None for b, m in zip(blobs, masks.values()))
    assert "expected" in bitmask_error(blobs[0][:-1], 1, vocab)
    out = logits.clone()
    apply_token_bitmasks(out, list(masks), blobs)
    expected = before.clone()
    for first, mask in masks.items():
        for j, row in enumerate(mask.tolist()):
            for token in range(vocab):
                if not (row[token // 32] >> (token % 32)) & 1:
                    expected[first + j, token] = float("-inf")
    assert torch.equal(out, expected)
    assert torch.equal(out[1], before[1]) and torch.equal(out[5], before[5])
    every = before[[0, 2, 3, 4]].clone()  # every row constrained: the in-order path
    apply_token_bitmasks(every, [0, 1], [blobs[0], blobs[1]])
    assert torch.equal(every, expected[[0, 2, 3, 4]])


HOSTILE = [
    {"json": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}},
    {"json": {"$ref": "#"}},  # a schema that is itself, forever
    {"json": {"type": "array", "items": {"type": "integer"}, "minItems": 5, "maxItems": 2}},
    {"json": {"type": "string", "minLength": 10, "maxLength": 3}},
    {"json": {"type": "integer", "minimum": 10, "maximum": 1}},
    {"json": {"type": "string", "pattern": "(("}},
    {"json": {"enum": []}},
    {"json": {"type": ["string", 3]}},
    {"json": {"allOf": [{"type": "string"}, {"type": "integer"}]}},
    {"json": {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(500)},
              "required": [f"p{i}" for i in range(500)]}},
    {"json": "[" * 5000 + "]" * 5000},
    {"json": {"not": {"type": "string"}}},
    {"regex": "a{1000000}"},
    {"regex": "(a|b|c)*" * 200},
    {"regex": "[\\x00-\\x1f]+"},
    {"regex": "\\"},
    {"regex": "(?<=a)b"},
    {"regex": ""},
    {"grammar": "root ::= root"},
    {"grammar": "root ::= a\na ::= b\nb ::= a"},
    {"grammar": "root ::= " + " | ".join(f'"{i}"' for i in range(3000))},
    {"grammar": "root ::= [\\u0000-\\uffff]*"},
    {"grammar": ""},
    {"choice": ["", "a"]},
    {"choice": ["\x00\udc80", "ok"]},
    {"choice": ["x" * 100000]},
]


def test_hostile_constraints_are_refused_or_obeyed_and_lose_nothing(model_dir):
    """Each hostile constraint is a ValueError naming structured_outputs, or runs (its tokens
    obeying it, within max_tokens), within seconds; the engine serves a plain request the
    same afterwards and every block is free."""
    llm = _llm(model_dir)
    try:
        plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        reference = _texts(llm, PROMPTS, plain)
        for constraint in HOSTILE:
            start = time.monotonic()
            try:
                params = SamplingParams(temperature=0.0, max_tokens=24,
                                        structured_outputs=StructuredOutputsParams(**constraint))
                out = _texts(llm, [PROMPTS[0]], params)[0]
            except ValueError as exc:
                assert "structured_outputs" in str(exc), (constraint, exc)
            else:
                assert out.finish_reason in ("stop", "length"), (constraint, out)
                if "regex" in constraint and out.finish_reason == "stop":
                    assert re.fullmatch(constraint["regex"], out.text), constraint
            assert time.monotonic() - start < 30, constraint
        assert [c.token_ids for c in _texts(llm, PROMPTS, plain)] == [
            c.token_ids for c in reference]
        assert _free(llm)
    finally:
        llm.shutdown()


def test_the_stop_token_is_not_in_the_text_even_with_special_tokens_kept(model_dir):
    """As in vLLM: the EOS that ended a request is in its token ids but not its text, with
    skip_special_tokens false too, unless include_stop_str_in_output."""
    llm = _llm(model_dir)
    try:
        choice = StructuredOutputsParams(choice=["fine"])
        for extra, text in (({}, "fine"), ({"skip_special_tokens": False}, "fine"),
                            ({"skip_special_tokens": False, "include_stop_str_in_output": True},
                             "fine</s>")):
            out = _texts(llm, [PROMPTS[0]], SamplingParams(
                temperature=0.0, max_tokens=20, structured_outputs=choice, **extra))[0]
            assert (out.text, out.token_ids[-1], out.finish_reason) == (text, 2, "stop"), extra
    finally:
        llm.shutdown()


def test_the_front_end_check_compiles_over_the_engines_vocabulary(model_dir, tmp_path):
    """With the model's vocabulary the check compiles as the engine will (so its time bound
    covers the engine's compile); a directory without a tokenizer is refused, saying so."""
    from engine_core.grammars import check_structured_outputs

    constraint = StructuredOutputsParams(json=SCHEMAS["nested"])
    check_structured_outputs(constraint, vocabulary=(model_dir, 512))
    with pytest.raises(ValueError, match=r"structured_outputs\.regex matches no text"):
        check_structured_outputs(StructuredOutputsParams(regex="[^\\x00-\\U0010ffff]"),
                                 vocabulary=(model_dir, 512))
    with pytest.raises(ValueError, match=r"has no tokenizer\.json"):
        check_structured_outputs(constraint, vocabulary=(str(tmp_path), 512))
