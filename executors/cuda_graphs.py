"""CUDA graphs for decode steps: one stage's forward captured once per batch size, replayed.

A decode step (every sequence one new token) of the Triton backend launches the same kernels
on tensors of the same shapes whenever it has the same number of sequences: only the contents
of its inputs change. `DecodeGraphRunner` captures the stage's forward at each of
`cudagraph_capture_sizes` into persistent input buffers sized for the largest, then serves a
decode step of B sequences by copying the step's device arrays into those buffers and replaying
the smallest captured size >= B. What stays outside the graph: building the step's inputs, the
logits and the sampler (`StageWorker`). Steps with a prefill, and batches above the largest
size, run eagerly.

The rows between B and the captured size are padding, made harmless as SGLang does: context
length 1, position 0, cache slot 0 and a block table of the null block 0 (which the block
manager never hands to a request), token id 0 or a zero hidden state. Their K/V land in block
0 and their outputs are never read.

Graph capture is behind `GraphFactory`: `CudaGraphFactory` wraps `torch.cuda.CUDAGraph`; a
test passes a factory whose "graph" runs the captured callable again on replay, over the same
buffers, so every step of the runner is exercised without a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from engine_core.executors.step_inputs import StepInputs
from engine_core.models.llama import KVCache, LlamaModel
from engine_core.models.triton_attention import TritonAttentionMetadata


class CapturedGraph(Protocol):
    """A recorded region: `replay` runs it again over the same memory."""

    def replay(self) -> None: ...


class GraphFactory(Protocol):
    """Records regions as graphs. All graphs of one factory share one memory pool, so they may
    be replayed one at a time only (the runner's sizes are captured largest first, so the
    smaller ones fit in the largest one's memory)."""

    def capture(self, region: Callable[[], None]) -> CapturedGraph:
        """Record `region` (which reads and writes only memory that outlives the graph, and
        may be run any number of times) and return its graph. The factory runs whatever
        warm-up the recording needs first (kernel compilation, library workspaces)."""
        ...


class CudaGraphFactory:
    """`torch.cuda.CUDAGraph`s in one private memory pool of the current CUDA device."""

    def __init__(self, num_warmups: int = 2) -> None:
        self.num_warmups = num_warmups
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, region: Callable[[], None]) -> CapturedGraph:
        # Warm-up on a side stream, as torch.cuda.graph asks: Triton compiles its kernels and
        # cuBLAS sets up its workspaces outside the capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.num_warmups):
                region()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            region()
        return graph


class DecodeGraphRunner:
    """Decode steps of one stage (`model` with its `kv_caches`), replayed from CUDA graphs.

    The buffers, all on the model's device and allocated once (B = the largest capture size):
    `input_ids [B]` (first stage) or `hidden_states [B, hidden]` (later stages), `positions`,
    `slot_mapping`, `seq_lens [B]`, `query_start_loc [B + 1]` (= arange: one token a sequence)
    and `block_tables [B, ceil(max_model_len / block_size)]`, and the output
    `[B, hidden]`. Every graph reads and writes these and the KV caches only, so the caches
    must not be reallocated while the runner lives.

    The caller must have fixed the model's RoPE table for `max_model_len` on the device
    (`RotaryEmbedding.build_table`) before `capture`, and must pass only steps whose sequences'
    context lengths are <= `max_model_len` (block table columns past the fixed width are not
    copied: they hold no context).
    """

    def __init__(self, model: LlamaModel, kv_caches: list[KVCache], capture_sizes: Sequence[int],
                 max_model_len: int, block_size: int, factory: GraphFactory) -> None:
        if not capture_sizes or any(s < 1 for s in capture_sizes):
            raise ValueError(f"cudagraph_capture_sizes must be ints >= 1, got {capture_sizes!r}")
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sorted(set(capture_sizes))
        self.max_model_len = max_model_len
        self.factory = factory
        self.graphs: dict[int, CapturedGraph] = {}
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        max_size = self.sizes[-1]
        hidden = model.config.hidden_size
        self.max_blocks = math.ceil(max_model_len / block_size)

        def ints(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=device)

        self.input_ids = ints(max_size) if model.is_first else None  # [B]
        self.hidden_states = (None if model.is_first  # [B, hidden]
                              else torch.zeros(max_size, hidden, dtype=dtype, device=device))
        self.positions = ints(max_size)  # [B]
        self.slot_mapping = ints(max_size)  # [B]
        self.seq_lens = torch.ones(max_size, dtype=torch.int64, device=device)  # [B]
        self.query_start_loc = torch.arange(max_size + 1, dtype=torch.int64,  # [B + 1]
                                            device=device)
        self.block_tables = ints(max_size, self.max_blocks)  # [B, max_blocks]
        self.output = torch.zeros(max_size, hidden, dtype=dtype, device=device)  # [B, hidden]

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def capture(self) -> None:
        """Record the forward at every capture size, largest first (its memory is then reused
        by the smaller ones from the shared pool)."""
        with torch.inference_mode():
            for size in reversed(self.sizes):
                self.graphs[size] = self.factory.capture(self._region(size))

    def forward(self, size: int) -> None:
        """The captured region at batch `size`: the stage's forward over the first `size` rows
        of the buffers, into `output[:size]`. Only device work: no host reads, no transfers."""
        meta = TritonAttentionMetadata(
            positions=self.positions[:size], slot_mapping=self.slot_mapping[:size],
            seq_lens=self.seq_lens[:size], query_start_loc=self.query_start_loc[:size + 1],
            block_tables=self.block_tables[:size], max_query_len=1,
            max_seq_len=self.max_model_len)
        input_ids = None if self.input_ids is None else self.input_ids[:size]
        hidden = None if self.hidden_states is None else self.hidden_states[:size]
        out = self.model(input_ids, hidden, self.kv_caches, meta)  # [size, hidden]
        self.output[:size].copy_(out)

    def _region(self, size: int) -> Callable[[], None]:
        return lambda: self.forward(size)

    def _pad(self, start: int, end: int) -> None:
        """Make rows [start, end) harmless padding: token 0 or a zero hidden state at position
        0, context length 1 in the null block 0, its K/V written to slot 0."""
        if self.input_ids is not None:
            self.input_ids[start:end].zero_()
        if self.hidden_states is not None:
            self.hidden_states[start:end].zero_()
        self.positions[start:end].zero_()
        self.slot_mapping[start:end].zero_()
        self.seq_lens[start:end].fill_(1)
        self.block_tables[start:end].zero_()

    def graph_size(self, inputs: StepInputs) -> int | None:
        """The captured size that serves this step: the smallest >= its number of sequences,
        or None when it must run eagerly (a sequence with more than one new token, more
        sequences than the largest size, or no Triton arrays)."""
        if inputs.max_query_len != 1 or "seq_lens" not in inputs.arrays:
            return None
        for size in self.sizes:
            if size >= inputs.num_seqs:
                return size if size in self.graphs else None
        return None

    def run(self, inputs: StepInputs, hidden_states: torch.Tensor | None) -> torch.Tensor:
        """Replay the graph of `graph_size(inputs)` (which must not be None) for this decode
        step; `hidden_states [num_seqs, hidden]` on a stage after the first. Returns
        `[num_seqs, hidden]`: a view of the output buffer, valid until the next `run`.

        The step's arrays are copied device to device on the current stream: no host sync."""
        size = self.graph_size(inputs)
        if size is None:
            raise ValueError(f"no captured graph serves a step of {inputs.num_seqs} sequences "
                             f"with max_query_len={inputs.max_query_len}")
        n, arrays = inputs.num_seqs, inputs.arrays
        if self.input_ids is not None:
            if inputs.input_ids is None:
                raise ValueError("the first stage's graphs need the step's input_ids")
            self.input_ids[:n].copy_(inputs.input_ids)
        else:
            if self.hidden_states is None or hidden_states is None:
                raise ValueError("a later stage's graphs need the step's hidden_states")
            self.hidden_states[:n].copy_(hidden_states)
        for name in ("positions", "slot_mapping", "seq_lens"):
            getattr(self, name)[:n].copy_(arrays[name])
        table = arrays["block_tables"]  # [n, width], width varies from step to step
        width = min(table.shape[1], self.max_blocks)
        self.block_tables[:n, :width].copy_(table[:, :width])
        if width < self.max_blocks:  # the null block past each table, not a former step's
            self.block_tables[:n, width:].zero_()
        if n < size:
            self._pad(n, size)
        self.graphs[size].replay()
        return self.output[:n]
