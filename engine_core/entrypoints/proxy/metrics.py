"""Prometheus metrics of the proxy (`GET /metrics` of `pp-engine proxy`), in a registry of its
own: requests sent per instance, errors by reason, retries, latencies (end to end, the prefill
leg, time to the first body chunk from the decode instance) and the registered instances."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine_core.entrypoints.engine_metrics import PREFIX

if TYPE_CHECKING:
    from engine_core.entrypoints.proxy.instance_pool import InstancePool

__all__ = ["ProxyMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _PoolCollector(Collector):
    """Read from the pool at scrape time: `proxy_instances{role}` (registered instances),
    `proxy_instance_load{instance, role}` (what each reported in its last beat plus what this
    proxy sent it since), `proxy_unrouted_responses_total` (instance messages that matched no
    open request here: late replies of aborted requests; another proxy's would count too)."""

    def __init__(self, pool: InstancePool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        family = GaugeMetricFamily(PREFIX + "proxy_instances",
                                   "Instances registered with the proxy, by role.",
                                   labels=["role"])
        for role, count in self.pool.count_by_role().items():
            family.add_metric([role], float(count))
        yield family
        load = GaugeMetricFamily(PREFIX + "proxy_instance_load",
                                 "Requests running and waiting on each instance, as routing "
                                 "sees them.", labels=["instance", "role"])
        for info in self.pool.instances():
            load.add_metric([info.instance_id, info.register.role],
                            float(info.routing_key()[0]))
        yield load
        unrouted = CounterMetricFamily(PREFIX + "proxy_unrouted_responses",
                                       "Instance messages that matched no open request of "
                                       "this proxy.")
        unrouted.add_metric([], float(self.pool.num_unrouted))
        yield unrouted


class ProxyMetrics:
    """The proxy's Prometheus registry; the request flow feeds the series directly."""

    def __init__(self, pool: InstancePool) -> None:
        self.registry = reg = CollectorRegistry()
        reg.register(_PoolCollector(pool))
        self.requests = Counter(PREFIX + "proxy_requests",
                                "Requests sent to each instance (role: prefill, decode, or "
                                "colocated: both on one kv_both instance).",
                                ["instance", "role"], registry=reg)
        self.errors = Counter(PREFIX + "proxy_request_errors",
                              "Client requests that ended in an error, by reason.", ["reason"],
                              registry=reg)
        self.retries = Counter(PREFIX + "proxy_retries",
                               "Requests retried on another prefill/decode pair.", registry=reg)
        self.e2e = Histogram(PREFIX + "proxy_e2e_request_latency_seconds",
                             "Time from arrival to the end of the response.",
                             buckets=_E2E_BUCKETS, registry=reg)
        self.ttft = Histogram(PREFIX + "proxy_time_to_first_token_seconds",
                              "Time from arrival to the decode instance's first body chunk.",
                              buckets=_LATENCY_BUCKETS, registry=reg)
        self.prefill = Histogram(PREFIX + "proxy_prefill_latency_seconds",
                                 "Time the prefill leg took (sent to answered).",
                                 buckets=_LATENCY_BUCKETS, registry=reg)

    def render(self) -> bytes:
        """The exposition text of every series."""
        return generate_latest(self.registry)
