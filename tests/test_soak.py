"""A short soak of `pp-engine serve` (bench/soak.py's harness, issue 18): 32 concurrent
streaming clients for 45 s on the default model, a quarter leaving mid-stream, hostile bodies
mixed in. Nothing well-formed fails, nothing hostile gets a 5xx, every KV block is free again
at idle and no server process is left. RSS growth and latency are bench figures (noisy on a
shared machine), not asserted here."""

from __future__ import annotations

import pytest

from bench.soak import SoakConfig, soak

pytestmark = pytest.mark.slow


@pytest.mark.timeout(400)
def test_a_short_soak_loses_nothing(tmp_path):
    report = soak(config=SoakConfig(clients=32, duration_s=45.0, window_s=15.0),
                  log_path=str(tmp_path / "server.log"))
    detail = report.render() + "\nserver log:\n" + report.server_log_tail
    assert report.well_formed > 32 and report.finished > 0 and report.left_mid_stream > 0, detail
    assert sum(report.hostile.values()) > 0, detail
    assert report.server_alive, detail
    assert report.well_formed_failed == 0, detail
    assert report.hostile_5xx == 0, detail
    assert report.free_blocks_before == report.free_blocks_after == report.num_kv_blocks, detail
    assert report.left_behind == [], detail
