"""The engine's figures: `SchedulerStats` (with the KV connector's nested `KVTransferStats`), the
generic sum over data-parallel engines, the one table of Prometheus names
(`entrypoints/engine_metrics.py`) behind both the server's `/metrics` and `LLM.get_metrics()`."""

from __future__ import annotations

import operator

import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from engine_core import LLM, SamplingParams
from engine_core.entrypoints.engine_metrics import (
    ENGINE_METRICS,
    PREFIX,
    Counter,
    Gauge,
    Metric,
    read_engine_metrics,
)
from engine_core.entrypoints.openai.metrics import engine_metric_families
from engine_core.messages import KVTransferStats, SchedulerStats

NUM_KV_BLOCKS = 65  # the null block and 64 usable ones per engine


def _leaf_fields(struct_type: type[msgspec.Struct], prefix: str = "") -> list[str]:
    """Dotted paths of every number in a stats struct, nested structs walked into."""
    paths = []
    for field in msgspec.structs.fields(struct_type):
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            paths += _leaf_fields(field.type, f"{prefix}{field.name}.")
        else:
            paths.append(prefix + field.name)
    return paths


def _distinct_stats(offset: int) -> SchedulerStats:
    """Stats whose every field holds a different value (seconds: a float)."""
    kv = KVTransferStats(**{name: offset + i for i, name in enumerate(
        _leaf_fields(KVTransferStats))})
    kv.seconds = offset + 0.25
    top = [p for p in _leaf_fields(SchedulerStats) if "." not in p]
    stats = SchedulerStats(**{name: offset + 100 + i for i, name in enumerate(top)},
                           kv_transfer=kv)
    stats.num_total_blocks = stats.num_free_blocks + 10 * (offset + 1)
    return stats


# ---- the stats message and its sum ------------------------------------------------------------
def test_sum_adds_every_field_and_kv_usage_follows_the_summed_blocks():
    a, b = _distinct_stats(1), _distinct_stats(50)
    total = SchedulerStats.sum([a, b])
    for path in _leaf_fields(SchedulerStats):
        read = operator.attrgetter(path)
        assert read(total) == read(a) + read(b), path
    assert total.kv_usage == pytest.approx(
        1 - (a.num_free_blocks + b.num_free_blocks) / (a.num_total_blocks + b.num_total_blocks))
    assert total.kv_usage != pytest.approx((a.kv_usage + b.kv_usage) / 2)  # not averaged
    assert SchedulerStats.sum([]) == SchedulerStats()
    assert SchedulerStats.sum([a]) == a
    assert SchedulerStats().kv_usage == 0.0  # no blocks yet: no division by zero


def test_stats_survive_the_wire():
    stats = _distinct_stats(3)
    wire = msgspec.msgpack.encode(stats)
    assert msgspec.msgpack.decode(wire, type=SchedulerStats) == stats
    idle = msgspec.msgpack.encode(SchedulerStats())  # zero figures are left out
    assert len(idle) < 64, idle  # the nested structs' names only


# ---- the table --------------------------------------------------------------------------------
def test_every_figure_of_the_stats_has_a_row_and_every_row_reads_a_figure():
    sources = {row.source for row in ENGINE_METRICS}
    assert set(_leaf_fields(SchedulerStats)) | {"kv_usage",
                                                "spec_decode.mean_accepted_length"} == sources
    stats = _distinct_stats(7)
    for row in ENGINE_METRICS:  # every source path reads (no typo hides behind a default)
        assert isinstance(row.read(stats), (int, float)), row
        assert row.name.startswith(PREFIX) and not row.name.endswith("_total"), row.name


def test_rows_sharing_a_name_are_one_family():
    by_name: dict[str, list] = {}
    for row in ENGINE_METRICS:
        by_name.setdefault(row.name, []).append(row)
    for name, rows in by_name.items():
        assert len({(r.kind, r.help, tuple(k for k, _ in r.labels)) for r in rows}) == 1, name
        assert len({r.labels for r in rows}) == len(rows), name  # distinct label values


class _StatsCollector(Collector):
    def __init__(self, stats: SchedulerStats) -> None:
        self.stats = stats

    def collect(self):
        return engine_metric_families(self.stats, "m")


def _exposed(stats: SchedulerStats) -> tuple[str, dict[tuple[str, tuple], float], dict]:
    """The server's exposition of `stats`: its text, {(family, labels): value}, {family: type}."""
    registry = CollectorRegistry()
    registry.register(_StatsCollector(stats))
    text = generate_latest(registry).decode()
    values, types = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            values[(family.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, values, types


def test_server_exposition_and_get_metrics_read_the_same_series():
    stats = _distinct_stats(11)
    text, exposed, types = _exposed(stats)
    offline = read_engine_metrics(stats, {"model_name": "m"})
    assert {(m.name, tuple(sorted(m.labels.items()))): float(m.value) for m in offline} == exposed
    for metric in offline:
        assert types[metric.name] == ("counter" if isinstance(metric, Counter) else "gauge")
    kv = stats.kv_transfer
    for line in (f'ppengine:num_free_kv_blocks{{model_name="m"}} {float(stats.num_free_blocks)}',
                 f'ppengine:num_kv_blocks{{model_name="m"}} {float(stats.num_total_blocks)}',
                 f'ppengine:kv_transfer_sent_tokens_total{{model_name="m"}} '
                 f'{float(kv.sent_tokens)}',
                 f'ppengine:kv_lease_expired_total{{model_name="m",side="consumer"}} '
                 f'{float(kv.pushes_expired)}'):
        assert line in text, line


def test_get_metrics_series_carry_their_labels_and_kind():
    metrics = read_engine_metrics(SchedulerStats(num_running=2), {"model_name": "x"})
    assert all(isinstance(m, Metric) and m.labels["model_name"] == "x" for m in metrics)
    running = [m for m in metrics if m.name == PREFIX + "num_requests_running"]
    assert len(running) == 1 and isinstance(running[0], Gauge) and running[0].value == 2
    sides = {m.labels["side"] for m in metrics if m.name == PREFIX + "kv_lease_expired"}
    assert sides == {"producer", "consumer"}


# ---- LLM.get_metrics over every engine layout -------------------------------------------------
def _values(metrics: list[Metric]) -> dict[str, float]:
    """{short name: value} of the unlabelled series (the model name aside)."""
    return {m.name.removeprefix(PREFIX): m.value for m in metrics
            if set(m.labels) == {"model_name"}}


LAYOUTS = {"in_process": {}, "engine_process": {"engine_process": True},
           "data_parallel_2": {"data_parallel_size": 2}}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_get_metrics_idle_and_after_a_generation(checkpoint_factory, layout):
    model_dir = checkpoint_factory("llama")
    num_engines = LAYOUTS[layout].get("data_parallel_size", 1)
    usable = (NUM_KV_BLOCKS - 1) * num_engines
    llm = LLM(model_dir, dtype="float32", max_model_len=256, num_kv_blocks=NUM_KV_BLOCKS,
              **LAYOUTS[layout])
    try:
        metrics = llm.get_metrics()
        table_names = {row.name for row in ENGINE_METRICS}
        assert {m.name for m in metrics} == table_names
        assert all(m.labels["model_name"] == model_dir for m in metrics)
        fresh = _values(metrics)
        assert fresh["num_requests_running"] == fresh["num_requests_waiting"] == 0
        assert fresh["num_free_kv_blocks"] == fresh["num_kv_blocks"]
        assert fresh["prompt_tokens_computed"] == 0

        prompts = [{"prompt_token_ids": [1, *range(10 + 40 * i, 30 + 40 * i + 3 * i)]}
                   for i in range(4)]  # no two share a block: nothing from the prefix cache
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6,
                                                       ignore_eos=True), use_tqdm=False)
        after = _values(llm.get_metrics())
        assert after["prompt_tokens_computed"] == sum(
            len(o.prompt_token_ids) - o.num_cached_tokens for o in outputs) > 0
        assert after["num_kv_blocks"] == usable
        assert after["num_free_kv_blocks"] == usable
        assert after["kv_cache_usage_perc"] == 0.0
        assert after["num_requests_running"] == after["num_requests_waiting"] == 0
        assert after["kv_transfer_sent_tokens"] == 0  # no KV connector
    finally:
        llm.shutdown()
    assert fresh["num_kv_blocks"] == usable  # a fresh engine: its READY carried its figures
