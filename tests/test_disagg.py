"""Disaggregated prefill/decode (issue 10): config, KV frames, leases, P -> D KV hand-over."""

from __future__ import annotations

import dataclasses
import json
import random
import time

import msgspec
import pytest
import torch
from engine_core.executors.factory import make_executor
from engine_core.executors.kv_endpoint import (
    KVFrameError,
    KVLayerHeader,
    decode_layer,
    encode_layer,
)

from engine_core.config import EngineArgs
from engine_core.engine import EngineCore
from engine_core.entrypoints.cli import main
from engine_core.kv_transfer.connector import KVConnector
from engine_core.kv_transfer.leases import LeaseTable
from engine_core.kv_transfer_config import KVTransferConfig
from engine_core.messages import EngineCoreRequest
from engine_core.sampling_params import SamplingParams
from engine_core.transfer_params import KVTransferParams
from tests.servers import free_port, wait_for

GOOD = {"kv_role": "kv_producer", "kv_port": 21001, "proxy_address": "127.0.0.1:30001",
        "send_type": "PUT", "kv_buffer_size": 1e9}


def test_kv_transfer_config_parses_and_is_frozen():
    config = KVTransferConfig.from_json(json.dumps(GOOD))
    assert config.is_producer and not config.is_consumer
    assert config.proxy_addresses == ["127.0.0.1:30001"]
    several = KVTransferConfig.from_json(json.dumps(
        {**GOOD, "proxy_address": "10.0.0.1:30001, proxy-b:30002"}))
    assert several.proxy_addresses == ["10.0.0.1:30001", "proxy-b:30002"]
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
    ({"proxy_address": "127.0.0.1:30001,"}, "proxy_address"),
    ({"proxy_address": "127.0.0.1:30001,localhost"}, "proxy_address"),
    ({"proxy_address": "127.0.0.1:30001,127.0.0.1:30001"}, "proxy_address"),
    ({"kv_buffer_size": -1}, "kv_buffer_size"),
    ({"kv_buffer_size": True}, "kv_buffer_size"),
    ({"kv_overflow_size": 10**400}, "kv_overflow_size"),
    ({"lease_ttl_s": 0}, "lease_ttl_s"),
])
def test_bad_kv_transfer_config_names_the_key(change, key):
    with pytest.raises(ValueError, match=key):
        KVTransferConfig.from_json(json.dumps({**GOOD, **change}))


def test_integer_sizes_survive_the_engine_process_handshake_unchanged():
    """The front-end sends its config to each engine core as msgpack and refuses an engine
    whose config differs: `"kv_buffer_size": 1` (an int in the JSON) must not come back as 1.0
    and be refused as a mismatch."""
    config = KVTransferConfig.from_json(json.dumps(
        {**GOOD, "kv_buffer_size": 1, "kv_overflow_size": 2, "lease_ttl_s": 3}))
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(config), type=KVTransferConfig)
    assert decoded == config
    assert json.dumps(dataclasses.asdict(decoded)) == json.dumps(dataclasses.asdict(config))


def test_missing_key_and_bad_json():
    with pytest.raises(ValueError, match="proxy_address"):
        KVTransferConfig.from_json(json.dumps({"kv_role": "kv_both", "kv_port": 1}))
    with pytest.raises(ValueError, match="JSON"):
        KVTransferConfig.from_json("{kv_role")


def test_serve_with_bad_kv_transfer_config_exits_2_naming_the_key(capsys):
    bad = json.dumps({**GOOD, "send_typ": "PUT"})
    assert main(["serve", "--kv-transfer-config", bad]) == 2
    assert "send_typ" in capsys.readouterr().err


@pytest.mark.parametrize("change", [{"kv_ip": "10.1.2.3"},
                                    {"proxy_address": "127.0.0.1:30001,10.1.2.3:30002"}])
def test_serve_refuses_kv_transfer_past_this_host_without_keys(capsys, change):
    """Loopback-only disaggregation may run without keys; an address other hosts can reach
    needs --zmq-keys, or --insecure-tcp said out loud."""
    config = json.dumps({**GOOD, **change})
    assert main(["serve", "--kv-transfer-config", config]) == 2
    err = capsys.readouterr().err
    assert "10.1.2.3" in err and "--insecure-tcp" in err and "--zmq-keys" in err


# ---- P -> D KV hand-over between two in-process engines (send type GET) ----------------------



BLOCK = 4
PROMPT_LENGTHS = [1, 5, 8, 17, 30]
MAX_TOKENS = 8


def _engine(model_dir, role=None, lease_ttl_s=30.0, send_type="GET", pipeline_parallel_size=1,
            num_kv_blocks=64, max_model_len=128, speculative_config=None, **kv):
    """An engine in-process, or with `pipeline_parallel_size` > 1 on Ray (one thread a stage).
    `kv`: more KVTransferConfig fields (kv_buffer_size, kv_overflow_size)."""
    pp = {} if pipeline_parallel_size == 1 else {
        "pipeline_parallel_size": pipeline_parallel_size, "distributed_executor_backend": "ray",
        "threads_per_stage": 1}
    config = EngineArgs(model=model_dir, dtype="float32", block_size=BLOCK,
                        num_kv_blocks=num_kv_blocks, max_model_len=max_model_len,
                        speculative_config=speculative_config, **pp).resolve()
    executor = make_executor(config)
    connector = None
    try:
        if role is not None:
            kv_config = KVTransferConfig(kv_role=role, kv_port=free_port(),
                                         proxy_address="127.0.0.1:1", send_type=send_type, **kv)
            connector = KVConnector(config, kv_config, executor.kv_stages(),
                                    lease_ttl_s=lease_ttl_s, fetch_timeout_s=5.0)
    except BaseException:
        executor.shutdown()
        raise
    return EngineCore(config, executor, kv_connector=connector)


def _run(engine, requests, timeout_s=60.0):
    """Add the requests, step until all finished; {request_id: (token_ids, final output)}."""
    for request in requests:
        engine.add_request(request)
    tokens = {r.request_id: [] for r in requests}
    final = {}
    deadline = time.monotonic() + timeout_s
    while len(final) < len(requests):
        assert time.monotonic() < deadline, "the engine did not finish in time"
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finish_reason is not None:
                final[out.request_id] = out
        if not engine.in_flight:
            time.sleep(0.001)
    return {rid: (tokens[rid], final[rid]) for rid in tokens}


def _request(rid, prompt, max_tokens, **kw):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return EngineCoreRequest(rid, prompt, params, **kw)


def _settle(engine, timeout_s=10.0):
    """Step an idle engine until its leases are released and every block is free."""
    bm = engine.block_manager
    deadline = time.monotonic() + timeout_s
    while bm.num_free_blocks != bm.num_usable_blocks and time.monotonic() < deadline:
        engine.step()
        time.sleep(0.01)
    return bm.num_free_blocks == bm.num_usable_blocks


@pytest.fixture(scope="module")
def model_and_prompts(checkpoint_factory):
    return make_model_and_prompts(checkpoint_factory)


def make_model_and_prompts(checkpoint_factory):
    """(model dir, prompts, {request id: the single engine's greedy tokens})."""
    from engine_core.models import load_model_config

    model_dir = checkpoint_factory("llama")
    rng = random.Random(0)
    vocab = load_model_config(model_dir).vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENGTHS]
    single = _engine(model_dir)
    try:
        ref = _run(single, [_request(f"r{i}", p, MAX_TOKENS) for i, p in enumerate(prompts)])
    finally:
        single.shutdown()
    return model_dir, prompts, {rid: toks for rid, (toks, _) in ref.items()}


@pytest.mark.parametrize("send_type", ["GET", "PUT", "PUT_ASYNC"])
def test_prefill_then_decode_is_token_identical(model_and_prompts, send_type):
    p, d = check_prefill_then_decode(model_and_prompts, send_type)
    for stats in (p.kv_connector.stats(), d.kv_connector.stats()):  # room for every push
        assert stats.transfers_held == stats.overflow_transfers == 0


NUM_TRANSFERS = sum((n - 1) // BLOCK > 0 for n in PROMPT_LENGTHS)  # prompts of 2+ blocks


def test_a_speculating_decode_instance_is_token_identical(model_and_prompts):
    """D decodes with n-gram speculation from P's KV (P does not speculate): the same tokens as
    one engine without it, drafts verified on D, every block free afterwards."""
    model_dir, _, _ = model_and_prompts
    pattern = [5, 6, 7, 8, 9, 10]
    prompts = [pattern * 4, [3] + pattern * 3, [11, 12] + pattern * 2]
    single = _engine(model_dir)
    try:
        reference = _run(single, [_request(f"r{i}", pr, 24) for i, pr in enumerate(prompts)])
    finally:
        single.shutdown()
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
            "prompt_lookup_min": 1}
    p = _engine(model_dir, "kv_producer")
    try:
        d = _engine(model_dir, "kv_consumer", speculative_config=spec)
    except BaseException:
        p.shutdown()
        raise
    try:
        first = _run(p, [_request(f"r{i}", pr, 1, do_remote_decode=True)
                         for i, pr in enumerate(prompts)])
        decoded = _run(d, [_request(rid, prompts[int(rid[1:])], 24,
                                    kv_transfer_params=out.kv_transfer_params)
                           for rid, (_, out) in first.items()])
        for rid, (tokens, _) in decoded.items():
            assert tokens == reference[rid][0], rid
        assert d.stats().kv_transfer.received_tokens > 0  # D decoded from P's KV
        assert d.stats().spec_decode.num_draft_tokens > 0
        assert p.stats().spec_decode.num_drafts == 0
        assert _settle(p) and _settle(d)
    finally:
        p.shutdown()
        d.shutdown()


@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC"])
def test_pushes_beyond_the_buffer_go_to_the_overflow_pool(model_and_prompts, send_type):
    """A receive buffer smaller than one transfer: every push is kept in the overflow pool."""
    p, d = check_prefill_then_decode(model_and_prompts, send_type, kv_buffer_size=1)
    stats_p, stats_d = p.kv_connector.stats(), d.kv_connector.stats()
    assert stats_d.overflow_transfers == NUM_TRANSFERS
    assert stats_p.transfers_held == stats_d.transfers_held == 0


@pytest.mark.parametrize("send_type", ["PUT", "PUT_ASYNC"])
def test_pushes_with_no_room_are_held_and_pulled(model_and_prompts, send_type):
    """Buffer and overflow pool both too small: D tells P to hold every push, P keeps the
    leases, D pulls them (GET) and releases them: no lease expires, every block comes back."""
    p, d = check_prefill_then_decode(model_and_prompts, send_type, kv_buffer_size=1,
                                     kv_overflow_size=1)
    stats_p, stats_d = p.kv_connector.stats(), d.kv_connector.stats()
    assert stats_p.transfers_held == stats_d.transfers_held == NUM_TRANSFERS
    assert stats_d.overflow_transfers == 0


@pytest.mark.parametrize("send_type", ["GET", "PUT"])
def test_decoder_short_of_blocks_waits_for_them_instead_of_recomputing(model_and_prompts,
                                                                        send_type):
    """D's 11 usable blocks cannot hold every prompt at once (18 blocks): requests wait in
    line for blocks, then take their KV; D still computes only the tails."""
    p, d = check_prefill_then_decode(model_and_prompts, send_type, max_tokens=2,
                                     num_kv_blocks=12, max_model_len=40)
    assert sum(-(-n // BLOCK) for n in PROMPT_LENGTHS) > d.block_manager.num_usable_blocks
    assert d.kv_connector.stats().received_tokens == p.kv_connector.stats().sent_tokens
    if send_type == "PUT":  # the 7-block push found 11 free blocks, 6 promised to others
        assert d.kv_connector.stats().overflow_transfers == 1


def check_prefill_then_decode(model_and_prompts, send_type, producer_pp=1, max_tokens=MAX_TOKENS,
                              **decoder):
    """P (at `producer_pp` stages) prefills every prompt, D (in-process; `decoder`: more
    `_engine` arguments) decodes from its KV: token-identical to one engine, D computes only
    the tails, every block free afterwards, no lease expired. Returns (P's, D's) engine."""
    model_dir, prompts, reference = model_and_prompts
    p = _engine(model_dir, "kv_producer", send_type=send_type,
                pipeline_parallel_size=producer_pp)
    try:
        d = _engine(model_dir, "kv_consumer", send_type=send_type, **decoder)
    except BaseException:
        p.shutdown()
        raise
    try:
        def push_to(i):  # what the proxy gives P with PUT/PUT_ASYNC: where to push, as what
            if send_type == "GET":
                return None
            return KVTransferParams(kv_endpoint=d.kv_connector.endpoint, block_ids=[],
                                    num_tokens=0, compat_hash=d.kv_connector.compat_hash,
                                    lease_id=f"transfer-{i}", send_type=send_type)
        assert len(p.kv_connector.stages) == producer_pp
        first = _run(p, [_request(f"r{i}", pr, 1, do_remote_decode=True,
                                  kv_transfer_params=push_to(i))
                         for i, pr in enumerate(prompts)])
        params = {rid: out.kv_transfer_params for rid, (_, out) in first.items()}
        assert all(pp is not None for pp in params.values())
        if send_type == "GET":
            assert p.block_manager.num_free_blocks < p.block_manager.num_usable_blocks  # leased
        decoded = _run(d, [_request(rid, prompts[int(rid[1:])], max_tokens,
                                    kv_transfer_params=params[rid]) for rid in params])
        for rid, (tokens, _) in decoded.items():
            assert tokens == reference[rid][:max_tokens], rid
            assert first[rid][0] == reference[rid][:1]  # P's first token agrees
        # D ran only the tail of each prompt: at most the last partial block and last token
        assert d.scheduler.num_prompt_tokens_computed == sum(
            len(pr) - params[f"r{i}"].num_tokens for i, pr in enumerate(prompts))
        assert all(len(pr) - params[f"r{i}"].num_tokens <= BLOCK
                   for i, pr in enumerate(prompts))
        assert _settle(p) and _settle(d)  # D confirmed: P's leased blocks came back
        stats_p, stats_d = p.kv_connector.stats(), d.kv_connector.stats()
        assert stats_p.sent_tokens == stats_d.received_tokens == sum(  # each sent once
            pp.num_tokens for pp in params.values()) > 0
        assert stats_d.received_bytes > 0
        assert d.kv_connector._received.num_transfers == 0
        assert stats_d.buffer_bytes == stats_d.overflow_bytes == 0
        assert len(p.kv_connector.leases) == 0
        assert stats_p.leases_expired == stats_d.pushes_expired == 0
        assert d.scheduler.num_preemptions == 0
        return p, d
    finally:
        p.shutdown()
        d.shutdown()


def test_unknown_lease_or_wrong_hash_falls_back_and_serves(model_and_prompts):
    model_dir, prompts, reference = model_and_prompts
    p, d = _engine(model_dir, "kv_producer"), _engine(model_dir, "kv_consumer")
    try:
        first = _run(p, [_request("r4", prompts[4], 1, do_remote_decode=True)])
        good = first["r4"][1].kv_transfer_params
        bad_lease = msgspec_replace(good, lease_id="no-such-lease")
        bad_hash = msgspec_replace(good, compat_hash="0" * 16)
        out = _run(d, [_request("a", prompts[4], MAX_TOKENS, kv_transfer_params=bad_lease),
                       _request("b", prompts[4], MAX_TOKENS, kv_transfer_params=bad_hash)])
        assert out["a"][0] == out["b"][0] == reference["r4"]  # computed the prompt itself
        assert p.kv_connector.stats().dropped_messages >= 1  # the unknown lease was refused
        # the instance still serves a good transfer afterwards
        out = _run(d, [_request("c", prompts[4], MAX_TOKENS, kv_transfer_params=good)])
        assert out["c"][0] == reference["r4"]
        assert _settle(p) and _settle(d)
    finally:
        p.shutdown()
        d.shutdown()


def test_lease_expiry_returns_producer_blocks(model_and_prompts):
    model_dir, prompts, _ = model_and_prompts
    p = _engine(model_dir, "kv_producer", lease_ttl_s=0.3)
    try:
        _run(p, [_request("r3", prompts[3], 1, do_remote_decode=True)])
        assert len(p.kv_connector.leases) == 1
        assert p.block_manager.num_free_blocks < p.block_manager.num_usable_blocks
        assert _settle(p, timeout_s=5.0)  # no decoder came: the lease expired
        assert len(p.kv_connector.leases) == 0
        assert p.kv_connector.stats().leases_expired == 1
    finally:
        p.shutdown()


def _layer_frames(connector, lease_id, num_blocks, compat_hash=None):
    """The frames of every layer of a pushed transfer of `num_blocks` blocks (zeros)."""
    m = connector.config.model
    k = torch.zeros(num_blocks, BLOCK, m.num_kv_heads, m.head_dim)
    return [[bytes(f) for f in encode_layer(KVLayerHeader(
        lease_id, compat_hash or connector.compat_hash, layer, m.num_layers, num_blocks * BLOCK,
        "float32", list(k.shape)), k, k)] for layer in range(m.num_layers)]


@pytest.fixture
def dealer():
    """dealer(endpoint): a DEALER connected there, like P's pushes or the proxy's ReleaseKV."""
    import zmq

    ctx = zmq.Context()
    sockets = []

    def connect(endpoint):
        sock = ctx.socket(zmq.DEALER)
        sock.connect(endpoint)
        sockets.append(sock)
        return sock

    yield connect
    for sock in sockets:
        sock.close(linger=0)
    ctx.term()


def _offer(sock, connector, lease_id, num_blocks, compat_hash=None, num_bytes=None):
    """Send a PushOffer, return D's PushReply (within 5 s)."""
    from engine_core.kv_transfer.kv_wire import PushOffer, PushReply

    sock.send(msgspec.msgpack.encode(PushOffer(
        lease_id, compat_hash or connector.compat_hash, num_blocks,
        num_blocks * connector.local.block_bytes if num_bytes is None else num_bytes)))
    assert sock.poll(5000), "no PushReply"
    return msgspec.msgpack.decode(sock.recv(), type=PushReply)


def test_decoder_silent_at_push_time_pulls_later(model_and_prompts, monkeypatch):
    """P's offers get no answer (D not up yet): P waits once (PUSH_REPLY_TIMEOUT_S), not once
    per request, keeps every lease, and the decoder pulls them when its requests come."""
    from engine_core.kv_transfer import kv_pusher

    monkeypatch.setattr(kv_pusher, "PUSH_REPLY_TIMEOUT_S", 0.5)
    model_dir, prompts, reference = model_and_prompts
    port = free_port()
    p = _engine(model_dir, "kv_producer", send_type="PUT")
    try:
        start = time.monotonic()
        first = _run(p, [_request(f"r{i}", prompts[i], 1, do_remote_decode=True,
                                  kv_transfer_params=KVTransferParams(
                                      kv_endpoint=f"tcp://127.0.0.1:{port}", block_ids=[],
                                      num_tokens=0, compat_hash=p.kv_connector.compat_hash,
                                      lease_id=f"t{i}", send_type="PUT"))
                         for i in (2, 3, 4)])
        assert time.monotonic() - start < 3.0
        assert p.kv_connector.stats().transfers_held == 3 and len(p.kv_connector.leases) == 3
        d = _engine(model_dir, "kv_consumer", send_type="PUT")
        try:
            d.kv_connector.fetcher.fetch_timeout_s = 0.5  # no push comes: pull after that
            out = _run(d, [_request(rid, prompts[int(rid[1:])], MAX_TOKENS,
                                    kv_transfer_params=final.kv_transfer_params)
                           for rid, (_, final) in first.items()])
            for rid, (tokens, _) in out.items():
                assert tokens == reference[rid], rid
            assert d.kv_connector.stats().received_tokens == sum(
                final.kv_transfer_params.num_tokens for _, final in first.values())
            assert _settle(d) and _settle(p)
            assert p.kv_connector.stats().leases_expired == 0
        finally:
            d.shutdown()
    finally:
        p.shutdown()


def test_unclaimed_and_half_pushed_kv_expires_and_is_counted(model_and_prompts, dealer):
    """Pushed KV whose request never comes (complete, or cut off mid-push: P died) is dropped
    by D's endpoint after the TTL, without any engine step, and counted."""
    from engine_core.kv_transfer.kv_wire import PushDone

    model_dir, _, _ = model_and_prompts
    d = _engine(model_dir, "kv_consumer", send_type="PUT", lease_ttl_s=0.5)
    try:
        conn = d.kv_connector
        sock = dealer(conn.endpoint)
        assert _offer(sock, conn, "whole", 2).accepted
        for frames in _layer_frames(conn, "whole", 2):
            sock.send_multipart(frames)
        sock.send(msgspec.msgpack.encode(PushDone("whole", conn.config.model.num_layers)))
        assert _offer(sock, conn, "half", 1).accepted
        sock.send_multipart(_layer_frames(conn, "half", 1)[0])  # then P dies
        assert conn.stats().buffer_bytes == 3 * conn.local.block_bytes  # reserved at the offers
        wait_for(lambda: conn.stats().pushes_expired == 2, 5.0, "both pushes to expire")
        assert conn.stats().buffer_bytes == conn.stats().overflow_bytes == 0
        kv = d.stats().kv_transfer  # what the front-end's metrics get
        assert (kv.pushes_expired, kv.buffer_bytes, kv.leases_expired) == (2, 0, 0)
        assert conn._received.num_transfers == 0
        dropped = conn.stats().dropped_messages
        sock.send_multipart(_layer_frames(conn, "half", 1)[1])  # a late layer: dropped at once
        wait_for(lambda: conn.stats().dropped_messages == dropped + 1, 5.0, "a dropped message")
        assert _settle(d)
    finally:
        d.shutdown()


def test_release_from_a_third_party_ends_leases_and_drops_buffered_kv(model_and_prompts,
                                                                       dealer):
    """ReleaseKV, sent by a DEALER as the proxy will: P frees a lease's blocks long before its
    TTL; D drops a push it buffered. A request aborted before its fetch started releases P's
    lease too."""
    from engine_core.kv_transfer.kv_wire import ReleaseKV

    model_dir, prompts, _ = model_and_prompts
    p = _engine(model_dir, "kv_producer", lease_ttl_s=60.0)
    d = _engine(model_dir, "kv_consumer", send_type="PUT", lease_ttl_s=60.0)
    try:
        params = _run(p, [_request("r4", prompts[4], 1, do_remote_decode=True)])["r4"][1] \
            .kv_transfer_params
        assert params.lease_id in p.kv_connector.leases
        start = time.monotonic()
        dealer(p.kv_connector.endpoint).send(msgspec.msgpack.encode(ReleaseKV(params.lease_id)))
        assert _settle(p, timeout_s=5.0) and time.monotonic() - start < 5.0
        assert len(p.kv_connector.leases) == 0 and p.kv_connector.stats().leases_expired == 0

        conn = d.kv_connector
        sock = dealer(conn.endpoint)
        assert _offer(sock, conn, "buffered", 2).accepted
        assert conn.stats().buffer_bytes == 2 * conn.local.block_bytes
        dealer(conn.endpoint).send(msgspec.msgpack.encode(ReleaseKV("buffered")))
        wait_for(lambda: conn.stats().buffer_bytes == 0, 5.0, "an empty receive buffer")
        assert conn._received.num_transfers == 0 and conn.stats().pushes_expired == 0

        # D's request is aborted after it got blocks, before its fetch started
        params = _run(p, [_request("r3", prompts[3], 1, do_remote_decode=True)])["r3"][1] \
            .kv_transfer_params
        d.add_request(_request("a", prompts[3], MAX_TOKENS, kv_transfer_params=params))
        d.step()  # it got its blocks; the fetch would start with the next step
        assert "a" in d.scheduler.waiting_for_kv
        d.abort_requests(["a"])
        assert _settle(d, timeout_s=5.0) and not d.scheduler.has_unfinished_requests()
        assert _settle(p, timeout_s=5.0)  # D's ReleaseKV ended the lease
        assert p.kv_connector.stats().leases_expired == 0
        assert p.kv_connector.stats().sent_tokens == 0  # nothing was pulled
    finally:
        p.shutdown()
        d.shutdown()


def test_executor_without_kv_stages_names_itself():
    from engine_core.executor import Executor

    class Bare(Executor):
        num_kv_blocks = 1

        def submit(self, batch):
            raise AssertionError

        def shutdown(self):
            pass

    with pytest.raises(NotImplementedError, match="Bare"):
        Bare().kv_stages()


def test_engine_without_connector_frees_blocks_as_before(model_and_prompts):
    model_dir, prompts, reference = model_and_prompts
    e = _engine(model_dir)
    try:  # do_remote_decode without a connector is still freed (no lease will ever come)
        out = _run(e, [_request("r2", prompts[2], MAX_TOKENS)])
        assert out["r2"][0] == reference["r2"]
        assert e.block_manager.num_free_blocks == e.block_manager.num_usable_blocks
    finally:
        e.shutdown()


def test_truncated_or_malformed_kv_frames_are_rejected():
    k = torch.randn(2, BLOCK, 2, 8)
    header = KVLayerHeader("lease", "hash", 0, 1, 2 * BLOCK, "float32", list(k.shape))
    frames = encode_layer(header, k, k + 1)
    layer = decode_layer([bytes(f) for f in frames])
    assert torch.equal(layer.k, k) and torch.equal(layer.v, k + 1)
    with pytest.raises(KVFrameError, match="truncated"):
        decode_layer([bytes(frames[0]), bytes(frames[1])[:-4], bytes(frames[2])])
    with pytest.raises(KVFrameError):
        decode_layer([b"garbage", bytes(frames[1]), bytes(frames[2])])
    with pytest.raises(KVFrameError):
        decode_layer(frames[:2])


def test_lease_table_expiry_with_a_fake_clock():
    now = [0.0]
    table = LeaseTable(10.0, clock=lambda: now[0])
    a = table.grant("a", [1, 2], 8)
    b = table.grant("b", [3], 4)
    assert table.release(b.lease_id) == b and table.release(b.lease_id) is None
    now[0] = 9.9
    assert table.expire() == []
    now[0] = 10.0
    assert table.expire() == [a] and len(table) == 0


def msgspec_replace(struct, **changes):
    return msgspec.structs.replace(struct, **changes)


def test_pushed_garbage_is_dropped_and_the_decoder_still_serves(model_and_prompts, dealer):
    model_dir, prompts, reference = model_and_prompts
    d = _engine(model_dir, "kv_consumer", send_type="PUT")
    conn = d.kv_connector
    try:
        sock = dealer(conn.endpoint)
        frames = _layer_frames(conn, "x", 1, compat_hash="0" * 16)[0]
        sock.send_multipart(frames)  # another KV layout
        sock.send_multipart([frames[0], frames[1][:-1], frames[2]])  # truncated
        sock.send_multipart([b"\x00garbage", b"more"])  # neither a layer nor a control message
        wait_for(lambda: conn.stats().dropped_messages >= 3, 5.0, "3 dropped messages")
        assert conn.stats().dropped_messages == 3
        # an offer of another KV layout is refused, naming it; its layers are dropped
        reply = _offer(sock, conn, "x", 1, compat_hash="0" * 16)
        assert not reply.accepted and "hash" in reply.reason
        reply = _offer(sock, conn, "y", 1, num_bytes=7)  # a size that does not fit the layout
        assert not reply.accepted and "bytes" in reply.reason
        for frames in _layer_frames(conn, "y", 1):  # no accepted offer for them
            sock.send_multipart(frames)
        num_layers = conn.config.model.num_layers
        wait_for(lambda: conn.stats().dropped_messages == 5 + num_layers, 5.0,
                 "every layer's message dropped")
        assert conn._received.num_transfers == 0 and conn.stats().buffer_bytes == 0
        out = _run(d, [_request("r3", prompts[3], MAX_TOKENS)])
        assert out["r3"][0] == reference["r3"]
        assert _settle(d)
    finally:
        d.shutdown()


def test_registry_refuses_mismatched_layout_and_names_missing_roles():
    from engine_core.entrypoints.http.discovery_wire import Heartbeat, Load, Register
    from engine_core.entrypoints.proxy.discovery import NoInstanceError, Registry

    now = [0.0]
    registry = Registry(heartbeat_timeout_s=5.0, clock=lambda: now[0])
    fields = {"dtype": '"float32"', "block_size": "16", "num_kv_heads": "2"}
    with pytest.raises(NoInstanceError, match="prefill"):
        registry.pick_pair()
    assert registry.register(Register("p0", "kv_producer", "tcp://a:1", "tcp://a:2",
                                      fields)).error is None
    with pytest.raises(NoInstanceError, match="decode"):
        registry.pick_pair()
    reply = registry.register(Register("d0", "kv_consumer", "tcp://b:1", "tcp://b:2",
                                       {**fields, "block_size": "32"}))
    assert reply.error is not None and "block_size" in reply.error
    assert registry.register(Register("d0", "kv_consumer", "tcp://b:1", "tcp://b:2",
                                      fields)).error is None
    assert registry.register(Register("d1", "kv_consumer", "tcp://c:1", "tcp://c:2",
                                      fields)).error is None
    assert registry.heartbeat(Heartbeat("d0", Load(num_running=3)))
    p, d = registry.pick_pair()
    assert (p.register.instance_id, d.register.instance_id) == ("p0", "d1")  # least loaded
    now[0] = 4.0
    assert registry.heartbeat(Heartbeat("d0")) and not registry.heartbeat(Heartbeat("x"))
    now[0] = 6.0  # p0 and d1 went silent
    with pytest.raises(NoInstanceError, match="prefill"):
        registry.pick_pair()
    assert set(registry.instances) == {"d0"}


def test_dead_producer_or_abort_while_waiting_for_kv_ends_in_bounded_time(model_and_prompts):
    model_dir, prompts, reference = model_and_prompts
    d = _engine(model_dir, "kv_consumer")
    d.kv_connector.fetcher.fetch_timeout_s = 0.5
    try:  # P is gone: its endpoint answers nothing
        dead = KVTransferParams(kv_endpoint=f"tcp://127.0.0.1:{free_port()}", block_ids=[1, 2],
                                num_tokens=2 * BLOCK, compat_hash=d.kv_connector.compat_hash,
                                lease_id="gone", send_type="GET")
        start = time.monotonic()
        out = _run(d, [_request("a", prompts[4], MAX_TOKENS, kv_transfer_params=dead)])
        assert out["a"][0] == reference["r4"]  # it computed the prompt itself
        assert time.monotonic() - start < 10
        assert _settle(d)
        # aborted while its KV is on the way: freed once the fetch has given up, no leak
        d.add_request(_request("b", prompts[4], MAX_TOKENS, kv_transfer_params=dead))
        d.step()
        assert "b" in d.scheduler.waiting_for_kv
        d.abort_requests(["b"])
        assert _settle(d, timeout_s=5.0)
        assert not d.scheduler.has_unfinished_requests()
    finally:
        d.shutdown()


def test_a_dead_producer_delays_only_its_own_pull(model_and_prompts):
    """Pulls run side by side: while one waits out a producer that answers nothing, another
    request's KV arrives from a live producer at once and it decodes."""
    model_dir, prompts, reference = model_and_prompts
    p = _engine(model_dir, "kv_producer")
    d = _engine(model_dir, "kv_consumer")
    d.kv_connector.fetcher.fetch_timeout_s = 8.0
    try:
        first = _run(p, [_request("r4", prompts[4], 1, do_remote_decode=True)])
        live = first["r4"][1].kv_transfer_params
        dead = KVTransferParams(kv_endpoint=f"tcp://127.0.0.1:{free_port()}", block_ids=[1, 2],
                                num_tokens=2 * BLOCK, compat_hash=d.kv_connector.compat_hash,
                                lease_id="gone", send_type="GET")
        d.add_request(_request("stuck", prompts[3], MAX_TOKENS, kv_transfer_params=dead))
        d.step()  # the dead pull starts first
        start = time.monotonic()
        out = _run(d, [_request("r4", prompts[4], MAX_TOKENS, kv_transfer_params=live)])
        assert time.monotonic() - start < 4.0  # not behind the other pull's 8 s
        assert out["r4"][0] == reference["r4"]
        assert "stuck" in d.scheduler.waiting_for_kv  # still waiting out its producer
        assert d.kv_connector.stats().received_tokens == live.num_tokens
        d.abort_requests(["stuck"])
        assert _settle(p) and _settle(d, timeout_s=15.0)
    finally:
        p.shutdown()
        d.shutdown()


def test_the_fetcher_survives_an_error_of_its_own(model_and_prompts, monkeypatch):
    """An unexpected error inside D's fetcher fails the fetches in flight (those requests
    compute their prompts, same tokens) and the fetcher goes on serving the next ones."""
    model_dir, prompts, reference = model_and_prompts
    p = _engine(model_dir, "kv_producer")
    d = _engine(model_dir, "kv_consumer", send_type="PUT")
    received = d.kv_connector._received
    real_state, failures = received.state, []

    def state_failing_once(lease_id):
        if not failures:
            failures.append(lease_id)
            raise RuntimeError("injected")
        return real_state(lease_id)

    monkeypatch.setattr(received, "state", state_failing_once)
    try:
        pushed = KVTransferParams(kv_endpoint=f"tcp://127.0.0.1:{free_port()}",
                                  block_ids=[1, 2], num_tokens=2 * BLOCK,
                                  compat_hash=d.kv_connector.compat_hash, lease_id="x",
                                  send_type="PUT")
        start = time.monotonic()
        out = _run(d, [_request("a", prompts[4], MAX_TOKENS, kv_transfer_params=pushed)])
        assert failures == ["x"] and time.monotonic() - start < 4.0  # failed, not timed out
        assert out["a"][0] == reference["r4"]
        first = _run(p, [_request("r4", prompts[4], 1, do_remote_decode=True)])
        live = first["r4"][1].kv_transfer_params
        out = _run(d, [_request("r4", prompts[4], MAX_TOKENS, kv_transfer_params=live)])
        assert out["r4"][0] == reference["r4"]
        assert d.kv_connector.stats().received_tokens == live.num_tokens
        assert _settle(p) and _settle(d)
    finally:
        p.shutdown()
        d.shutdown()


def test_metrics_expose_prompt_and_kv_transfer_counters():
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from engine_core.entrypoints.openai.metrics import _EngineStatsCollector
    from engine_core.messages import KVTransferStats, SchedulerStats

    stats = SchedulerStats(num_prompt_tokens_computed=7, kv_transfer=KVTransferStats(
        sent_tokens=64, received_tokens=32, sent_bytes=1024, seconds=0.5, leases_expired=3,
        pushes_expired=2, transfers_held=5, overflow_transfers=4, buffer_bytes=4096,
        overflow_bytes=8192, dropped_messages=6))
    llm = SimpleNamespace(stats=stats, num_restarts=0,
                          client=SimpleNamespace(engine_states=lambda: []))
    registry = CollectorRegistry()
    registry.register(_EngineStatsCollector(llm, "m"))
    text = generate_latest(registry).decode()
    for line in ('ppengine:prompt_tokens_computed_total{model_name="m"} 7.0',
                 'ppengine:kv_transfer_sent_tokens_total{model_name="m"} 64.0',
                 'ppengine:kv_transfer_received_tokens_total{model_name="m"} 32.0',
                 'ppengine:kv_transfer_sent_bytes_total{model_name="m"} 1024.0',
                 'ppengine:kv_transfer_seconds_total{model_name="m"} 0.5',
                 'ppengine:kv_lease_expired_total{model_name="m",side="producer"} 3.0',
                 'ppengine:kv_lease_expired_total{model_name="m",side="consumer"} 2.0',
                 'ppengine:kv_transfer_held_total{model_name="m"} 5.0',
                 'ppengine:kv_overflow_transfers_total{model_name="m"} 4.0',
                 'ppengine:kv_buffer_bytes{model_name="m"} 4096.0',
                 'ppengine:kv_overflow_bytes{model_name="m"} 8192.0',
                 'ppengine:kv_transfer_dropped_messages_total{model_name="m"} 6.0'):
        assert line in text, line


def test_two_prefill_two_decode_engines_cross_over(model_and_prompts):
    model_dir, prompts, reference = model_and_prompts
    ps = [_engine(model_dir, "kv_producer") for _ in range(2)]
    ds = [_engine(model_dir, "kv_consumer") for _ in range(2)]
    try:
        params = {}
        for i, prompt in enumerate(prompts):  # prompt i: P i % 2, then D (i + 1) % 2
            first = _run(ps[i % 2], [_request(f"r{i}", prompt, 1, do_remote_decode=True)])
            params[f"r{i}"] = first[f"r{i}"][1].kv_transfer_params
        for j, d in enumerate(ds):
            mine = [i for i in range(len(prompts)) if (i + 1) % 2 == j]
            out = _run(d, [_request(f"r{i}", prompts[i], MAX_TOKENS,
                                    kv_transfer_params=params[f"r{i}"]) for i in mine])
            for i in mine:
                assert out[f"r{i}"][0] == reference[f"r{i}"]
        assert sum(d.scheduler.num_prompt_tokens_computed for d in ds) == sum(
            len(pr) - params[f"r{i}"].num_tokens for i, pr in enumerate(prompts))
        assert all(_settle(e) for e in ps + ds)
    finally:
        for e in ps + ds:
            e.shutdown()


def test_shutdown_does_not_wait_out_a_pending_fetch(model_and_prompts):
    model_dir, prompts, _ = model_and_prompts
    for send_type in ("GET", "PUT"):
        d = _engine(model_dir, "kv_consumer", send_type=send_type)
        d.kv_connector.fetcher.fetch_timeout_s = 60.0
        dead = KVTransferParams(kv_endpoint=f"tcp://127.0.0.1:{free_port()}", block_ids=[1],
                                num_tokens=BLOCK, compat_hash=d.kv_connector.compat_hash,
                                lease_id="never", send_type=send_type)
        d.add_request(_request("a", prompts[4], MAX_TOKENS, kv_transfer_params=dead))

        def fetching(d=d) -> bool:  # a step gives it blocks, the next one starts its fetch
            d.step()
            fetcher = d.kv_connector.fetcher
            return bool(fetcher._pulls or fetcher._awaiting)  # the fetch thread has it

        try:
            wait_for(fetching, 10, f"the {send_type} fetch to start")
        except BaseException:
            d.shutdown()
            raise
        start = time.monotonic()
        d.shutdown()
        assert time.monotonic() - start < 3, send_type


# ---- the disaggregation fields of a request must fit the engine's role ------------------------
def test_transfer_fields_must_fit_the_engines_role(model_and_prompts):
    model_dir, prompts, _ = model_and_prompts
    plain, p, d = _engine(model_dir), _engine(model_dir, "kv_producer"), \
        _engine(model_dir, "kv_consumer")
    prompt = prompts[4]  # 30 tokens: 7 whole blocks of 4 before its last token
    good = KVTransferParams(kv_endpoint="tcp://127.0.0.1:1", block_ids=[1, 2], num_tokens=8,
                            compat_hash=d.kv_connector.compat_hash, lease_id="x",
                            send_type="GET")
    try:
        with pytest.raises(ValueError, match="kv_transfer_params"):
            plain.add_request(_request("a", prompt, 4, kv_transfer_params=good))
        with pytest.raises(ValueError, match="do_remote_decode"):
            d.add_request(_request("b", prompt, 1, do_remote_decode=True))
        with pytest.raises(ValueError, match="kv_transfer_params"):
            p.add_request(_request("c", prompt, 4, kv_transfer_params=good))
        with pytest.raises(ValueError, match=r"kv_transfer_params\.kv_endpoint"):  # push target
            p.add_request(_request("c", prompt, 1, do_remote_decode=True,
                                   kv_transfer_params=msgspec_replace(good, kv_endpoint="x:1")))
        for bad in (msgspec_replace(good, num_tokens=7),  # not whole blocks
                    msgspec_replace(good, num_tokens=12),  # 3 blocks' tokens in 2 blocks
                    msgspec_replace(good, block_ids=list(range(8)), num_tokens=32),  # > prompt
                    msgspec_replace(good, send_type="POST"),
                    msgspec_replace(good, kv_endpoint="not an address"),
                    msgspec_replace(good, kv_endpoint="ipc:///tmp/x")):
            with pytest.raises(ValueError, match="kv_transfer_params"):
                d.add_request(_request("d", prompt, 4, kv_transfer_params=bad))
        for engine in (plain, p, d):  # nothing was admitted, no block taken
            assert not engine.scheduler.requests
            assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    finally:
        for engine in (plain, p, d):
            engine.shutdown()


def test_a_constrained_request_through_prefill_and_decode(model_and_prompts, tmp_path):
    """P's one token and D's tokens all obey the request's constraint (each instance compiles
    it): the same tokens as one engine, valid JSON, every block free afterwards."""
    import json

    from engine_core import StructuredOutputsParams
    from tests.text_checkpoint import add_tokenizer

    model_dir = add_tokenizer(model_and_prompts[0], str(tmp_path / "model"))
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 9999}}, "required": ["n"]}
    params = SamplingParams(temperature=0.0, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(json=schema))
    prompts = [[1, *range(5, 5 + n)] for n in (20, 40)]

    def request(rid, prompt, max_tokens, **kw):
        return EngineCoreRequest(rid, prompt, msgspec.structs.replace(
            params, max_tokens=max_tokens), [2], **kw)

    single = _engine(model_dir)
    try:
        reference = _run(single, [request(f"r{i}", p, 40) for i, p in enumerate(prompts)])
    finally:
        single.shutdown()
    p = _engine(model_dir, "kv_producer")
    try:
        d = _engine(model_dir, "kv_consumer")
    except BaseException:
        p.shutdown()
        raise
    try:
        first = _run(p, [request(f"r{i}", pr, 1, do_remote_decode=True)
                         for i, pr in enumerate(prompts)])
        for rid, (tokens, _) in first.items():
            assert tokens == reference[rid][0][:1]  # P's token obeys the constraint too
        decoded = _run(d, [request(rid, prompts[int(rid[1:])], 40,
                                   kv_transfer_params=out.kv_transfer_params)
                           for rid, (_, out) in first.items()])
        for rid, (tokens, out) in decoded.items():
            assert tokens == reference[rid][0], rid
            assert out.finish_reason == "stop"
            assert "n" in json.loads(_text(model_dir, tokens))
        assert d.stats().kv_transfer.received_tokens > 0
        assert _settle(p) and _settle(d)
    finally:
        p.shutdown()
        d.shutdown()


def _text(model_dir, token_ids):
    from engine_core.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    assert tokenizer is not None
    return tokenizer.decode(token_ids)
