"""`pp-engine serve --speculative-config`: the official `openai` client gets, streamed or not,
exactly what the offline engine gives without speculation; the spec_decode metrics count the
drafts; a bad config is a usage error naming the key; every KV block comes back."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from engine_core.models import default_model_dir

from engine_core import LLM, SamplingParams
from engine_core.entrypoints.cli import main
from tests.servers import ServerProcess
from tests.test_server import metrics, wait_idle

MODEL = "tiny-llama"
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
        "prompt_lookup_min": 1}
# Python beginnings: the shipped model continues them with code that repeats itself
PROMPTS = ["def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n",
           "class Point:\n    def __init__(self, x, y):\n        self.x = x\n"]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    log = str(tmp_path_factory.mktemp("spec-server") / "server.log")
    proc = ServerProcess(default_model_dir(), log, "--speculative-config", json.dumps(SPEC))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                         timeout=60.0)


@pytest.fixture(scope="module")
def offline() -> Iterator[LLM]:
    llm = LLM(dtype="float32")  # no speculation: the reference
    yield llm
    llm.shutdown()


def test_served_speculation_matches_offline_without_it(server, client, offline):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    expected = [o.outputs[0] for o in offline.generate(PROMPTS, params, use_tqdm=False)]
    response = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=MAX_TOKENS,
                                         temperature=0)
    assert [c.text for c in response.choices] == [e.text for e in expected]
    assert response.usage.completion_tokens == sum(len(e.token_ids) for e in expected)
    for prompt, exp in zip(PROMPTS, expected):  # streamed: the deltas add up to the same
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0, stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == exp.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
            exp.finish_reason
    figures = wait_idle(server)
    drafts = figures["ppengine:spec_decode_num_draft_tokens_total"]
    accepted = figures["ppengine:spec_decode_num_accepted_tokens_total"]
    assert drafts > accepted > 0
    assert figures["ppengine:spec_decode_mean_accepted_length"] > 1.0


def test_served_stop_string_ends_where_it_would_without_speculation(server, client, offline):
    reference = offline.generate(PROMPTS[:1], SamplingParams(temperature=0.0,
                                                             max_tokens=MAX_TOKENS),
                                 use_tqdm=False)[0].outputs[0].text
    stop = reference[len(reference) // 2:len(reference) // 2 + 3]  # cut mid-output
    assert stop
    expected = offline.generate(PROMPTS[:1], SamplingParams(temperature=0.0,
                                                            max_tokens=MAX_TOKENS, stop=[stop]),
                                use_tqdm=False)[0].outputs[0]
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                    temperature=0, stop=[stop]).choices[0]
    assert got.text == expected.text and got.finish_reason == "stop"
    assert metrics(server)["ppengine:num_requests_running"] == 0 or wait_idle(server)


@pytest.mark.parametrize("config, key", [
    ({**SPEC, "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
    ({**SPEC, "prompt_lookup_mn": 1}, "prompt_lookup_mn"),
])
def test_bad_speculative_config_is_a_usage_error_naming_the_key(capsys, config, key):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--speculative-config", json.dumps(config)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--speculative-config" in err and (f"speculative_config: {key} " in err
                                              or f"unknown key {key!r}" in err), err
