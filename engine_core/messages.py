"""Every message that crosses a process or actor boundary: msgspec Structs (msgpack, no pickle).

Two boundaries use them:
- front-end <-> engine core: `EngineCoreRequest` in, `EngineCoreOutput` out;
- engine core -> pipeline stages: one `StepBatch` per scheduled step, `StepOutput` back from the
  last stage. Per-step messages are incremental: a request travels in full once (`NewRequest`), then
  only what changed (`CachedRequest`: tokens the stages have not seen, blocks newly added).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

import msgspec

from engine_core.sampling_params import SamplingParams
from engine_core.transfer_params import KVTransferParams

__all__ = [
    "CachedRequest",
    "EngineCoreOutput",
    "EngineCoreRequest",
    "NewRequest",
    "SampledToken",
    "SpecDecodingStats",
    "StepBatch",
    "StepOutput",
    "StructuredOutputStats",
    "TokenLogprobs",
]


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Logprobs at one position: the sampled token first, then the top-k, highest first."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]  # 1-based rank of each id in the model's distribution


class SampledToken(msgspec.Struct, array_like=True):
    """One row's sampled token, or (`error` set, `token_id` -1) why sampling failed for that
    row alone: the request is finished with an error, the rest of the batch goes on."""

    token_id: int
    logprobs: TokenLogprobs | None = None
    error: str | None = None


class EngineCoreRequest(msgspec.Struct, omit_defaults=True):
    """A tokenized request handed to the engine core."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int] = []
    arrival_time: float = 0.0
    # Fair share and priority (engine_core/request_queue.py): the user request this sequence
    # belongs to, shared by every prompt and all n sequences of one API request ("": the
    # request is its own); and its priority, lower served first (scheduling_policy "priority").
    owner_id: str = ""
    priority: int = 0
    # Disaggregated prefill/decode (engine_core/kv_transfer/): on a prefill instance, keep the
    # prompt's KV for a decode instance; on a decode instance, where to get it from.
    do_remote_decode: bool = False
    kv_transfer_params: KVTransferParams | None = None


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """New tokens of one request from one finished step; `finish_reason` set on its last output."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | None = None  # the stop token id that ended it, if any
    num_cached_tokens: int = 0
    error: str | None = None  # with finish_reason "error": what failed (for this request only)
    kv_transfer_params: KVTransferParams | None = None  # a prefill instance's KV, for a decoder


class NewRequest(msgspec.Struct, array_like=True):
    """First appearance of a request at the stages (after a preemption too: all state is resent)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    stop_ids: list[int]  # EOS + stop_token_ids, masked by the sampler until min_tokens
    block_ids: list[int]
    num_computed_tokens: int
    num_new_tokens: int
    # Speculative decoding: proposed tokens after the request's known ones, verified in this
    # step (its last `len(draft_token_ids)` new tokens); never kept by the stages.
    draft_token_ids: list[int] = []
    # Structured outputs: when this step samples, the allowed tokens of each of its
    # `1 + len(draft_token_ids)` rows (`grammars.bitmask_words` int32 words per row,
    # little-endian), applied by the last stage; b"": unconstrained.
    token_bitmask: bytes = b""


class CachedRequest(msgspec.Struct, array_like=True):
    """A request the stages already hold: only what changed since it was last scheduled."""

    request_id: str
    new_token_ids: list[int]  # appended (sampled) tokens the stages have not seen yet
    new_block_ids: list[int]
    num_computed_tokens: int
    num_new_tokens: int
    draft_token_ids: list[int] = []  # as in NewRequest
    token_bitmask: bytes = b""  # as in NewRequest


class StepBatch(msgspec.Struct, array_like=True):
    """One scheduled microbatch. Tokens are laid out new requests first, then cached ones."""

    step_id: int
    new_requests: list[NewRequest]
    cached_requests: list[CachedRequest]
    finished_request_ids: list[str]  # the stages may drop these requests' state


class StepOutput(msgspec.Struct, array_like=True):
    """What the last stage returns: one sampled token for each request whose step reached the end
    of its known tokens (a mid-prompt prefill chunk samples nothing). A request whose step
    verified drafts has consecutive rows: the drafts it accepted, in order, then the target's
    own next token (at most `1 + len(draft_token_ids)` rows)."""

    step_id: int
    request_ids: list[str]
    sampled: list[SampledToken]

    def rows_by_request(self) -> list[tuple[str, list[SampledToken]]]:
        """The rows grouped by request, in order: consecutive rows of one request together."""
        grouped: list[tuple[str, list[SampledToken]]] = []
        for request_id, token in zip(self.request_ids, self.sampled):
            if grouped and grouped[-1][0] == request_id:
                grouped[-1][1].append(token)
            else:
                grouped.append((request_id, [token]))
        return grouped


# ---- front-end <-> engine-core process --------------------------------------------------------
class KVTransferStats(msgspec.Struct, omit_defaults=True):
    """What a KV connector counts (disaggregated prefill/decode; all zero without one):
    counters since start (an instance counts what its role does) and two gauges. Written by the
    connector's threads, read through `KVConnectorBase.stats()`; travels inside
    `SchedulerStats`. A new figure is a field here and a row of `entrypoints/engine_metrics.py`.
    """

    sent_tokens: int = 0
    received_tokens: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    seconds: float = 0.0  # spent moving KV, both directions, summed over transfers
    dropped_messages: int = 0  # peers' messages dropped (garbage, wrong layout, unknown)
    leases_expired: int = 0  # producer: leases whose decoder never took them
    pushes_expired: int = 0  # consumer: buffered pushes whose request never came
    transfers_held: int = 0  # back-pressure: pushes D told to hold / P was told to hold
    overflow_transfers: int = 0  # consumer: pushes that went to the overflow pool
    buffer_bytes: int = 0  # consumer, now: bytes reserved in the receive buffer
    overflow_bytes: int = 0  # consumer, now: bytes reserved in the overflow pool


class SpecDecodingStats(msgspec.Struct, omit_defaults=True):
    """Speculative decoding's counters since start (all zero without it): verification steps
    of a request with drafts, the draft tokens they verified, and how many were accepted."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verification step emits on average: the accepted drafts plus the target's
        own token (1.0 before any draft)."""
        return 1.0 + self.num_accepted_tokens / max(self.num_drafts, 1)

    @property
    def acceptance_rate(self) -> float:
        """The share of draft tokens accepted (0.0 before any draft)."""
        return self.num_accepted_tokens / max(self.num_draft_tokens, 1)


class StructuredOutputStats(msgspec.Struct, omit_defaults=True):
    """Structured outputs' counters since start (all zero without constraints): constrained
    sequences, grammars compiled and the seconds that took, and sequences whose grammar came
    from the cache (`grammars.GrammarCompiler`)."""

    num_requests: int = 0
    num_compiles: int = 0
    compile_seconds: float = 0.0
    num_cache_hits: int = 0


class SchedulerStats(msgspec.Struct, omit_defaults=True):
    """The engine core's figures (`EngineCore.stats()`), sent with every batch of outputs:
    gauges (now) and counters (since start). Every field is a number or a nested stats struct,
    so the figures of several engines add up field by field (`SchedulerStats.sum`)."""

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0  # usable blocks (the null block excluded)
    num_preemptions: int = 0
    num_prompt_tokens_computed: int = 0  # prompt tokens run through the model
    kv_transfer: KVTransferStats = msgspec.field(default_factory=KVTransferStats)
    spec_decode: SpecDecodingStats = msgspec.field(default_factory=SpecDecodingStats)
    structured_outputs: StructuredOutputStats = msgspec.field(
        default_factory=StructuredOutputStats)

    @property
    def kv_usage(self) -> float:
        """Fraction of the usable KV blocks in use (0 without blocks)."""
        if not self.num_total_blocks:
            return 0.0
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    @classmethod
    def sum(cls, stats: Iterable[SchedulerStats]) -> SchedulerStats:
        """The figures of several engines as one engine's: each field added up over `stats`
        (nested structs field by field), so `kv_usage` is that of all their blocks.
        No stats: all zero."""
        return _add_up(cls, list(stats))


_Stats = TypeVar("_Stats", bound=msgspec.Struct)


def _add_up(struct_type: type[_Stats], items: list[_Stats]) -> _Stats:
    """`struct_type` whose every field is the sum of that field over `items`: numbers added,
    nested Structs added up the same way."""
    values: dict[str, Any] = {}
    for field in msgspec.structs.fields(struct_type):
        parts = [getattr(item, field.name) for item in items]
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            values[field.name] = _add_up(field.type, parts)
        elif field.type in (int, float):
            values[field.name] = sum(parts, field.type())
        else:
            raise TypeError(f"{struct_type.__name__}.{field.name}: cannot add up a "
                            f"{field.type!r}; stats fields are int, float or a stats struct")
    return struct_type(**values)


class EngineCoreOutputs(msgspec.Struct, omit_defaults=True):
    """One message from the engine core: a step's outputs and/or fresh stats, or its death."""

    outputs: list[EngineCoreOutput] = []
    stats: SchedulerStats | None = None
    error: str | None = None  # set once: the engine core failed and is exiting


class AbortRequests(msgspec.Struct):
    request_ids: list[str]


class HandshakeHello(msgspec.Struct):
    """Engine -> front-end, first message after connecting: who it is (its data-parallel
    rank, host, pid and pp-engine version)."""

    engine_index: int  # the data-parallel rank
    pid: int
    host: str = ""
    version: str = ""


class HandshakeInit(msgspec.Struct):
    """Front-end -> engine: where to connect, as whom, and what to run."""

    input_address: str
    output_address: str
    engine_args: bytes  # msgspec-encoded EngineArgs
    engine_identity: bytes  # the engine's ZMQ routing id on both sockets: a random secret
    dp_size: int = 1  # the global data-parallel size
    # `EngineConfig.config_fields()` of the front-end; an engine whose own config differs
    # (a headless engine runs its own arguments) refuses to start, naming the field. {}: no check.
    config_fields: dict[str, str] = {}


class HandshakeReady(msgspec.Struct):
    """Engine -> front-end once the model is loaded and the KV cache allocated (or why not)."""

    config_hash: str = ""
    num_kv_blocks: int = 0
    config_fields: dict[str, str] = {}  # what went into config_hash, so a mismatch is named
    error: str | None = None
    error_type: str | None = None  # "ValueError" for bad arguments
    stats: SchedulerStats | None = None  # the engine's figures at start (free and total blocks)
