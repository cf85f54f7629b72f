"""The engine's figures under their Prometheus names (`ppengine:...`): one table, read by the
server's `GET /metrics` (`openai/metrics.py`) and by the offline `LLM.get_metrics()`, so both
show the same names. The proxy names its own series with the same `PREFIX`.

Each row reads one field of `SchedulerStats` (dotted for the nested `kv_transfer` struct). A new
figure of the engine is a field of its stats struct and a row here; nothing else changes.

`Metric`, `Counter` and `Gauge` are what `LLM.get_metrics()` returns (vLLM's
`vllm.v1.metrics.reader` types): a series' name, its labels and its value now.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from engine_core.messages import SchedulerStats

__all__ = ["ENGINE_METRICS", "PREFIX", "Counter", "EngineMetric", "Gauge", "Metric",
           "read_engine_metrics"]

PREFIX = "ppengine:"


@dataclass(frozen=True)
class EngineMetric:
    """One row of the table: the series `name` (a counter is exposed as `name` + `_total`)
    with the value of `SchedulerStats.<source>` and `labels` of its own. Rows sharing a name
    are one metric family (the same kind, help and label names)."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    source: str  # a dotted attribute path into SchedulerStats
    labels: tuple[tuple[str, str], ...] = ()

    def read(self, stats: SchedulerStats) -> int | float:
        """This row's figure in `stats`."""
        value: int | float = operator.attrgetter(self.source)(stats)
        return value


def _gauge(name: str, source: str, help: str) -> EngineMetric:
    return EngineMetric(PREFIX + name, "gauge", help, source)


def _counter(name: str, source: str, help: str,
             labels: tuple[tuple[str, str], ...] = ()) -> EngineMetric:
    return EngineMetric(PREFIX + name, "counter", help, source, labels)


_LEASE_EXPIRED_HELP = ("KV transfers dropped when their time-to-live ran out: leased blocks no "
                       "decoder took (producer), pushed KV whose request never came (consumer).")

ENGINE_METRICS: tuple[EngineMetric, ...] = (
    # gauges: the engine now (summed over data-parallel engines)
    _gauge("num_requests_running", "num_running", "Requests scheduled in the engine."),
    _gauge("num_requests_waiting", "num_waiting", "Requests waiting to be scheduled."),
    _gauge("kv_cache_usage_perc", "kv_usage", "Fraction of KV cache blocks in use (0 to 1)."),
    _gauge("num_free_kv_blocks", "num_free_blocks", "Free KV cache blocks."),
    _gauge("num_kv_blocks", "num_total_blocks", "Usable KV cache blocks."),
    _gauge("kv_buffer_bytes", "kv_transfer.buffer_bytes",
           "Bytes of pushed KV in the receive buffer now (decode instance)."),
    _gauge("kv_overflow_bytes", "kv_transfer.overflow_bytes",
           "Bytes of pushed KV in the host overflow pool now (decode instance)."),
    _gauge("spec_decode_mean_accepted_length", "spec_decode.mean_accepted_length",
           "Tokens a speculative verification step emits on average since start: accepted "
           "drafts plus the target's own token (1 before any draft)."),
    # counters since start
    _counter("num_preemptions", "num_preemptions",
             "Requests preempted (their KV blocks freed) for lack of blocks."),
    _counter("prompt_tokens_computed", "num_prompt_tokens_computed",
             "Prompt tokens run through the model (not taken from the prefix cache or another "
             "instance)."),
    _counter("spec_decode_num_drafts", "spec_decode.num_drafts",
             "Speculative verification steps: a request's step that verified drafts."),
    _counter("spec_decode_num_draft_tokens", "spec_decode.num_draft_tokens",
             "Draft tokens proposed and verified."),
    _counter("spec_decode_num_accepted_tokens", "spec_decode.num_accepted_tokens",
             "Draft tokens accepted by the target model."),
    _counter("structured_output_requests", "structured_outputs.num_requests",
             "Sequences under a structured-output constraint (JSON schema, regex, choice, "
             "grammar)."),
    _counter("structured_output_grammar_compiles", "structured_outputs.num_compiles",
             "Grammars compiled (a constraint not in the cache)."),
    _counter("structured_output_compile_seconds", "structured_outputs.compile_seconds",
             "Seconds spent compiling grammars (off the engine loop)."),
    _counter("structured_output_cache_hits", "structured_outputs.num_cache_hits",
             "Constrained sequences whose grammar came from the cache."),
    _counter("kv_transfer_sent_tokens", "kv_transfer.sent_tokens",
             "Tokens whose KV this instance sent."),
    _counter("kv_transfer_received_tokens", "kv_transfer.received_tokens",
             "Tokens whose KV this instance received."),
    _counter("kv_transfer_sent_bytes", "kv_transfer.sent_bytes", "Bytes of KV sent."),
    _counter("kv_transfer_received_bytes", "kv_transfer.received_bytes", "Bytes of KV received."),
    _counter("kv_transfer_seconds", "kv_transfer.seconds", "Seconds spent moving KV."),
    _counter("kv_transfer_held", "kv_transfer.transfers_held",
             "KV pushes held for lack of room (back-pressure): told to hold on a decode "
             "instance, held on a prefill instance."),
    _counter("kv_overflow_transfers", "kv_transfer.overflow_transfers",
             "KV pushes kept in the host overflow pool."),
    _counter("kv_transfer_dropped_messages", "kv_transfer.dropped_messages",
             "Messages of KV-transfer peers dropped (malformed, a wrong layout, or for nothing "
             "this instance holds)."),
    _counter("kv_lease_expired", "kv_transfer.leases_expired", _LEASE_EXPIRED_HELP,
             (("side", "producer"),)),
    _counter("kv_lease_expired", "kv_transfer.pushes_expired", _LEASE_EXPIRED_HELP,
             (("side", "consumer"),)),
)


@dataclass(frozen=True)
class Metric:
    """One series: its name (a counter's without `_total`, as Prometheus names the family) and
    its labels. The same name may come with several sets of labels."""

    name: str
    labels: dict[str, str]


@dataclass(frozen=True)
class Counter(Metric):
    """A count since the engine started; it only grows."""

    value: int | float


@dataclass(frozen=True)
class Gauge(Metric):
    """A figure now; it goes up and down."""

    value: int | float


def read_engine_metrics(stats: SchedulerStats, labels: Mapping[str, str]) -> list[Metric]:
    """Every row of `ENGINE_METRICS` read from `stats`, in table order; each series carries
    `labels` (e.g. the model name) and then its row's own."""
    metrics: list[Metric] = []
    for row in ENGINE_METRICS:
        series_labels = {**labels, **dict(row.labels)}
        kind = Counter if row.kind == "counter" else Gauge
        metrics.append(kind(row.name, series_labels, row.read(stats)))
    return metrics
