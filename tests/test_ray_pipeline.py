"""Pipeline parallelism over Ray actors: parity, both transports, stage death, `ray job submit`,
KV hand-over from a PP=2 prefill engine (disaggregated prefill/decode).

Every test that touches Ray lives in this module, so under `pytest -n 2 --dist loadfile` one worker
owns the Ray cluster at a time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import ray

from engine_core import LLM, SamplingParams
from tests.servers import free_port
from tests.test_generate_parity import MAX_TOKENS, engine_greedy, hf_greedy, make_prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the `ray` CLI of this interpreter's environment (a venv's bin/ need not be on PATH)
RAY_CLI = os.path.join(os.path.dirname(sys.executable), "ray")
if not os.path.exists(RAY_CLI):
    RAY_CLI = shutil.which("ray") or "ray"


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             _system_config={"worker_niceness": 0, "max_direct_call_object_size": 1 << 20})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def case(checkpoint_factory):
    model_dir = checkpoint_factory("qwen2", num_hidden_layers=4)
    prompts = make_prompts(512)
    return model_dir, prompts, hf_greedy(model_dir, prompts, MAX_TOKENS)


def test_pp2_chained_refs_matches_transformers(ray_cluster, case):
    model_dir, prompts, expected = case
    got, llm = engine_greedy(model_dir, prompts, MAX_TOKENS, pipeline_parallel_size=2,
                             threads_per_stage=1)
    assert llm.config.scheduler.max_concurrent_batches == 2
    # the same prompts again: prefix-cache hits across stages give the same tokens
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    again = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.shutdown()
    assert got == expected
    assert [o.outputs[0].token_ids for o in again] == expected
    assert sum(o.num_cached_tokens for o in again) > 0


def test_pp3_uneven_chunked_pipelined_preemption(ray_cluster, case):
    model_dir, prompts, expected = case
    got, llm = engine_greedy(model_dir, prompts, MAX_TOKENS, pipeline_parallel_size=3,
                             pp_layer_partition="2,1,1", threads_per_stage=1,
                             max_num_batched_tokens=64, max_model_len=512, num_kv_blocks=41,
                             pipelined_chunked_prefill=True)
    preemptions = llm.engine.scheduler.num_preemptions
    free = llm.engine.block_manager.num_free_blocks
    llm.shutdown()
    assert preemptions > 0 and free == 40
    assert got == expected


def test_pp3_speculative_decoding_matches_transformers(ray_cluster, case):
    """n-gram drafts verified across three actor stages, under chunked prefill and preemption:
    greedy as transformers, seeded sampling as the engine without drafts, nothing leaked."""
    from tests.test_scheduler_spec import assert_cache_holds_real_tokens
    from tests.test_spec_decode import SPEC, repeating_prompts

    model_dir, _, _ = case
    prompts = repeating_prompts(512)
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    got, llm = engine_greedy(model_dir, prompts, MAX_TOKENS, pipeline_parallel_size=3,
                             pp_layer_partition="2,1,1", threads_per_stage=1,
                             speculative_config=SPEC, max_num_batched_tokens=32, block_size=4,
                             num_kv_blocks=25, max_model_len=96)
    seeded = [SamplingParams(temperature=0.9, top_k=50, seed=100 + i, max_tokens=16,
                             ignore_eos=True) for i in range(len(prompts))]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    sampled = [o.outputs[0].token_ids for o in llm.generate(inputs, seeded, use_tqdm=False)]
    engine = llm.engine
    stats, preemptions = engine.stats().spec_decode, engine.scheduler.num_preemptions
    free, usable = engine.block_manager.num_free_blocks, engine.block_manager.num_usable_blocks
    assert_cache_holds_real_tokens(engine.block_manager, [p + e for p, e in zip(prompts, expected)]
                                   + [p + t for p, t in zip(prompts, sampled)])
    llm.shutdown()
    plain = LLM(model_dir, dtype="float32")
    want = [o.outputs[0].token_ids for o in plain.generate(inputs, seeded, use_tqdm=False)]
    plain.shutdown()
    assert got == expected
    assert sampled == want
    assert stats.num_draft_tokens > stats.num_accepted_tokens > 0
    assert preemptions > 0 and free == usable


def test_pp2_compiled_graph_matches(ray_cluster, case):
    model_dir, prompts, expected = case
    got, llm = engine_greedy(model_dir, prompts, MAX_TOKENS, pipeline_parallel_size=2,
                             threads_per_stage=1, ray_compiled_graph=True,
                             max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="ray_compiled_graph off"):  # its actors are busy
        llm.engine.executor.kv_stages()
    start = time.monotonic()
    llm.shutdown()
    assert time.monotonic() - start < 30
    assert got == expected


def test_seeded_sampling_same_at_pp1_and_pp2(ray_cluster, case):
    model_dir, prompts, _ = case
    params = [SamplingParams(temperature=0.9, top_k=50, seed=100 + i, max_tokens=16,
                             ignore_eos=True) for i in range(len(prompts))]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    results = []
    for pp in (1, 2):
        llm = LLM(model_dir, dtype="float32", pipeline_parallel_size=pp, threads_per_stage=1)
        results.append([o.outputs[0].token_ids for o in llm.generate(inputs, params,
                                                                       use_tqdm=False)])
        llm.shutdown()
    assert results[0] == results[1]


EXTREME_PARAMS = [  # valid values at the numeric edges (issue 18): each once killed or broke a step
    dict(top_p=1e-320),
    dict(repetition_penalty=1e-300, presence_penalty=-2, frequency_penalty=-2),
    dict(repetition_penalty=5e-324, top_k=36, logprobs=0),
    dict(temperature=1e308, top_p=1e-320, logprobs=20),
    dict(repetition_penalty=1e308, min_p=1.0, logprobs=5),
]


def test_extreme_parameters_beside_greedy_ones_on_ray_stages(ray_cluster, case):
    """The numeric edges through Ray actor stages: every extreme request generates tokens in
    the vocabulary with finite logprobs, the greedy requests in the same batches still match
    transformers, and every block comes back."""
    model_dir, prompts, expected = case
    llm = LLM(model_dir, dtype="float32", pipeline_parallel_size=2, threads_per_stage=1)
    vocab = llm.config.model.vocab_size
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    params = [greedy] * len(prompts) + [SamplingParams(max_tokens=6, ignore_eos=True, **p)
                                        for p in EXTREME_PARAMS]
    inputs = [{"prompt_token_ids": p} for p in prompts + prompts[:len(EXTREME_PARAMS)]]
    outputs = llm.generate(inputs, params, use_tqdm=False)
    engine = llm.engine
    free, usable = engine.block_manager.num_free_blocks, engine.block_manager.num_usable_blocks
    llm.shutdown()
    assert [o.outputs[0].token_ids for o in outputs[:len(prompts)]] == expected
    for out in outputs[len(prompts):]:
        completion = out.outputs[0]
        assert completion.finish_reason == "length", completion.error
        assert len(completion.token_ids) == 6 and all(0 <= t < vocab
                                                      for t in completion.token_ids)
        for step in completion.logprobs or []:
            assert all(-9999.0 <= lp.logprob <= 0 for lp in step.values())
    assert free == usable


def test_stage_death_fails_fast_and_restarts(ray_cluster, case):
    model_dir, prompts, _ = case
    total_cpus = ray.cluster_resources()["CPU"]
    llm = LLM(model_dir, dtype="float32", pipeline_parallel_size=2, threads_per_stage=1)
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    victim = llm.engine.executor.stages[1]
    engine_step, num_outputs, killed = llm.engine.step, 0, False

    def step_then_kill():  # kill stage 1 once generation is well under way
        nonlocal num_outputs, killed
        outputs = engine_step()
        num_outputs += len(outputs)
        if not killed and num_outputs > 20:
            ray.kill(victim)
            killed = True
        return outputs

    llm.engine.step = step_then_kill
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="pipeline stage 1"):
        llm.generate([{"prompt_token_ids": p} for p in prompts[:3]], params, use_tqdm=False)
    assert killed and time.monotonic() - start < 60
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_usable_blocks
    with pytest.raises(RuntimeError, match="failed"):  # the engine stays dead, and says so
        llm.generate({"prompt_token_ids": [1, 2, 3]}, params, use_tqdm=False)
    llm.shutdown()
    deadline = time.monotonic() + 20  # no zombie: actors and placement group give back all CPUs
    while ray.available_resources().get("CPU", 0) < total_cpus:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)
    llm2 = LLM(model_dir, dtype="float32", pipeline_parallel_size=2, threads_per_stage=1)
    out = llm2.generate({"prompt_token_ids": [1, 2, 3]},
                        SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    llm2.shutdown()
    assert len(out[0].outputs[0].token_ids) == 4


def test_disagg_prefill_at_pp2_on_ray_decode_at_pp1(ray_cluster, checkpoint_factory):
    """P's stages are Ray actors (KV read through `RayKVStage`), D is one in-process stage: GET
    and PUT give the single engine's tokens, D computes only the tails, all blocks come back.
    Lives here, not in test_disagg.py, so that one xdist worker owns Ray (see above)."""
    from tests import test_disagg

    total_cpus = ray.cluster_resources()["CPU"]
    case = test_disagg.make_model_and_prompts(checkpoint_factory)
    for send_type in ("GET", "PUT"):
        test_disagg.check_prefill_then_decode(case, send_type, producer_pp=2)
    # a P stage dies while its KV is leased: the read names the stage, P's endpoint refuses the
    # pull instead of dying, D computes the prompt itself
    model_dir, prompts, reference = case
    p = test_disagg._engine(model_dir, "kv_producer", pipeline_parallel_size=2)
    d = test_disagg._engine(model_dir, "kv_consumer")
    try:
        first = test_disagg._run(p, [test_disagg._request("r4", prompts[4], 1,
                                                          do_remote_decode=True)])
        params = first["r4"][1].kv_transfer_params
        ray.kill(p.executor.stages[1])
        _wait_until_dead(p.executor.stages[1])  # ray.kill only asks: a call may still run
        with pytest.raises(RuntimeError, match=r"pipeline stage 1 \(layers 2-3\)"):
            p.kv_connector.stages[1].read_kv_blocks(params.block_ids)
        out = test_disagg._run(d, [test_disagg._request("r4", prompts[4], test_disagg.MAX_TOKENS,
                                                        kv_transfer_params=params)])
        assert out["r4"][0] == reference["r4"]
        assert d.scheduler.num_prompt_tokens_computed == len(prompts[4])
        assert p.kv_connector.stats().dropped_messages == 1  # the refused pull
        assert test_disagg._settle(d)
    finally:
        p.shutdown()
        d.shutdown()
    deadline = time.monotonic() + 20  # P's actors and placement group gave back every CPU
    while ray.available_resources().get("CPU", 0) < total_cpus:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)


def _wait_until_dead(actor, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.num_kv_blocks_that_fit.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError("the killed stage actor still answers")


def test_bad_pipeline_arguments(ray_cluster, checkpoint_factory):
    model_dir = checkpoint_factory("qwen2", num_hidden_layers=4)
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        LLM(model_dir, pipeline_parallel_size=0)
    with pytest.raises(ValueError, match="4 layers"):
        LLM(model_dir, pipeline_parallel_size=5)
    with pytest.raises(ValueError, match="sums to 5"):
        LLM(model_dir, pipeline_parallel_size=2, pp_layer_partition="3,2")
    with pytest.raises(ValueError, match=">= 1"):
        LLM(model_dir, pipeline_parallel_size=2, pp_layer_partition="4,0")
    with pytest.raises(ValueError, match="threads_per_stage"):
        LLM(model_dir, pipeline_parallel_size=2, threads_per_stage=64)


def test_ray_job_submit(checkpoint_factory):
    """`ray start --head` on loopback, `ray job submit` examples/ray_job.py, check, stop."""
    if ray.is_initialized():
        ray.shutdown()
    model_dir = checkpoint_factory("qwen2", num_hidden_layers=4)
    # Ray's dashboard agent listens on 52365 unless told otherwise. Another Ray on this host
    # (a parallel test worker's ray.init) may hold it: the agent then runs without its HTTP
    # server and `job submit` answers "No available agent" for ever. Own ports for everything.
    port, dash, agent_http, agent_grpc, metrics = (free_port() for _ in range(5))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # unix socket paths must be short
    head = subprocess.Popen(
        [RAY_CLI, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 90
        while True:
            probe = subprocess.run([RAY_CLI, "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, probe.stderr[-2000:]
            time.sleep(2)
        while True:  # `job list` answers before the head's job agent is up: retry on that
            job = subprocess.run(
                [RAY_CLI, "job", "submit", "--address", address, "--working-dir", REPO,
                 "--", sys.executable, "examples/ray_job.py", model_dir,
                 "--pipeline-parallel-size", "2", "--max-tokens", "8"],
                env=env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in job.stderr + job.stdout:
                break
            assert time.monotonic() < deadline + 120, job.stderr[-2000:]  # slow under load
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "RESULT generated 4 completions, 32 tokens" in job.stdout
    finally:
        os.killpg(head.pid, 15)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_pp2_structured_outputs_on_ray_stages(ray_cluster, checkpoint_factory, tmp_path):
    """Bitmasks filled by the driver travel with each microbatch to the last Ray stage: the
    same constrained greedy tokens as one in-process stage, every output valid."""
    import json

    import jsonschema

    from engine_core import StructuredOutputsParams
    from tests.text_checkpoint import add_tokenizer

    model_dir = add_tokenizer(checkpoint_factory("qwen2", num_hidden_layers=4),
                              str(tmp_path / "model"))
    schema = {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
        "required": ["id", "tags"]}
    constraints = [StructuredOutputsParams(json=schema), StructuredOutputsParams(
        regex=r"(yes|no)-\d{2}"), StructuredOutputsParams(choice=["left", "right"])] * 2
    params = [SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=c)
              for c in constraints]
    prompts = [f"item {i}: " for i in range(len(params))]
    outputs = {}
    for pp in (1, 2):
        llm = LLM(model_dir, dtype="float32", pipeline_parallel_size=pp, threads_per_stage=1)
        try:
            outputs[pp] = llm.generate(prompts, params, use_tqdm=False)
        finally:
            llm.shutdown()
    assert ([o.outputs[0].token_ids for o in outputs[2]]
            == [o.outputs[0].token_ids for o in outputs[1]])
    for output in outputs[2][::3]:
        jsonschema.validate(json.loads(output.outputs[0].text), schema)
