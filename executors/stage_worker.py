"""One pipeline stage: a layer range of the model, its KV cache and per-request state.

The stage keeps every request's token ids and block table, updated from the incremental
`StepBatch` messages. Stage 0 embeds token ids; later stages take the previous stage's hidden
states. The last stage computes logits only for the requests that sample and runs the sampler.

A batch crosses a process boundary to get here, so each stage checks what it takes in before
it indexes anything with it: token ids in the vocabulary, block ids in the KV cache, positions
within the request's tokens, its block table and max_model_len. A request that breaks one drops
out of the step (and of every later one) on every stage alike, since all stages see the same
batches, and the last stage returns an error row for it: its request fails, the step goes on.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from engine_core.executors.cuda_graphs import CudaGraphFactory, DecodeGraphRunner, GraphFactory
from engine_core.executors.gpu_memory import (
    StartupMemory,
    log_plan,
    measure,
    plan_kv_cache,
    sized_by_gpu_budget,
)
from engine_core.executors.host_memory import keep_freed_memory
from engine_core.executors.kv_memory import allocate_resident
from engine_core.executors.sampler import Sampler, SamplingRow
from engine_core.executors.step_inputs import build_step_inputs
from engine_core.executors.token_bitmask import (
    NO_ALLOWED_TOKEN,
    apply_token_bitmasks,
    bitmask_error,
    bitmask_words,
)
from engine_core.models import load_model
from engine_core.models.linear import warm_up_linears

from engine_core.config import EngineConfig
from engine_core.messages import (
    CachedRequest,
    NewRequest,
    SampledToken,
    StepBatch,
    StepOutput,
)
from engine_core.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# KV cache bytes per stage when neither num_kv_blocks nor kv_cache_memory is set and
# gpu_memory_utilization does not apply (not a GPU)
DEFAULT_KV_CACHE_MEMORY = 2 << 30


@dataclass
class _RequestState:
    token_ids: list[int]  # prompt + outputs: the inputs of this request's steps
    prompt_token_ids: list[int]  # kept apart for the sampler, so no step copies them
    output_token_ids: list[int]
    block_ids: list[int]
    sampling_params: SamplingParams
    stop_ids: tuple[int, ...]
    error: str | None = None  # set once its inputs broke an invariant: it never runs again


@dataclass
class _Scheduled:
    """One request's part of a step, as this stage runs it."""

    request_id: str
    state: _RequestState
    num_computed: int
    num_new: int
    drafts: list[int]  # verified by this step, after the request's known tokens
    bitmask: bytes = b""  # structured outputs: its sampler rows' allowed tokens (b"": all)

    @property
    def reaches_end(self) -> bool:
        """Whether the step computes the request's last known token (and every draft): the
        last stage samples for it."""
        return self.num_computed + self.num_new >= len(self.state.token_ids) + len(self.drafts)

    def input_token_ids(self) -> list[int]:
        """The token ids this step computes: known tokens, then drafts."""
        known = self.state.token_ids
        end = self.num_computed + self.num_new
        if end <= len(known):
            return known[self.num_computed:end]
        return known[self.num_computed:] + self.drafts[:end - len(known)]


class StageWorker:
    """Holds layers [start, end) of the model; executes steps in submission order.

    With `config.execution.cudagraph_capture_sizes` set, on CUDA (or with any `graph_factory`,
    which tests pass on CPU), `init_kv_cache` captures the decode steps as graphs
    (`cuda_graphs.DecodeGraphRunner`) and `execute` replays them for the steps they serve."""

    def __init__(self, config: EngineConfig, stage_index: int,
                 graph_factory: GraphFactory | None = None) -> None:
        self.config = config
        self.stage_index = stage_index
        ranges = config.parallel.layer_ranges(config.model.num_layers)
        self.layer_range = ranges[stage_index]
        self.is_first = stage_index == 0
        self.is_last = stage_index == len(ranges) - 1
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        if config.parallel.threads_per_stage:
            torch.set_num_threads(config.parallel.threads_per_stage)
        if self.device.type == "cpu":
            keep_freed_memory()  # no page faults on every step's activations
        self.model = load_model(config.model_dir, config.model, self.layer_range, self.dtype,
                                self.device)
        if self.device.type == "cpu":  # oneDNN's primitives for every step size, built now
            sched, head = config.scheduler, getattr(self.model, "lm_head", None)
            head_rows = min(sched.max_num_seqs, sched.max_num_batched_tokens)  # rows sampled
            warm_up_linears(self.model, sched.max_num_batched_tokens,
                            {head: head_rows} if head is not None else None)
        self.sampler = Sampler(config.seed) if self.is_last else None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_kv_blocks = 0
        self.requests: dict[str, _RequestState] = {}
        self._graph_factory = graph_factory
        self.graphs: DecodeGraphRunner | None = None  # set by init_kv_cache when graphs are on

    # ---- KV cache -----------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        m, start_end = self.config.model, self.layer_range
        num_layers = start_end[1] - start_end[0]
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * num_layers * self.config.cache.block_size * m.num_kv_heads * m.head_dim * elem

    def num_kv_blocks_that_fit(self, start: StartupMemory | None = None) -> int:
        """Blocks this stage can hold (including the null block), capped at what the scheduler
        could ever use: max_num_seqs full-length requests. `start`: on a GPU sized by
        gpu_memory_utilization, the device's reading taken before the weights were loaded
        (see `kv_blocks_that_fit`)."""
        return kv_blocks_that_fit([self], start)

    def _kv_blocks_from_settings(self) -> int:
        """num_kv_blocks, else kv_cache_memory (default 2 GiB) in blocks, capped as above."""
        cache, sched = self.config.cache, self.config.scheduler
        needed = sched.max_num_seqs * math.ceil(sched.max_model_len / cache.block_size) + 1
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        memory = cache.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY
        return min(needed, memory // self.kv_bytes_per_block())

    @torch.inference_mode()
    def profile_run(self, hidden_states: torch.Tensor | None = None) -> torch.Tensor | None:
        """One forward (and on the last stage the logits and the sampler) at the largest step
        the scheduler can build: max_num_batched_tokens tokens (at most max_model_len per
        sequence) over as many sequences as max_num_seqs allows, each a prefill without cached
        context, on a one-block scratch cache (every block id is the null block 0). For the
        GPU memory profile (`gpu_memory.measure`): the stage's KV cache, its requests and its
        sampler's generators are left untouched. `hidden_states`: the previous stage's output
        (zeros if None); returns this stage's output, or None on the last stage."""
        sched, m = self.config.scheduler, self.config.model
        block_size = self.config.cache.block_size
        num_tokens = min(sched.max_num_batched_tokens, sched.max_num_seqs * sched.max_model_len)
        num_seqs = min(sched.max_num_seqs, num_tokens)
        base, extra = divmod(num_tokens, num_seqs)
        query_lens = [base + (i < extra) for i in range(num_seqs)]
        ends = list(itertools.accumulate(query_lens))
        num_layers = self.layer_range[1] - self.layer_range[0]
        shape = (1, block_size, m.num_kv_heads, m.head_dim)  # [1 block, block_size, Hkv, D]
        scratch = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                    torch.zeros(shape, dtype=self.dtype, device=self.device))
                   for _ in range(num_layers)]
        inputs = build_step_inputs(
            self.config.execution.attention_backend, [0] * num_tokens if self.is_first else None,
            query_lens, [0] * num_seqs, [[0] * -(-q // block_size) for q in query_lens],
            block_size, [end - 1 for end in ends] if self.is_last else [], self.device)
        if not self.is_first and hidden_states is None:
            hidden_states = torch.zeros(num_tokens, m.hidden_size, dtype=self.dtype,
                                        device=self.device)  # [num_tokens, hidden]
        hidden = self.model(inputs.input_ids, hidden_states, scratch, inputs.attention)
        if not self.is_last:
            return hidden
        logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [num_seqs, vocab]
        # the sampler's costliest path: penalties, every filter, logprobs; a scratch sampler,
        # so the stage's own random stream is not advanced
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05,
                                repetition_penalty=1.1, frequency_penalty=0.1, logprobs=5)
        rows = [SamplingRow(params, [0], [0], ()) for _ in range(num_seqs)]
        Sampler(self.config.seed)(logits, rows)
        return None

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate the cache, every page resident before the first request. KVMemoryError (a
        ValueError naming the setting that sized it) if the device has not that much free."""
        m = self.config.model
        shape = (num_blocks, self.config.cache.block_size, m.num_kv_heads, m.head_dim)
        num_layers = self.layer_range[1] - self.layer_range[0]
        # zeroed, not left uninitialised: masked attention weights are 0, but 0 * NaN garbage
        # would be NaN
        tensors = allocate_resident([shape] * (2 * num_layers), self.dtype, self.device,
                                    self._kv_setting(num_blocks))
        self.kv_caches = [(tensors[2 * i], tensors[2 * i + 1]) for i in range(num_layers)]
        self.num_kv_blocks = num_blocks
        self._capture_graphs()

    def _capture_graphs(self) -> None:
        """Capture the decode graphs over the KV cache just allocated, if they are on."""
        sizes = self.config.execution.cudagraph_capture_sizes
        if not sizes or (self.device.type != "cuda" and self._graph_factory is None):
            return
        if self.config.execution.attention_backend != "triton":
            raise ValueError("cudagraph_capture_sizes needs attention_backend='triton', got "
                             f"{self.config.execution.attention_backend!r}")
        max_model_len = self.config.scheduler.max_model_len
        self.model.rotary.build_table(max_model_len, self.device)  # never rebuilt in a graph
        factory = self._graph_factory or CudaGraphFactory()
        self.graphs = DecodeGraphRunner(self.model, self.kv_caches, sizes, max_model_len,
                                        self.config.cache.block_size, factory)
        self.graphs.capture()

    def _kv_setting(self, num_blocks: int) -> str:
        """Which option sized the cache, for an error message."""
        cache, sched = self.config.cache, self.config.scheduler
        if cache.num_kv_blocks is not None:
            return f"num_kv_blocks={cache.num_kv_blocks}"
        if sized_by_gpu_budget(self.config):
            return (f"{num_blocks} blocks of {self.kv_bytes_per_block()} bytes from "
                    f"gpu_memory_utilization={cache.gpu_memory_utilization}")
        which = (f"kv_cache_memory={cache.kv_cache_memory}" if cache.kv_cache_memory
                 else "the default kv_cache_memory")
        return (f"{num_blocks} blocks of {self.kv_bytes_per_block()} bytes from {which}, capped "
                f"at max_num_seqs={sched.max_num_seqs} requests of "
                f"max_model_len={sched.max_model_len}")

    def read_kv_blocks(self, block_ids: list[int]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Copies of this stage's KV in `block_ids`: (global layer index, K, V) per layer, each
        `[len(block_ids), block_size, num_kv_heads, head_dim]`. ValueError for ids outside
        the cache."""
        index = self._block_index(block_ids)
        return [(self.layer_range[0] + i, k.index_select(0, index), v.index_select(0, index))
                for i, (k, v) in enumerate(self.kv_caches)]

    def _block_index(self, block_ids: list[int]) -> torch.Tensor:
        error = _ids_error("block", block_ids, self.num_kv_blocks)
        if error is not None:
            raise ValueError(error)
        return torch.tensor(block_ids, dtype=torch.long, device=self.device)

    def holds_layer(self, layer: int) -> bool:
        return self.layer_range[0] <= layer < self.layer_range[1]

    def write_kv_blocks(self, block_ids: list[int], layer: int, k: torch.Tensor,
                        v: torch.Tensor) -> None:
        """Write received KV of global `layer` into `block_ids` (which this stage must hold).
        ValueError, with nothing written, unless the ids, the layer and the shapes fit."""
        index = self._block_index(block_ids)
        if not self.holds_layer(layer):
            raise ValueError(f"layer {layer} is not on this stage {self.layer_range}")
        k_cache, v_cache = self.kv_caches[layer - self.layer_range[0]]
        expected = (len(block_ids), *k_cache.shape[1:])
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"KV of shape {list(k.shape)}/{list(v.shape)} for "
                             f"{len(block_ids)} blocks of shape {list(k_cache.shape[1:])}")
        k_cache.index_copy_(0, index, k.to(self.device, k_cache.dtype))
        v_cache.index_copy_(0, index, v.to(self.device, v_cache.dtype))

    def write_kv_layers(self, block_ids: list[int],
                        layers: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """`write_kv_blocks` for several (global layer, K, V) this stage holds."""
        for layer, k, v in layers:
            self.write_kv_blocks(block_ids, layer, k, v)

    # ---- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: StepBatch,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor | StepOutput:
        """Run this stage's layers on the batch. Returns hidden states `[num_tokens, hidden]` to
        pass to the next stage, or, on the last stage, the sampled tokens."""
        self._apply_updates(batch)
        scheduled: list[_Scheduled] = []  # what runs
        dropped = StepOutput(batch.step_id, [], [])  # error rows of the requests that don't
        for item in itertools.chain[NewRequest | CachedRequest](
                batch.new_requests, batch.cached_requests):
            state = self.requests[item.request_id]
            drafts = item.draft_token_ids
            error = state.error or self._step_error(state, item.num_computed_tokens,
                                                    item.num_new_tokens, drafts)
            if error is None and item.token_bitmask:
                error = bitmask_error(item.token_bitmask, 1 + len(drafts),
                                      self.config.model.vocab_size)
            if error is None:
                scheduled.append(_Scheduled(item.request_id, state, item.num_computed_tokens,
                                            item.num_new_tokens, drafts, item.token_bitmask))
            else:
                dropped.request_ids.append(item.request_id)
                dropped.sampled.append(SampledToken(-1, error=f"invalid step input: {error}"))
        if not scheduled:  # every request dropped out: nothing to compute
            if not self.is_last:
                return torch.empty(0, self.config.model.hidden_size, dtype=self.dtype,
                                   device=self.device)
            return dropped
        query_lens = [s.num_new for s in scheduled]
        computed = [s.num_computed for s in scheduled]
        # a prefill chunk short of the end samples nothing
        sampled_rows = [i for i, s in enumerate(scheduled) if s.reaches_end]
        token_ids = None
        if self.is_first:
            token_ids = [t for s in scheduled for t in s.input_token_ids()]
        elif hidden_states is None or hidden_states.shape != (sum(query_lens),
                                                             self.config.model.hidden_size):
            # the stages disagree on the batch: a broken pipeline, not one request's fault
            shape = None if hidden_states is None else list(hidden_states.shape)
            raise ValueError(f"stage {self.stage_index} got hidden states {shape} for "
                             f"{sum(query_lens)} tokens of step {batch.step_id}")
        ends = list(itertools.accumulate(query_lens))
        # the last token's logits, and a verification's also at each draft's position
        logits_indices = [index for i in sampled_rows
                          for index in range(ends[i] - 1 - len(scheduled[i].drafts), ends[i])]
        inputs = build_step_inputs(
            self.config.execution.attention_backend, token_ids, query_lens, computed,
            [s.state.block_ids for s in scheduled], self.config.cache.block_size,
            logits_indices if self.is_last else [], self.device)
        if self.graphs is not None and self.graphs.graph_size(inputs) is not None:
            hidden = self.graphs.run(inputs, hidden_states)  # a view of the graphs' output
            if not self.is_last:
                hidden = hidden.clone()  # the next stage may read it after our next replay
        else:
            hidden = self.model(inputs.input_ids, hidden_states, self.kv_caches,
                                inputs.attention)
        if not self.is_last:
            return hidden
        output = self._sample(batch.step_id, [scheduled[i] for i in sampled_rows], hidden,
                              inputs.logits_indices)
        output.request_ids.extend(dropped.request_ids)
        output.sampled.extend(dropped.sampled)
        return output

    def _apply_updates(self, batch: StepBatch) -> None:
        vocab, num_blocks = self.config.model.vocab_size, self.num_kv_blocks
        for request_id in batch.finished_request_ids:
            self.requests.pop(request_id, None)
        for new in batch.new_requests:
            added = self.requests[new.request_id] = _new_state(new)
            added.error = (_ids_error("token", added.token_ids, vocab)
                           or _ids_error("block", added.block_ids, num_blocks))
            _log_error(new.request_id, added.error)
        for cached in batch.cached_requests:
            state = self.requests.get(cached.request_id)
            if state is None:
                state = self.requests[cached.request_id] = _unknown_state()
                _log_error(cached.request_id, state.error)
            if state.error is not None:
                continue
            state.token_ids.extend(cached.new_token_ids)  # always sampled tokens
            state.output_token_ids.extend(cached.new_token_ids)
            state.block_ids.extend(cached.new_block_ids)
            state.error = (_ids_error("token", cached.new_token_ids, vocab)
                           or _ids_error("block", cached.new_block_ids, num_blocks))
            _log_error(cached.request_id, state.error)

    def _step_error(self, state: _RequestState, num_computed: int, num_new: int,
                    drafts: list[int]) -> str | None:
        """Why this step of a request cannot run here (its positions fall outside its tokens
        and drafts, its block table or max_model_len; drafts out of the vocabulary, or not all
        verified by the step), or None."""
        end = num_computed + num_new
        block_size = self.config.cache.block_size
        max_model_len = self.config.scheduler.max_model_len
        num_known = len(state.token_ids)
        if num_computed < 0 or num_new < 1 or end > num_known + len(drafts):
            return (f"positions [{num_computed}, {end}) are not within its "
                    f"{num_known} tokens and {len(drafts)} drafts")
        if drafts and (end != num_known + len(drafts) or num_computed >= num_known):
            return (f"positions [{num_computed}, {end}) do not verify its {len(drafts)} "
                    f"drafts after its {num_known} tokens")
        if end > max_model_len:
            return f"position {end - 1} is past max_model_len={max_model_len}"
        if end > len(state.block_ids) * block_size:
            return (f"{len(state.block_ids)} KV blocks of {block_size} cannot hold positions "
                    f"up to {end - 1}")
        return _ids_error("draft token", drafts, self.config.model.vocab_size)

    def _sample(self, step_id: int, scheduled: list[_Scheduled], hidden: torch.Tensor,
                logits_indices: torch.Tensor) -> StepOutput:
        """The last stage's output for `scheduled` (the requests whose step reaches the end of
        their tokens and drafts), from the final hidden states at `logits_indices` (one row
        per request, `1 + len(drafts)` for a verification).

        A verification samples the target's token at every draft position exactly as a step
        without drafts would (the row after draft j sees drafts 1..j as outputs: penalties,
        min_tokens and a seeded row's position), and keeps the drafts up to the first that
        differs from the target's token, plus that token (or, all accepted, the one after
        the last). For drafts that are single proposals (n-gram, a greedy draft model) this is
        the rejection-sampling rule: draft x is accepted with probability p(x), and a rejection
        draws from p without x, renormalised; greedy requests get the target's argmax chain."""
        sampler = self.sampler
        if sampler is None:
            raise RuntimeError(f"stage {self.stage_index} is not the last: it has no sampler")
        if not scheduled:
            return StepOutput(step_id, [], [])
        rows = [SamplingRow(params=s.state.sampling_params,
                            prompt_token_ids=s.state.prompt_token_ids,
                            # the row after draft j: as if drafts 1..j were outputs
                            output_token_ids=(s.state.output_token_ids + s.drafts[:j] if j
                                              else s.state.output_token_ids),
                            stop_ids=s.state.stop_ids)
                for s in scheduled for j in range(1 + len(s.drafts))]
        logits = self.model.compute_logits(hidden[logits_indices])  # [num_rows, vocab]
        masked = [] if not any(s.bitmask for s in scheduled) else [
            (row, s.bitmask) for row, s in zip(
                itertools.accumulate((1 + len(s.drafts) for s in scheduled), initial=0),
                scheduled) if s.bitmask]
        if masked:  # structured outputs: forbidden tokens at -inf before anything else
            apply_token_bitmasks(logits, [row for row, _ in masked],
                                 [bitmask for _, bitmask in masked])
        try:
            sampled = sampler(logits, rows)
        except Exception:  # find the rows at fault; the others are sampled as usual
            sampled = [_sample_row(sampler, logits[i:i + 1], row) for i, row in enumerate(rows)]
        if masked:  # a row the bitmask left nothing in: say so, not "the logits are -inf"
            for row, bitmask in masked:
                for j in range(row, row + len(bitmask) // (bitmask_words(logits.shape[1]) * 4)):
                    if sampled[j].error is not None and not bool(
                            torch.isfinite(logits[j]).any()):
                        sampled[j] = SampledToken(-1, error=NO_ALLOWED_TOKEN)
        output = StepOutput(step_id, [], [])
        first = 0
        for s in scheduled:
            for j, token in enumerate(sampled[first:first + 1 + len(s.drafts)]):
                output.request_ids.append(s.request_id)
                output.sampled.append(token)
                if token.error is not None or j == len(s.drafts) or token.token_id != s.drafts[j]:
                    break
            first += 1 + len(s.drafts)
        return output


def _sample_row(sampler: Sampler, logits: torch.Tensor, row: SamplingRow) -> SampledToken:
    """Sample one row alone ([1, vocab] logits); a failure becomes that row's error."""
    try:
        return sampler(logits, [row])[0]
    except Exception as exc:
        logger.exception("sampling failed for one request")
        return SampledToken(-1, error=f"sampling failed: {type(exc).__name__}: {exc}")


def _ids_error(kind: str, ids: list[int], limit: int) -> str | None:
    """Why `ids` are not all ints in [0, limit), or None (min/max: C speed on the hot path)."""
    if not ids:
        return None
    try:
        if min(ids) >= 0 and max(ids) < limit:
            return None
    except TypeError:
        pass
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < limit]
    return f"{kind} ids must be in [0, {limit}), got {bad[:5]}"


def _log_error(request_id: str, error: str | None) -> None:
    if error is not None:
        logger.error("request %r dropped out of this stage: %s", request_id[:100], error)


def _unknown_state() -> _RequestState:
    return _RequestState([], [], [], [], SamplingParams(), (),
                         error="the stage does not know this request (its first step never "
                               "reached the stage)")


def _new_state(new: NewRequest) -> _RequestState:
    return _RequestState(
        token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
        prompt_token_ids=list(new.prompt_token_ids),
        output_token_ids=list(new.output_token_ids),
        block_ids=list(new.block_ids),
        sampling_params=new.sampling_params,
        stop_ids=tuple(new.stop_ids),
    )


def kv_blocks_that_fit(stages: Sequence[StageWorker], start: StartupMemory | None) -> int:
    """Blocks each of `stages` (of one engine, on one device) allocates, the null block
    included. By the settings (num_kv_blocks, kv_cache_memory, 2 GiB by default), the least
    that every stage can hold. On a GPU without either setting, by gpu_memory_utilization
    (`gpu_memory.py`): the stages share the device's budget, so they are profiled together
    (one forward through all of them, as a step runs); `start` is the device's reading taken
    before the first of them loaded its weights. ValueError when the model does not fit."""
    config = stages[0].config
    if not sized_by_gpu_budget(config):
        return min(stage._kv_blocks_from_settings() for stage in stages)
    if start is None:
        raise RuntimeError("sizing the KV cache by gpu_memory_utilization needs the GPU's "
                           "memory as read before the weights were loaded (StartupMemory)")

    def profile() -> None:
        hidden = None
        for stage in stages:
            hidden = stage.profile_run(hidden)

    device = stages[0].device
    measured = measure(device, start, profile)
    cache, sched = config.cache, config.scheduler
    bytes_per_block = sum(stage.kv_bytes_per_block() for stage in stages)
    plan = plan_kv_cache(measured, cache.gpu_memory_utilization, bytes_per_block,
                         cache.block_size, sched.max_model_len, sched.max_num_seqs)
    names = ", ".join(str(stage.stage_index) for stage in stages)
    log_plan(device, f"stage {names}", measured, cache.gpu_memory_utilization, plan,
             bytes_per_block)
    return plan.num_blocks
