"""Every `pp-engine` flag: a bad value (out of range, not finite, not a number) or values that
conflict end in one line naming the flag and exit code 2, never a traceback (issue 18).

Most cases call `main` in-process: each fails before anything starts (no server, no engine
process). One case runs the real command line to check the exit code and that stderr holds
no traceback.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from engine_core.entrypoints import cli
from engine_core.entrypoints.arg_utils import finite_float, int_in
from tests.servers import REPO

BAD_NUMBERS = ["nan", "inf", "-inf", "1e400", "-1e400", "abc", "", "0x10", "1" * 5000]
BAD_INTS = [*BAD_NUMBERS, "99999999999999999999999", "-99999999999999999999", "1.5", "1e3"]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `pp-engine ARGV` in this process."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _numeric_options() -> list[tuple[str, str, argparse.Action]]:
    return [(name, max(a.option_strings, key=len), a)
            for name, sub in _subparsers().items() for a in sub._actions
            if a.option_strings and a.type is not None]


def _takes_floats(action: argparse.Action) -> bool:
    try:
        action.type("0.5")
    except argparse.ArgumentTypeError:
        return False
    return True


def test_every_numeric_flag_has_a_checked_type():
    """A plain `type=int`/`float` lets 99999 ports, inf timeouts and ints beyond 64 bits
    through to a traceback later; every numeric flag must use a checked type."""
    unchecked = [(cmd, flag) for cmd, flag, action in _numeric_options()
                 if action.type in (int, float)]
    assert not unchecked, unchecked
    assert len(_numeric_options()) >= 25  # generate, serve and proxy's numeric flags


@pytest.mark.parametrize("command, flag, action", _numeric_options(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_bad_numbers_are_refused_naming_the_flag(command, flag, action, capsys):
    parser = _subparsers()[command]
    for text in BAD_NUMBERS if _takes_floats(action) else BAD_INTS:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([*(["x"] if command == "generate" else []), f"{flag}={text}"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert f"error: argument {flag}" in last and "Traceback" not in err, (text, err)
        assert len(last) < 200, last


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "99999"], "argument --port: must be a port in [0, 65535], got 99999"),
    (["serve", "--port", "-1"], "argument --port"),
    (["proxy", "--port", "65536"], "argument --port"),
    (["proxy", "--discovery-port", "70000"], "argument --discovery-port"),
    (["serve", "--data-parallel-rpc-port", "0"], "argument --data-parallel-rpc-port"),
    (["proxy", "--request-timeout-s", "inf"], "argument --request-timeout-s: must be a finite"),
    (["proxy", "--heartbeat-timeout-s", "0"], "argument --heartbeat-timeout-s: must be > 0"),
    (["proxy", "--heartbeat-timeout-s", "-0.0"], "argument --heartbeat-timeout-s"),
    (["serve", "--max-num-seqs", "0"], "argument --max-num-seqs: must be an integer >= 1"),
    (["serve", "--max-num-seqs", str(2**63)], "argument --max-num-seqs: must be an integer at "
                                             "most 2**63 - 1"),
    (["serve", "--seed", str(2**64)], "argument --seed: must be a 64-bit seed"),
    (["serve", "--num-kv-blocks", "1"], "argument --num-kv-blocks"),
    (["serve", "--max-concurrent-batches", "0"], "argument --max-concurrent-batches"),
    (["serve", "--threads-per-stage", "100000"], "argument --threads-per-stage"),
    (["serve", "-dp", "0"], "argument --data-parallel-size"),
    (["serve", "-dpl", "-1"], "argument --data-parallel-size-local"),
    (["serve", "--max-request-bytes", "0"], "argument --max-request-bytes"),
    (["serve", "--dtype", "float64"], "argument --dtype: invalid choice"),
    (["serve", "--gpu-memory-utilization", "0"], "argument --gpu-memory-utilization: must be in "
                                                 "(0, 1]"),
    (["serve", "--gpu-memory-utilization", "1.01"], "argument --gpu-memory-utilization"),
    (["serve", "--cudagraph-capture-sizes", "8", "0"], "argument --cudagraph-capture-sizes"),
    (["serve", "--attention-backend", "flash"], "argument --attention-backend: invalid choice"),
    (["generate", "x", "--temperature", "nan"], "argument --temperature"),
    (["generate", "x", "--top-p", "0"], "argument --top-p: must be in (0.0, 1.0]"),
    (["generate", "x", "--top-k", "-2"], "argument --top-k"),
    (["generate", "x", "--sampling-seed", str(-2**63 - 1)], "argument --sampling-seed"),
])
def test_out_of_range_values_exit_2_naming_the_flag(argv, message, capsys):
    code, err = _run(argv, capsys)
    assert code == 2 and message in err, err


@pytest.mark.parametrize("argv, message", [
    # individually fine, but not for this model / these other flags
    (["serve", "--max-model-len", "999999"], "argument --max-model-len: max_model_len=999999 "
                                            "exceeds the model's limit"),
    (["serve", "-pp", "99"], "argument --pipeline-parallel-size: pipeline_parallel_size=99 "
                             "exceeds the model's"),
    (["serve", "-pp", "2", "--pp-layer-partition", "1,1"], "argument --pp-layer-partition"),
    (["serve", "--pp-layer-partition", "a,b"], "argument --pp-layer-partition"),
    (["serve", "--device", "bogus"], "argument --device: device must be a torch device"),
    (["serve", "--device", "cuda:99"], "argument --device"),
    (["serve", "--ray-compiled-graph", "--distributed-executor-backend", "inprocess"],
     "ray_compiled_graph"),
    (["serve", "/nonexistent/model"], "does not exist"),
    (["serve", "--api-key", ""], "--api-key must not be empty"),
    (["proxy", "--api-key", " "], "--api-key must not be empty"),
    (["serve", "-dp", "2", "-dpl", "3"], "--data-parallel-size-local (-dpl)"),
    (["serve", "--protect-metrics"], "--protect-metrics needs --api-key"),
    (["serve", "--kv-transfer-config", '{"kv_role": "kv_producer", "kv_port": 99999, '
                                       '"proxy_address": "127.0.0.1:1"}'], "kv_port"),
    (["serve", "--kv-transfer-config", "{"], "--kv-transfer-config is not valid JSON"),
    (["serve", "--engine-transport", "tcp"], "--zmq-keys"),
    (["serve", "--enable-auto-tool-choice"], "argument --enable-auto-tool-choice: "
                                             "enable_auto_tool_choice needs a tool_call_parser"),
    (["serve", "--tool-call-parser", "nope"], "argument --tool-call-parser: tool_call_parser "
                                              "must be one of hermes, llama3_json"),
    (["generate", "a", "b", "c"], "usage: pp-engine generate"),
    (["keys", "/proc/no/such/dir"], "DIR '/proc/no/such/dir': cannot write the keys"),
])
def test_conflicting_values_end_in_one_line_naming_the_flag(argv, message, capsys):
    code, err = _run(argv, capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_triton_backend_on_a_cpu_names_the_flag(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, err = _run(["serve", "--attention-backend", "triton"], capsys)
    assert code == 2 and "argument --attention-backend: attention_backend='triton' runs on CUDA" \
        in err, err


def test_the_command_line_exits_2_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "engine_core", "serve", "--port",
                             "99999"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "error: argument --port: must be a port in [0, 65535]" in result.stderr


def test_error_line_names_the_flag_of_a_leading_setting():
    flags = {"max_model_len": "--max-model-len", "data_parallel_size": "--data-parallel-size"}
    assert cli._error_line("max_model_len=5 exceeds\nx", flags) == (
        "argument --max-model-len: max_model_len=5 exceeds x")
    assert cli._error_line("data_parallel_size must be", flags).startswith(
        "argument --data-parallel-size:")
    assert cli._error_line("the KV cache holds", flags) == "the KV cache holds"


def test_checked_types_accept_their_bounds():
    port = int_in(0, 65535)
    assert port("0") == 0 and port("65535") == 65535
    seconds = finite_float(0.0, low_open=True)
    assert seconds("5e-324") == 5e-324 and seconds("1e308") == 1e308
    for bad in ("0", "-0.0", "nan", "1e309"):
        with pytest.raises(argparse.ArgumentTypeError):
            seconds(bad)
