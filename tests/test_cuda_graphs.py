"""CUDA graphs of decode steps (`executors/cuda_graphs.py`), tested without a GPU.

A fake graph factory stands in for `torch.cuda.CUDAGraph`: its "graph" runs the captured
region again on replay, over the same buffers, so everything the runner does around a graph
(choosing the size, copying a step into the buffers, padding, returning the output rows,
falling back to eager) is checked on CPU, with the Triton backend under its interpreter. That
the captured region itself could be recorded as a graph (no `.item()`, no `nonzero`, nothing
copied from the host) is checked by running it on `device="meta"` under a dispatch mode that
records those. Real capture and replay are checked on a GPU when there is one. (Without a GPU
tests/conftest.py sets TRITON_INTERPRET=1.)
"""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from collections.abc import Callable

import pytest
import torch
from engine_core.executors.cuda_graphs import DecodeGraphRunner
from engine_core.executors.inprocess import InProcessExecutor
from engine_core.executors.stage_worker import StageWorker
from engine_core.executors.step_inputs import StepInputs, build_step_inputs
from engine_core.models import LlamaModel, load_model, load_model_config
from engine_core.models.llama import KVCache
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from engine_core.config import EngineArgs, EngineConfig, ExecutionConfig
from engine_core.engine import EngineCore
from engine_core.messages import EngineCoreRequest
from engine_core.sampling_params import SamplingParams
from tests.test_generate_parity import hf_greedy, make_prompts

BLOCK = 4
MAX_MODEL_LEN = 32  # a graph's block table is 8 blocks wide
NUM_BLOCKS = 40
SIZES = (1, 2, 4)
aten = torch.ops.aten


# ---- the fake graph ---------------------------------------------------------------------------
class FakeGraph:
    """Replays by running the captured region again (same buffers, same output buffer)."""

    def __init__(self, region: Callable[[], None]) -> None:
        self.region = region
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.region()


class FakeGraphFactory:
    """`GraphFactory` for CPU tests: "capture" runs the region once, as a recording would."""

    def __init__(self, around: Callable[[Callable[[], None]], None] | None = None) -> None:
        self.around = around  # runs the region at capture (default: plainly)
        self.graphs: list[FakeGraph] = []

    def capture(self, region: Callable[[], None]) -> FakeGraph:
        if self.around is None:
            region()
        else:
            self.around(region)
        graph = FakeGraph(region)
        self.graphs.append(graph)
        return graph


# ---- a tiny stage and its steps ---------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(checkpoint_factory):
    return checkpoint_factory("llama", num_hidden_layers=2)


def make_caches(model: LlamaModel, seed: int) -> list[KVCache]:
    """Random K/V in every block but the null block 0 (as if contexts were prefilled)."""
    generator = torch.Generator().manual_seed(seed)
    shape = model.kv_cache_shape(NUM_BLOCKS, BLOCK)
    cache = torch.randn(shape, generator=generator)  # [layers, 2, blocks, BLOCK, Hkv, D]
    cache[:, :, 0] = 0
    return LlamaModel.kv_caches_from(cache)


def clone_caches(caches: list[KVCache]) -> list[KVCache]:
    return [(k.clone(), v.clone()) for k, v in caches]


def decode_step(rng: random.Random, num_seqs: int, vocab: int, first: bool,
                query_lens: list[int] | None = None) -> StepInputs:
    """A step of `num_seqs` sequences with random contexts (up to MAX_MODEL_LEN) over random,
    disjoint, non-contiguous block tables (never block 0); one new token each by default."""
    query_lens = query_lens or [1] * num_seqs
    free = rng.sample(range(1, NUM_BLOCKS), NUM_BLOCKS - 1)
    computed, tables = [], []
    for q in query_lens:
        seq_len = rng.randint(q, MAX_MODEL_LEN)
        computed.append(seq_len - q)
        tables.append([free.pop() for _ in range(-(-seq_len // BLOCK))])
    token_ids = [rng.randrange(vocab) for _ in range(sum(query_lens))] if first else None
    ends = [sum(query_lens[:i + 1]) - 1 for i in range(num_seqs)]
    return build_step_inputs("triton", token_ids, query_lens, computed, tables, BLOCK, ends,
                             torch.device("cpu"))


class Stage:
    """One stage model with two copies of the same KV cache: one for eager steps, one the
    graph runner (with the fake factory) owns."""

    def __init__(self, model_dir: str, layer_range: tuple[int, int],
                 sizes: tuple[int, ...] = SIZES) -> None:
        config = load_model_config(model_dir)
        self.model = load_model(model_dir, config, layer_range, torch.float32, "cpu")
        self.model.rotary.build_table(MAX_MODEL_LEN, "cpu")
        self.eager_caches = make_caches(self.model, seed=1)
        self.factory = FakeGraphFactory()
        self.runner = DecodeGraphRunner(self.model, clone_caches(self.eager_caches), sizes,
                                        MAX_MODEL_LEN, BLOCK, self.factory)
        self.runner.capture()

    def eager(self, inputs: StepInputs, hidden: torch.Tensor | None) -> torch.Tensor:
        return self.model(inputs.input_ids, hidden, self.eager_caches, inputs.attention)

    def graphed(self, inputs: StepInputs, hidden: torch.Tensor | None) -> torch.Tensor:
        return self.runner.run(inputs, hidden).clone()

    def assert_caches_equal(self) -> None:
        """Both caches hold the same K/V outside the null block (where padding rows write)."""
        for (ke, ve), (kg, vg) in zip(self.eager_caches, self.runner.kv_caches):
            assert torch.equal(ke[1:], kg[1:]) and torch.equal(ve[1:], vg[1:])


@pytest.fixture(scope="module")
def first_stage(model_dir):
    with torch.inference_mode():
        return Stage(model_dir, (0, 2))


# ---- the runner over the fake graph -----------------------------------------------------------
def test_capture_runs_largest_first_into_one_output_buffer(first_stage):
    runner = first_stage.runner
    assert list(runner.graphs) == [4, 2, 1]  # insertion order = capture order
    assert runner.block_tables.shape == (4, MAX_MODEL_LEN // BLOCK)
    assert torch.equal(runner.query_start_loc, torch.arange(5))


@torch.inference_mode()
def test_padded_batch_gives_the_eager_rows(first_stage):
    rng, vocab = random.Random(0), first_stage.model.config.vocab_size
    full = decode_step(rng, 4, vocab, first=True)  # leaves a sequence in row 3
    assert torch.equal(first_stage.graphed(full, None), first_stage.eager(full, None))
    inputs = decode_step(rng, 3, vocab, first=True)
    graph = first_stage.runner.graphs[4]
    replays = graph.replays
    got = first_stage.graphed(inputs, None)
    assert graph.replays == replays + 1  # a batch of 3 ran on the graph of 4
    assert got.shape == (3, first_stage.model.config.hidden_size)
    torch.testing.assert_close(got, first_stage.eager(inputs, None), rtol=0, atol=0)
    first_stage.assert_caches_equal()
    runner = first_stage.runner  # the padding row is harmless: null block, context 1, slot 0
    assert runner.seq_lens[3] == 1 and runner.positions[3] == 0 and runner.slot_mapping[3] == 0
    assert runner.input_ids[3] == 0 and not runner.block_tables[3].any()


@torch.inference_mode()
def test_decode_steps_match_eager_and_reuse_the_buffers(first_stage):
    runner, rng = first_stage.runner, random.Random(1)
    buffers = {name: getattr(runner, name).data_ptr() for name in (
        "input_ids", "positions", "slot_mapping", "seq_lens", "query_start_loc",
        "block_tables", "output")}
    seen: list[tuple[int, int]] = []  # (input_ids, block_tables) data_ptr the forward read

    def record(module, args):
        seen.append((args[0].data_ptr(), args[3].block_tables.data_ptr()))

    hook = first_stage.model.register_forward_pre_hook(record)
    try:
        for num_seqs in (1, 4, 2, 3, 1, 4):  # every size, padded and not
            inputs = decode_step(rng, num_seqs, first_stage.model.config.vocab_size, True)
            got = runner.run(inputs, None)
            assert got.data_ptr() == runner.output.data_ptr()
            table = inputs.arrays["block_tables"]  # as wide as this step's longest context
            assert torch.equal(runner.block_tables[:num_seqs, :table.shape[1]], table)
            assert not runner.block_tables[:num_seqs, table.shape[1]:].any()
            got = got.clone()
            torch.testing.assert_close(got, first_stage.eager(inputs, None), rtol=0,
                                       atol=0)
            first_stage.assert_caches_equal()
    finally:
        hook.remove()
    graph_reads = seen[0::2]  # every other forward was the eager one
    assert graph_reads == [(buffers["input_ids"], buffers["block_tables"])] * 6
    assert {n: getattr(runner, n).data_ptr() for n in buffers} == buffers


@torch.inference_mode()
def test_later_stage_takes_hidden_states(model_dir):
    stage = Stage(model_dir, (1, 2))
    rng = random.Random(2)
    for num_seqs in (4, 2, 3):  # row 3 holds a sequence, then padding
        inputs = decode_step(rng, num_seqs, 0, first=False)
        hidden = torch.randn(num_seqs, stage.model.config.hidden_size)
        torch.testing.assert_close(stage.graphed(inputs, hidden), stage.eager(inputs, hidden),
                                   rtol=0, atol=0)
        stage.assert_caches_equal()
    assert stage.runner.hidden_states is not None and stage.runner.input_ids is None
    assert not stage.runner.hidden_states[3].any()  # the padding row of the last step


def test_prefill_mixed_and_oversized_steps_run_eagerly(first_stage):
    rng, vocab = random.Random(3), first_stage.model.config.vocab_size
    runner = first_stage.runner
    assert runner.graph_size(decode_step(rng, 3, vocab, True)) == 4
    assert runner.graph_size(decode_step(rng, 1, vocab, True)) == 1
    assert runner.graph_size(decode_step(rng, 5, vocab, True)) is None  # above the largest
    assert runner.graph_size(decode_step(rng, 2, vocab, True, query_lens=[1, 3])) is None
    assert runner.graph_size(decode_step(rng, 1, vocab, True, query_lens=[5])) is None
    with pytest.raises(ValueError, match="no captured graph"):
        runner.run(decode_step(rng, 5, vocab, True), None)


def test_rope_table_fixed_by_build_table_is_never_rebuilt(first_stage):
    rotary = first_stage.model.rotary
    table = rotary._table
    positions = torch.tensor([0, MAX_MODEL_LEN - 1])
    rotary.cos_sin(positions, MAX_MODEL_LEN, torch.float32)
    assert rotary._table is table
    with pytest.raises(ValueError, match="build_table"):
        rotary.cos_sin(positions, MAX_MODEL_LEN + 1, torch.float32)


# ---- the captured region has no host traffic (meta device) ------------------------------------
class HostTrafficRecorder(TorchDispatchMode):
    """Records every op that would stall a CUDA graph capture or bake host data into it: a
    read of a device value on the host (`.item()`, `.tolist()`, `bool()`: _local_scalar_dense),
    `nonzero` (a data-dependent shape) and any op that mixes host (CPU) and device tensors
    (a host-to-device `_to_copy`/`copy_`, indexing with a CPU index). The flagged reads return
    a placeholder so that one run collects them all."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in (aten._local_scalar_dense, aten.item):
            self.events.append(str(func))
            return 0
        if func.overloadpacket in (aten.nonzero, aten.nonzero_static, aten.argwhere):
            self.events.append(str(func))
            return torch.zeros(0, args[0].dim(), dtype=torch.int64, device=args[0].device)
        out = func(*args, **kwargs)
        tensors = [t for t in pytree.tree_leaves((args, kwargs, out))
                   if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if "cpu" in devices and len(devices) > 1:
            self.events.append(f"{func} mixes {sorted(devices)} tensors")
        return out


def meta_runner(model_dir: str, layer_range: tuple[int, int], recorder: HostTrafficRecorder,
                build_table: bool = True) -> DecodeGraphRunner:
    """A runner over a stage built on the meta device (weights, KV caches, buffers), whose
    factory runs each captured region under `recorder`."""
    config = load_model_config(model_dir)
    with torch.device("meta"):
        model = LlamaModel(config, layer_range).eval()
    if build_table:
        model.rotary.build_table(MAX_MODEL_LEN, "meta")
    caches = LlamaModel.kv_caches_from(
        torch.zeros(model.kv_cache_shape(NUM_BLOCKS, BLOCK), device="meta"))

    def around(region: Callable[[], None]) -> None:
        with recorder:
            region()

    return DecodeGraphRunner(model, caches, SIZES, MAX_MODEL_LEN, BLOCK,
                             FakeGraphFactory(around))


@pytest.mark.parametrize("layer_range", [(0, 2), (0, 1), (1, 2)],
                         ids=["first-and-last", "first", "last"])
def test_captured_region_has_no_host_traffic(model_dir, layer_range):
    recorder = HostTrafficRecorder()
    runner = meta_runner(model_dir, layer_range, recorder)
    runner.capture()
    assert runner.output.device.type == "meta" and len(runner.graphs) == len(SIZES)
    assert recorder.events == []
    # nor does serving a step (its arrays already on the device) outside the graph
    host = decode_step(random.Random(4), 3, 8, first=layer_range[0] == 0)
    arrays = {name: a.to("meta") for name, a in host.arrays.items()}
    inputs = dataclasses.replace(host, input_ids=arrays.get("input_ids"), arrays=arrays)
    hidden = None if layer_range[0] == 0 else torch.zeros(3, runner.output.shape[1],
                                                          device="meta")
    with recorder, torch.inference_mode():
        runner.run(inputs, hidden)
    assert recorder.events == []


def test_recorder_catches_host_reads_and_transfers():
    recorder = HostTrafficRecorder()
    x = torch.zeros(4, 3, device="meta")
    with recorder:
        x.sum().item()  # e.g. a kernel launcher sizing its grid from the longest context
        x.nonzero()
        x.copy_(torch.ones(4, 3))  # host to device
        x[torch.tensor([0, 2])]  # a CPU index
        torch.arange(4).to("meta")
    assert len(recorder.events) == 5, recorder.events
    assert "_local_scalar_dense" in recorder.events[0] and "nonzero" in recorder.events[1]


def test_recorder_catches_a_rope_table_built_inside_the_region(model_dir):
    # Without build_table the first forward builds the table on the host and copies it over
    recorder = HostTrafficRecorder()
    meta_runner(model_dir, (0, 1), recorder, build_table=False).capture()
    assert any("mixes" in e for e in recorder.events), recorder.events


# ---- through the stages and the engine loop ---------------------------------------------------
class GraphedInProcessExecutor(InProcessExecutor):
    """The in-process executor whose stages capture their decode steps with `factory`."""

    def __init__(self, config: EngineConfig, factory: FakeGraphFactory) -> None:
        num_stages = config.parallel.pipeline_parallel_size
        self.stages = [StageWorker(config, i, graph_factory=factory) for i in range(num_stages)]
        self.num_kv_blocks = min(stage.num_kv_blocks_that_fit() for stage in self.stages)
        for stage in self.stages:
            stage.init_kv_cache(self.num_kv_blocks)


def test_engine_with_graphs_matches_transformers(model_dir):
    # Decode batches of 5 (above the largest size: eager), 4, 3 (padded to 4), 2, 1 (padded
    # to 2), two steps each, over two pipeline stages (the second takes hidden states); one
    # batch in flight, so that the batches are these
    max_tokens = [3, 5, 7, 9, 11]
    prompts = make_prompts(load_model_config(model_dir).vocab_size, [1, 6, 13, 4, 9], seed=5)
    expected = hf_greedy(model_dir, prompts, max(max_tokens))
    config = EngineArgs(model=model_dir, dtype="float32", max_model_len=MAX_MODEL_LEN,
                        block_size=BLOCK, num_kv_blocks=NUM_BLOCKS, max_num_seqs=8,
                        pipeline_parallel_size=2, max_concurrent_batches=1,
                        distributed_executor_backend="inprocess",
                        attention_backend="triton").resolve()
    config = dataclasses.replace(config, execution=ExecutionConfig("triton", (2, 4)))
    factory = FakeGraphFactory()
    engine = EngineCore(config, GraphedInProcessExecutor(config, factory))
    try:
        for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
            engine.add_request(EngineCoreRequest(str(i), prompt, SamplingParams(
                temperature=0.0, max_tokens=n)))
        got: dict[str, list[int]] = defaultdict(list)
        while engine.has_unfinished_requests():
            for output in engine.step():
                got[output.request_id].extend(output.new_token_ids)
    finally:
        engine.shutdown()
    assert [got[str(i)] for i in range(5)] == [e[:n] for e, n in zip(expected, max_tokens)]
    replays = [g.replays for g in factory.graphs]  # stage 0's 4 and 2, then stage 1's
    assert replays == [4, 4, 4, 4]  # decode batches 4 and 3 on size 4, 2 and 1 on size 2


# ---- on a GPU ---------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.inference_mode()
def test_cuda_graph_replays_match_eager(model_dir):
    from engine_core.executors.cuda_graphs import CudaGraphFactory

    config = load_model_config(model_dir)
    model = load_model(model_dir, config, (0, 2), torch.float32, "cuda")
    model.rotary.build_table(MAX_MODEL_LEN, "cuda")
    caches = [(k.cuda(), v.cuda()) for k, v in make_caches(model, seed=1)]
    eager_caches = clone_caches(caches)
    runner = DecodeGraphRunner(model, caches, SIZES, MAX_MODEL_LEN, BLOCK, CudaGraphFactory())
    runner.capture()
    rng = random.Random(6)
    for num_seqs in (3, 1, 4, 2):
        host = decode_step(rng, num_seqs, config.vocab_size, True)
        inputs = build_step_inputs(  # the same step laid out on the GPU
            "triton", host.input_ids.tolist(), [1] * num_seqs,
            (host.arrays["seq_lens"] - 1).tolist(),
            [row[row > 0].tolist() for row in host.arrays["block_tables"]], BLOCK,
            list(range(num_seqs)), torch.device("cuda"))
        got = runner.run(inputs, None).clone()
        want = model(inputs.input_ids, None, eager_caches, inputs.attention)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
