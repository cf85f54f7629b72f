"""The offline front-end end to end: text prompts, stop conditions, sampling, chat, bad input."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_core import LLM, SamplingParams
from tests.text_checkpoint import add_tokenizer


@pytest.fixture(scope="module")
def text_model(checkpoint_factory, tmp_path_factory):
    return add_tokenizer(checkpoint_factory("llama"), str(tmp_path_factory.mktemp("llama-tok")))


@pytest.fixture(scope="module")
def llm(text_model):
    engine = LLM(text_model, dtype="float32", max_model_len=512)
    yield engine
    engine.shutdown()


def assert_pool_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks
    assert not llm.engine.has_unfinished_requests()


GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def test_text_prompts_round_trip(llm):
    prompts = ["def hello(world):", "import json\n", "héllo wörld"]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    tok = llm.get_tokenizer()
    for prompt, out in zip(prompts, outputs):
        assert out.prompt == prompt
        assert out.prompt_token_ids == tok.encode(prompt)
        assert out.prompt_token_ids[0] == 1  # BOS added
        completion = out.outputs[0]
        assert len(completion.token_ids) == 20 and completion.finish_reason == "length"
        full = tok.decode(completion.token_ids)
        assert full.startswith(completion.text.rstrip("\ufffd"))
    assert [o.request_id for o in outputs] == sorted({o.request_id for o in outputs}, key=int)
    assert_pool_free(llm)


def test_token_id_prompts_and_order(llm):
    prompts = [{"prompt_token_ids": [1, 5 + i, 9]} for i in range(5)]
    single = [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    batch = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert batch == single


def test_stop_string_truncates(llm):
    base = llm.generate("def hello(world):", GREEDY, use_tqdm=False)[0].outputs[0]
    text = base.text.rstrip("\ufffd")
    assert len(text) > 6
    stop = text[3:6]
    first = text.find(stop)
    out = llm.generate("def hello(world):", SamplingParams(
        temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop]), use_tqdm=False)[0]
    completion = out.outputs[0]
    assert completion.text == text[:first]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    kept = llm.generate("def hello(world):", SamplingParams(
        temperature=0.0, max_tokens=20, ignore_eos=True, stop=stop,
        include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:first + len(stop)]
    assert_pool_free(llm)


def test_stop_token_ids_and_min_tokens(llm):
    prompt = {"prompt_token_ids": [1, 40, 41, 42]}
    base = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop_id = base[3]
    first = base.index(stop_id)
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=20,
                                              stop_token_ids=[stop_id]), use_tqdm=False)[0]
    completion = out.outputs[0]
    assert completion.token_ids == base[:first + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_id
    # min_tokens masks the stop id at the sampler: the output reaches min_tokens without it
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=20, min_tokens=10,
                                              stop_token_ids=[stop_id]), use_tqdm=False)[0]
    tokens = out.outputs[0].token_ids
    assert len(tokens) >= 10 and stop_id not in tokens[:9]


def test_seeded_sampling_independent_of_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate("import json", params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.2, seed=7, max_tokens=20, ignore_eos=True)]
    mixed = llm.generate(["def f(x):", "import json", "class A:"],
                         [others[0], params, others[1]], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = llm.generate("import json", SamplingParams(
        temperature=1.0, top_p=0.9, max_tokens=16, seed=99, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_sequences(llm):
    out = llm.generate("import json", SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8,
                                                     ignore_eos=True), use_tqdm=False)
    assert len(out) == 1 and out[0].finished
    seqs = [c.token_ids for c in out[0].outputs]
    assert [c.index for c in out[0].outputs] == [0, 1, 2]
    assert all(len(s) == 8 for s in seqs) and len({tuple(s) for s in seqs}) > 1
    again = llm.generate("import json", SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8,
                                                       ignore_eos=True), use_tqdm=False)
    assert [c.token_ids for c in again[0].outputs] == seqs
    assert_pool_free(llm)


def test_n_greedy_sequences_share_the_prefix_and_agree(llm):
    single = llm.generate("class A:", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    out = llm.generate("class A:", SamplingParams(n=3, temperature=0.0, max_tokens=20,
                                                  ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [single] * 3
    assert_pool_free(llm)


def test_penalties_match_direct_computation(llm, text_model):
    """Greedy with penalties equals a step-by-step reference on transformers' logits."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                            repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.4)
    prompt = [1, 30, 31, 30, 32]
    got = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0]
    model = AutoModelForCausalLM.from_pretrained(text_model, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    tokens: list[int] = []
    with torch.inference_mode():
        for _ in range(12):
            logits = model(torch.tensor([prompt + tokens])).logits[0, -1].clone()
            for t in set(prompt + tokens):
                logits[t] = logits[t] / 1.5 if logits[t] > 0 else logits[t] * 1.5
            for t in set(tokens):
                logits[t] -= 0.7 * tokens.count(t) + 0.4
            tokens.append(int(logits.argmax()))
    assert got.token_ids == tokens


def test_chat_uses_template(llm):
    messages = [{"role": "user", "content": "hello"}]
    chat = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    rendered = "<|user|>\nhello\n<|assistant|>\n"
    assert chat.prompt == rendered
    direct = llm.generate({"prompt_token_ids": llm.get_tokenizer().encode(
        rendered, add_special_tokens=False)}, GREEDY, use_tqdm=False)[0]
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids


def test_chat_with_tools_a_template_and_its_kwargs(llm):
    """vLLM's LLM.chat arguments: the template gets `tools` and `chat_template_kwargs`; a given
    `chat_template` replaces the model's for that call only; a forced call's JSON comes from
    a structured-output constraint."""
    import json

    from engine_core import StructuredOutputsParams

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
        "required": ["city"]}}}]
    template = ("{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
                "{% if shout %}!{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}")
    messages = [{"role": "user", "content": "weather?"}]
    params = SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=(
        StructuredOutputsParams(json=tools[0]["function"]["parameters"])))
    out = llm.chat(messages, params, use_tqdm=False, tools=tools, chat_template=template,
                   chat_template_kwargs={"shout": True})[0]
    assert out.prompt == "[get_weather]!weather?"
    assert set(json.loads(out.outputs[0].text)) == {"city"}
    plain = llm.chat(messages, GREEDY, use_tqdm=False)[0]  # the model's template again
    assert plain.prompt == "<|user|>\nweather?\n<|assistant|>\n"
    with pytest.raises(ValueError, match="tools must be a list"):
        llm.chat(messages, GREEDY, use_tqdm=False, tools={"name": "f"})
    with pytest.raises(ValueError):
        llm.chat(messages, GREEDY, use_tqdm=False, chat_template="{% for %}")


def test_logprobs_decoded_tokens(llm):
    out = llm.generate("import", SamplingParams(temperature=0.0, max_tokens=3, logprobs=2),
                       use_tqdm=False)[0].outputs[0]
    tok = llm.get_tokenizer()
    for token, entry in zip(out.token_ids, out.logprobs):
        assert 2 <= len(entry) <= 3 and token in entry
        for token_id, lp in entry.items():
            assert lp.decoded_token == tok.decode([token_id], skip_special_tokens=False)
            assert lp.logprob <= 0.0 and lp.rank >= 1


@pytest.mark.parametrize("prompt, message", [
    ("", "empty"),
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": [1, 99999]}, "vocabulary"),
    ({"prompt_token_ids": [1, -3]}, "vocabulary"),
    ({"prompt_token_ids": list(range(3, 600))}, "max_model_len"),
    ({"bad": 1}, "prompt_token_ids"),
    (42, "prompt"),
])
def test_bad_prompts_raise_and_lose_nothing(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(["a good prompt", prompt], GREEDY, use_tqdm=False)
    assert_pool_free(llm)
    assert len(llm.generate("still fine", GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 20


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(logprobs=-1), "logprobs"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
])
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_count_must_match(llm):
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)


def test_bad_model_dirs(tmp_path, checkpoint_factory):
    with pytest.raises(ValueError, match=r"does not exist|not found|no such"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"config\.json"):
        LLM(str(tmp_path))
    import json
    import shutil

    bad = tmp_path / "bad-arch"
    shutil.copytree(checkpoint_factory("llama"), bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        LLM(str(bad))


def test_engine_argument_errors(checkpoint_factory):
    model = checkpoint_factory("llama")
    with pytest.raises(ValueError, match="KV cache"):
        LLM(model, num_kv_blocks=4, max_model_len=512)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model, max_model_len=100_000)
    with pytest.raises(ValueError, match="dtype"):
        LLM(model, dtype="int8")
    with pytest.raises(ValueError, match="unknown LLM argument"):
        LLM(model, max_num_sequences=4)
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        LLM(model, pipeline_parallel_size=99)
    with pytest.raises(ValueError, match="pp_layer_partition"):
        LLM(model, pipeline_parallel_size=2, pp_layer_partition="3,2")


def test_random_prompts_mixed_params_no_leak(llm):
    rng = random.Random(3)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(rng.randrange(1, 80))]}
               for _ in range(12)]
    params = [SamplingParams(temperature=rng.choice([0.0, 0.7, 1.0]), top_k=rng.choice([0, 5]),
                             max_tokens=rng.randrange(1, 15), seed=rng.choice([None, 3]))
              for _ in prompts]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, p in zip(outs, params):
        completion = out.outputs[0]
        assert 1 <= len(completion.token_ids) <= p.max_tokens
        assert completion.finish_reason in ("stop", "length")
    assert_pool_free(llm)


def test_priority_needs_the_priority_policy(llm):
    with pytest.raises(ValueError, match=r"^priority 1 needs priority scheduling.*priority\[1\]"):
        llm.generate(["a", "b"], GREEDY, use_tqdm=False, priority=[0, 1])
    with pytest.raises(ValueError, match=r"^priority has 1 entries for 2 prompts"):
        llm.generate(["a", "b"], GREEDY, use_tqdm=False, priority=[0])
    with pytest.raises(ValueError, match=r"^priority must be a list"):
        llm.generate(["a", "b"], GREEDY, use_tqdm=False, priority=0)
    assert_pool_free(llm)
    assert len(llm.generate(["a", "b"], GREEDY, use_tqdm=False, priority=[0, 0])) == 2


def test_priority_policy_serves_the_lowest_first(text_model, llm, monkeypatch):
    prompts = ["def a():", "import b", "class C:", "x = 1"]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    engine = LLM(text_model, dtype="float32", max_model_len=512, max_num_seqs=1,
                 scheduling_policy="priority")
    try:
        finished_order = []
        step = engine.engine.step

        def recording_step():
            outputs = step()
            finished_order.extend(o.request_id for o in outputs if o.finish_reason)
            return outputs

        monkeypatch.setattr(engine.engine, "step", recording_step)
        outputs = engine.generate(prompts, GREEDY, use_tqdm=False, priority=[3, -2, 7, -2])
        assert [o.outputs[0].token_ids for o in outputs] == expected  # in input order
        by_id = {o.request_id: i for i, o in enumerate(outputs)}
        assert [by_id[r] for r in finished_order] == [1, 3, 0, 2]  # ties: by arrival
        with pytest.raises(ValueError, match=r"^priority must be an int64"):
            engine.generate(["a"], GREEDY, use_tqdm=False, priority=[1 << 63])
        assert_pool_free(engine)
    finally:
        engine.shutdown()
