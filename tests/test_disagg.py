"""Disaggregated prefill/decode (issue 10): config, KV frames, leases, P -> D KV hand-over."""

from __future__ import annotations

import json

import pytest

from engine_core.cli import main
from engine_core.disagg.config import KVTransferConfig

GOOD = {"kv_role": "kv_producer", "kv_port": 21001, "proxy_address": "127.0.0.1:30001",
        "send_type": "PUT", "kv_buffer_size": 1e9}


def test_kv_transfer_config_parses_and_is_frozen():
    config = KVTransferConfig.from_json(json.dumps(GOOD))
    assert config.is_producer and not config.is_consumer
    assert config.proxy_host_port == ("127.0.0.1", 30001)
    with pytest.raises(AttributeError):
        config.kv_role = "kv_consumer"  # type: ignore[misc]
    both = KVTransferConfig.from_json(json.dumps({**GOOD, "kv_role": "kv_both"}))
    assert both.is_producer and both.is_consumer


@pytest.mark.parametrize("change, key", [
    ({"kv_rolle": "kv_producer"}, "kv_rolle"),
    ({"kv_role": "prefill"}, "kv_role"),
    ({"send_type": "POST"}, "send_type"),
    ({"kv_port": 0}, "kv_port"),
    ({"kv_port": "21001"}, "kv_port"),
    ({"proxy_address": "localhost"}, "proxy_address"),
    ({"kv_buffer_size": -1}, "kv_buffer_size"),
    ({"kv_buffer_size": True}, "kv_buffer_size"),
])
def test_bad_kv_transfer_config_names_the_key(change, key):
    with pytest.raises(ValueError, match=key):
        KVTransferConfig.from_json(json.dumps({**GOOD, **change}))


def test_missing_key_and_bad_json():
    with pytest.raises(ValueError, match="proxy_address"):
        KVTransferConfig.from_json(json.dumps({"kv_role": "kv_both", "kv_port": 1}))
    with pytest.raises(ValueError, match="JSON"):
        KVTransferConfig.from_json("{kv_role")


def test_serve_with_bad_kv_transfer_config_exits_2_naming_the_key(capsys):
    bad = json.dumps({**GOOD, "send_typ": "PUT"})
    assert main(["serve", "--kv-transfer-config", bad]) == 2
    assert "send_typ" in capsys.readouterr().err
