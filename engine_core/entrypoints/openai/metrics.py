"""Prometheus metrics of one server (`GET /metrics`), in a registry of its own.

The engine's figures are the rows of `engine_metrics.ENGINE_METRICS` (the table the offline
`LLM.get_metrics()` reads too), read from `llm.stats` (the sum over data-parallel engines)
and, per engine (label `engine="i"`), from `llm.client.engine_states()` at scrape time; the
counters and histograms are fed by the request handlers through `ServerMetrics.record_*`. Every
series carries a `model_name` label.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine_core.entrypoints.engine_metrics import ENGINE_METRICS, PREFIX, EngineMetric

if TYPE_CHECKING:
    from engine_core.entrypoints.async_llm import AsyncLLM
    from engine_core.messages import SchedulerStats

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def engine_metric_families(stats: SchedulerStats, model_name: str
                           ) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The rows of `ENGINE_METRICS` read from `stats`, one family per name, labelled
    `model_name` (and each row's own labels)."""
    by_name: dict[str, list[EngineMetric]] = {}
    for row in ENGINE_METRICS:
        by_name.setdefault(row.name, []).append(row)
    for name, rows in by_name.items():
        first = rows[0]
        family_type = CounterMetricFamily if first.kind == "counter" else GaugeMetricFamily
        family = family_type(name, first.help,
                             labels=["model_name", *(key for key, _ in first.labels)])
        for row in rows:
            family.add_metric([model_name, *(value for _, value in row.labels)],
                              float(row.read(stats)))
        yield family


class _EngineStatsCollector(Collector):
    """The engine's figures (`engine_metrics.ENGINE_METRICS`, from `llm.stats`, the sum over
    data-parallel engines), the restarts, and per engine its load, read on every scrape."""

    def __init__(self, llm: AsyncLLM, model_name: str) -> None:
        self.llm = llm
        self.model_name = model_name

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield from engine_metric_families(self.llm.stats, self.model_name)
        restarts = GaugeMetricFamily(PREFIX + "engine_restarts",
                                     "Times the engine core was restarted after it died.",
                                     labels=["model_name"])
        restarts.add_metric([self.model_name], float(self.llm.num_restarts))
        yield restarts
        states = self.llm.client.engine_states()
        alive = GaugeMetricFamily(PREFIX + "engines_alive", "Engine cores alive (data parallel).",
                                  labels=["model_name"])
        alive.add_metric([self.model_name], float(sum(s.alive for s in states)))
        yield alive
        per_engine = (
            ("engine_alive", "1 if this engine core is alive.", lambda s: s.alive),
            ("engine_num_requests_running", "Requests scheduled in this engine core.",
             lambda s: s.stats.num_running),
            ("engine_num_requests_waiting", "Requests waiting in this engine core.",
             lambda s: s.stats.num_waiting),
            ("engine_kv_cache_usage_perc", "Fraction of this engine core's KV blocks in use.",
             lambda s: s.stats.kv_usage),
            ("engine_requests_routed", "Requests the front-end sent to this engine core.",
             lambda s: s.num_routed),
        )
        for name, doc, value in per_engine:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name", "engine"])
            for state in states:
                family.add_metric([self.model_name, str(state.index)], float(value(state)))
            yield family


class ServerMetrics:
    """The server's Prometheus registry and the request-level series."""

    def __init__(self, llm: AsyncLLM, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(llm, model_name))
        labels = ["model_name"]
        reg = self.registry
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed.",
                                     labels, registry=reg).labels(model_name)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.",
                                         labels, registry=reg).labels(model_name)
        self._success = Counter(PREFIX + "request_success", "Requests that finished, by reason.",
                                ["model_name", "finished_reason"], registry=reg)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Time from arrival to the first output token.", labels,
                              buckets=_TTFT_BUCKETS, registry=reg).labels(model_name)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds",
                              "Mean time between output tokens of a request.", labels,
                              buckets=_TPOT_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds",
                             "Time from arrival to the last output token.", labels,
                             buckets=_E2E_BUCKETS, registry=reg).labels(model_name)

    def record_tokens(self, prompt_tokens: int, generation_tokens: int) -> None:
        """Count tokens as they are processed (aborted requests' tokens count too)."""
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if generation_tokens:
            self.generation_tokens.inc(generation_tokens)

    def record_finished(self, finished_reason: str, ttft: float, e2e: float,
                        max_output_len: int) -> None:
        """A request finished on its own (not aborted): latencies and the success counter."""
        self._success.labels(self.model_name, finished_reason).inc()
        self.ttft.observe(ttft)
        self.e2e.observe(e2e)
        if max_output_len > 1:
            self.tpot.observe((e2e - ttft) / (max_output_len - 1))

    def render(self) -> bytes:
        """The exposition text of every series."""
        return generate_latest(self.registry)
