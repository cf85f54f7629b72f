"""Wire hygiene between front-end and engine core: hostile frames on either socket, strangers on
the sockets, CurveZMQ on tcp. Every wait is bounded; every engine process is checked gone."""

from __future__ import annotations

import asyncio
import os
import random
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.auth
from zmq.auth.thread import AuthenticationThread

from engine_core import LLM, SamplingParams
from engine_core.client.core_process import KIND_ABORT, KIND_ADD, KIND_SHUTDOWN
from engine_core.config import EngineArgs
from engine_core.entrypoints.async_llm import AsyncLLM
from engine_core.messages import (
    AbortRequests,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
)
from engine_core.transport import WarningLimiter
from tests.servers import connect_and_handshake
from tests.text_checkpoint import add_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "def hello(world):"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def text_model(checkpoint_factory, tmp_path_factory):
    return add_tokenizer(checkpoint_factory("llama"), str(tmp_path_factory.mktemp("wire-tok")))


@pytest.fixture(scope="module")
def expected_tokens(text_model) -> list[int]:
    llm = LLM(text_model, dtype="float32")
    try:
        return llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    finally:
        llm.shutdown()


@pytest.fixture
def zmq_ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _gone(pid: int) -> bool:
    """True once the process no longer exists (reaped) or is a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _shutdown_and_check(llm: LLM) -> None:
    core = llm.engine.client
    pid, ipc_dir = core.engine_states()[0].pid, core.launcher.ipc_dir
    llm.shutdown()
    assert _gone(pid)
    assert ipc_dir is None or not os.path.exists(ipc_dir)


def _generate(llm: LLM) -> list[int]:
    return llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def _fuzz_inputs(seed: int = 0) -> list[list[bytes]]:
    """Malformed input messages (the frames after the routing id)."""
    rng = random.Random(seed)
    valid = msgspec.msgpack.encode(EngineCoreRequest("fuzz", [1, 2, 3], SamplingParams()))
    cases: list[list[bytes]] = []
    for _ in range(40):
        cases.append([KIND_ADD, rng.randbytes(rng.randint(0, 96))])
    for _ in range(12):
        cases.append([KIND_ABORT, rng.randbytes(rng.randint(0, 64))])
    for _ in range(12):
        cases.append([rng.randbytes(rng.randint(0, 12)), rng.randbytes(rng.randint(0, 32))])
    cases += [[KIND_ADD, valid[:cut]] for cut in (1, 5, len(valid) // 2, len(valid) - 1)]
    cases += [
        [KIND_ADD, msgspec.msgpack.encode(AbortRequests(["0"]))],  # wrong type for the kind
        [KIND_ABORT, valid],
        [b""],  # one empty frame
        [KIND_ADD, b""],
        [KIND_ADD],  # one frame
        [KIND_ADD, valid, b"extra"],  # three frames
        [b"bogus", valid],  # unknown kind
        [KIND_SHUTDOWN, b"", b""],  # a shutdown of the wrong shape must not stop the engine
    ]
    return cases


def _invalid_request(request_id: str, **sampling: object) -> bytes:
    """An add payload encoded by hand, past SamplingParams' own checks."""
    return msgspec.msgpack.encode({"request_id": request_id, "prompt_token_ids": [1, 5, 9],
                                   "sampling_params": {"max_tokens": 4, **sampling}})


def _sync_view(sock) -> zmq.Socket:
    """A blocking view of one of the client's asyncio sockets (its loop is idle between
    steps), for reading what arrives there directly."""
    return zmq.Socket.shadow(sock.underlying)


def _error_outputs(client, request_ids: set[str], timeout_s: float = 20.0
                   ) -> dict[str, EngineCoreOutput]:
    """Step the client until every id in request_ids has had an output (bounded)."""
    client.step_timeout_s = timeout_s
    seen: dict[str, EngineCoreOutput] = {}
    deadline = time.monotonic() + timeout_s
    while set(seen) != request_ids and time.monotonic() < deadline:
        for output in client.step():
            if output.request_id in request_ids:
                seen[output.request_id] = output
    return seen


def _engine_outputs(core, request_ids: set[str], timeout_s: float = 20.0
                    ) -> dict[str, EngineCoreOutput]:
    """What our engine sent for these ids, read straight off the output socket (bounded): for
    requests sent past the client, which therefore does not route their outputs."""
    sock = _sync_view(core.output_socket)
    seen: dict[str, EngineCoreOutput] = {}
    deadline = time.monotonic() + timeout_s
    while set(seen) != request_ids and time.monotonic() < deadline:
        if sock.poll(100):
            decoded = core._decode_output(sock.recv_multipart())
            assert decoded is not None
            seen.update((o.request_id, o) for o in decoded[1].outputs
                        if o.request_id in request_ids)
    return seen


# ---- engine-core input ------------------------------------------------------------------------
def test_engine_survives_input_fuzz(text_model, expected_tokens):
    llm = LLM(text_model, dtype="float32", engine_process=True)
    try:
        assert _generate(llm) == expected_tokens
        core = llm.engine.client
        identity = core.engine_identity()
        for frames in _fuzz_inputs():
            core.input_socket.send_multipart([identity, *frames])
        core.input_socket.send_multipart(
            [identity, KIND_ADD, _invalid_request("bad-temp", temperature=-1.0)])
        core.input_socket.send_multipart(  # decodes, but add_request refuses it
            [identity, KIND_ADD, msgspec.msgpack.encode(
                {"request_id": "bad-vocab", "prompt_token_ids": [10**6],
                 "sampling_params": {"max_tokens": 4}})])
        core.input_socket.send_multipart(  # no recoverable id: only logged
            [identity, KIND_ADD, msgspec.msgpack.encode({"sampling_params": {"n": -1}})])

        errors = _engine_outputs(core, {"bad-temp", "bad-vocab"})
        assert set(errors) == {"bad-temp", "bad-vocab"}
        for output in errors.values():
            assert output.finish_reason == "error" and output.new_token_ids == []
        assert "temperature" in errors["bad-temp"].error
        assert "prompt token ids" in errors["bad-vocab"].error
        assert core.is_alive() and core.engines[0].process.is_alive()
        assert _generate(llm) == expected_tokens
    finally:
        _shutdown_and_check(llm)


def test_duplicate_request_id_does_not_end_the_live_request(text_model):
    llm = LLM(text_model, dtype="float32", engine_process=True)
    try:
        client, core = llm.engine, llm.engine.client
        params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
        client.add_request(EngineCoreRequest("live", [1, 5, 9], params))
        core.input_socket.send_multipart([core.engine_identity(), KIND_ADD,
                                          _invalid_request("live", temperature=-1.0)])
        core.input_socket.send_multipart([core.engine_identity(), KIND_ADD,
                                          msgspec.msgpack.encode(EngineCoreRequest(
                                              "live", [1, 2], params))])
        tokens, finish = [], None
        deadline = time.monotonic() + 60
        while finish is None and time.monotonic() < deadline:
            for output in client.step():
                assert output.request_id == "live"
                tokens += output.new_token_ids
                finish = output.finish_reason
        assert finish == "length" and len(tokens) == 60
    finally:
        _shutdown_and_check(llm)


def test_owner_and_priority_cross_the_wire(text_model):
    sent = EngineCoreRequest("r", [1, 2], SamplingParams(), owner_id="cmpl-1",
                             priority=-(1 << 63))
    got = msgspec.msgpack.Decoder(EngineCoreRequest).decode(msgspec.msgpack.encode(sent))
    assert (got.owner_id, got.priority) == ("cmpl-1", -(1 << 63))
    llm = LLM(text_model, dtype="float32", engine_process=True)  # scheduling_policy fcfs
    try:
        client = llm.engine
        params = SamplingParams(temperature=0.0, max_tokens=2)
        client.add_request(EngineCoreRequest("p", [1, 5, 9], params, owner_id="o", priority=2))
        errors = _error_outputs(client, {"p"})
        assert errors["p"].finish_reason == "error"
        assert errors["p"].error.startswith("priority 2 needs priority scheduling")
    finally:
        _shutdown_and_check(llm)


def test_rogue_reader_on_the_input_socket_gets_nothing(text_model, zmq_ctx):
    llm = LLM(text_model, dtype="float32", engine_process=True)
    try:
        core = llm.engine.client
        assert stat.S_IMODE(os.stat(core.launcher.ipc_dir).st_mode) == 0o700
        rogues = []
        for identity in (None, b"rogue-reader"):
            rogue = zmq_ctx.socket(zmq.DEALER)
            if identity is not None:
                rogue.setsockopt(zmq.ROUTING_ID, identity)
            # attached before any request goes out
            assert connect_and_handshake(rogue, core.input_address)
            rogues.append(rogue)
        for _ in range(3):
            _generate(llm)
        assert all(rogue.poll(500) == 0 for rogue in rogues)
    finally:
        _shutdown_and_check(llm)


# ---- front-end output -------------------------------------------------------------------------
def _drain_bad_frames(core, count: int, timeout_s: float = 10.0) -> None:
    """Read the output socket until `count` bad frames were dropped (bounded)."""
    sock = _sync_view(core.output_socket)
    deadline = time.monotonic() + timeout_s
    while core.bad_frames.count < count and time.monotonic() < deadline:
        if sock.poll(100):
            assert core._decode_output(sock.recv_multipart()) is None


def test_frontend_drops_rogue_and_garbage_outputs(text_model, expected_tokens, zmq_ctx):
    llm = LLM(text_model, dtype="float32", engine_process=True)
    try:
        core = llm.engine.client
        rng = random.Random(1)
        rogue = zmq_ctx.socket(zmq.DEALER)
        rogue.connect(core.output_address)
        rogue.send(rng.randbytes(48))
        rogue.send(msgspec.msgpack.encode(EngineCoreOutputs(error="injected death")))
        _drain_bad_frames(core, 2)
        assert core.bad_frames.count == 2
        assert core.is_alive()
        assert _generate(llm) == expected_tokens

        # garbage that claims our engine's identity: the decode path drops it, never raises
        identity = core.engine_identity()
        for frames in ([identity, rng.randbytes(48)], [identity, b""], [identity],
                       [identity, b"\x80", b"x"], [identity, msgspec.msgpack.encode([1, 2])]):
            assert core._decode_output(frames) is None
        assert core.is_alive()
        assert _generate(llm) == expected_tokens
    finally:
        _shutdown_and_check(llm)


def test_async_pump_survives_garbage(text_model, expected_tokens, zmq_ctx):
    async def run() -> None:
        llm = await AsyncLLM.create(EngineArgs(model=text_model, dtype="float32"),
                                    startup_timeout_s=120)
        pid = llm.client.engine_states()[0].pid
        try:
            rogue = zmq_ctx.socket(zmq.DEALER)
            rogue.connect(llm.client.output_address)
            rogue.send(random.Random(2).randbytes(48))
            rogue.send(msgspec.msgpack.encode(EngineCoreOutputs(error="injected death")))
            deadline = time.monotonic() + 10
            while llm.client.bad_frames.count < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert llm.client.bad_frames.count == 2
            assert llm.client._decode_output([llm.client.engine_identity(), b"\xc1"]) is None
            assert llm.is_running
            final = None
            async for output in llm.generate(PROMPT, GREEDY, "after-garbage"):
                final = output
            assert final.outputs[0].token_ids == expected_tokens
            assert llm.is_running
        finally:
            llm.shutdown()
        assert _gone(pid)

    asyncio.run(asyncio.wait_for(run(), 180))


def test_warning_limiter_caps_the_log(caplog):
    import logging

    limiter = WarningLimiter(logging.getLogger("test-wire-limiter"), first=3, every=100)
    with caplog.at_level(logging.WARNING, logger="test-wire-limiter"):
        for _ in range(1000):
            limiter.warning("bad frame")
    assert limiter.count == 1000
    assert len(caplog.records) == 3 + 10


# ---- tcp ---------------------------------------------------------------------------------------
def test_tcp_without_keys_refuses_to_start(text_model):
    with pytest.raises(ValueError, match="pp-engine keys"):
        LLM(text_model, dtype="float32", engine_process=True, engine_transport="tcp")


def _make_keys(directory: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine_core", "keys", directory, *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_keys_cli(tmp_path):
    keys = str(tmp_path / "keys")
    assert _make_keys(keys).returncode == 0
    for name in ("server", "client"):
        assert stat.S_IMODE(os.stat(f"{keys}/{name}.key_secret").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o700
    before = Path(keys, "server.key_secret").read_text()
    again = _make_keys(keys)
    assert again.returncode == 2 and "--force" in again.stderr
    assert Path(keys, "server.key_secret").read_text() == before
    assert _make_keys(keys, "--force").returncode == 0
    assert Path(keys, "server.key_secret").read_text() != before


def test_tcp_with_curve(text_model, expected_tokens, tmp_path, zmq_ctx):
    keys = str(tmp_path / "keys")
    assert _make_keys(keys).returncode == 0
    llm = LLM(text_model, dtype="float32", engine_process=True, engine_transport="tcp",
              zmq_keys=keys)
    try:
        core = llm.engine.client
        assert core.output_address.startswith("tcp://127.0.0.1:")
        assert core.output_socket.curve_server and core.input_socket.curve_server
        assert _generate(llm) == expected_tokens

        stranger_dir = str(tmp_path / "stranger")
        os.makedirs(stranger_dir)
        public, secret = zmq.auth.load_certificate(
            zmq.auth.create_certificates(stranger_dir, "client")[1])
        server_public, _ = zmq.auth.load_certificate(f"{keys}/server.key")
        stranger = zmq_ctx.socket(zmq.DEALER)  # a CURVE client whose key is not in DIR
        stranger.curve_secretkey, stranger.curve_publickey = secret, public
        stranger.curve_serverkey = server_public
        plain = zmq_ctx.socket(zmq.DEALER)  # no CURVE at all
        for rogue in (stranger, plain):
            rogue.setsockopt(zmq.LINGER, 0)
            rogue.connect(core.output_address)
            rogue.send(msgspec.msgpack.encode(EngineCoreOutputs(error="injected death")))
        assert _sync_view(core.output_socket).poll(1500) == 0  # nothing got through
        assert core.bad_frames.count == 0
        for address in (core.input_address, core.output_address):
            reader = zmq_ctx.socket(zmq.DEALER)
            reader.setsockopt(zmq.LINGER, 0)
            reader.connect(address)
        assert _generate(llm) == expected_tokens and core.is_alive()
    finally:
        _shutdown_and_check(llm)
    assert not any(isinstance(t, AuthenticationThread) for t in threading.enumerate())


def test_tcp_keys_must_exist(text_model, tmp_path):
    with pytest.raises(ValueError, match="pp-engine keys"):
        LLM(text_model, dtype="float32", engine_process=True, engine_transport="tcp",
            zmq_keys=str(tmp_path / "missing"))


def test_serve_over_tcp_needs_keys_and_works_with_them(text_model, tmp_path):
    import httpx

    from tests.servers import ServerProcess

    base = [sys.executable, "-m", "engine_core", "serve", text_model, "--port", "0",
            "--dtype", "float32", "--engine-transport", "tcp"]
    refused = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "pp-engine keys" in refused.stderr
    assert "--insecure-tcp" in refused.stderr

    keys = str(tmp_path / "keys")
    assert _make_keys(keys).returncode == 0
    server = ServerProcess(text_model, str(tmp_path / "server.log"), "--engine-transport", "tcp",
                           "--zmq-keys", keys)
    try:
        engine_pid = server.engine_pid()
        body = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}).json()
        assert body["choices"][0]["finish_reason"] == "length"
    finally:
        server.stop()
    assert _gone(engine_pid)
