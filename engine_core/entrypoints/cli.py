"""The `pp-engine` command line."""

from __future__ import annotations

import argparse
import re
import sys

from engine_core.entrypoints.arg_utils import (
    PORT,
    SEED,
    add_data_parallel_args,
    add_engine_args,
    add_frontend_args,
    engine_kwargs,
    finite_float,
    int_in,
)
from engine_core.sampling_params import SamplingParams

_SECONDS = finite_float(0.0, low_open=True)


def _generate(args: argparse.Namespace) -> int:
    from engine_core.entrypoints.llm import LLM

    if len(args.words) == 1:
        model, prompt = None, args.words[0]
    elif len(args.words) == 2:
        model, prompt = args.words
    else:
        raise ValueError("usage: pp-engine generate [MODEL] PROMPT")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.sampling_seed)
    llm = LLM(model, **engine_kwargs(args))
    try:
        output = llm.generate(prompt, params, use_tqdm=False)[0]
    finally:
        llm.shutdown()
    completion = output.outputs[0]
    text = completion.text if llm.tokenizer is not None else str(completion.token_ids)
    print(f"{output.prompt or ''}{text}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from engine_core.entrypoints.openai.api_server import run_server

    return run_server(args)


def _proxy(args: argparse.Namespace) -> int:
    from engine_core.entrypoints.proxy.server import run_proxy

    return run_proxy(args)


def _keys(args: argparse.Namespace) -> int:
    from engine_core.transport import create_keys

    try:
        paths = create_keys(args.directory, force=args.force)
    except FileExistsError as exc:
        raise ValueError(str(exc)) from None
    except OSError as exc:
        raise ValueError(f"DIR {args.directory!r}: cannot write the keys there: "
                         f"{exc.strerror or exc}") from None
    for path in paths:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pp-engine",
        description="pp-engine: a pipeline-parallel LLM inference engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate one completion and print it",
                         description="Generate one completion. MODEL is an HF model directory "
                                     "(default: the shipped model).")
    gen.add_argument("words", nargs="+", metavar="[MODEL] PROMPT")
    gen.add_argument("--max-tokens", type=int_in(1), default=64)
    gen.add_argument("--temperature", type=finite_float(0.0), default=0.0)
    gen.add_argument("--top-p", type=finite_float(0.0, 1.0, low_open=True), default=1.0)
    gen.add_argument("--top-k", type=int_in(-1), default=0, help="-1 or 0: off")
    gen.add_argument("--sampling-seed", type=SEED, default=None)
    add_engine_args(gen)
    gen.set_defaults(subparser=gen, func=_generate)

    srv = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API",
                         description="Serve MODEL (an HF model directory; default: the shipped "
                                     "model) over an OpenAI-compatible API: /v1/completions, "
                                     "/v1/chat/completions, /v1/models, /health, /metrics.")
    srv.add_argument("model", nargs="?", default=None, metavar="MODEL",
                     help="HF model directory (default: the shipped model)")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: %(default)s)")
    srv.add_argument("--port", type=PORT, default=8000, help="port (default: %(default)s)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every /v1 route")
    srv.add_argument("--served-model-name", default=None,
                     help="the model name clients use (default: MODEL as given)")
    srv.add_argument("--uvicorn-log-level", default="info",
                     choices=["critical", "error", "warning", "info", "debug", "trace"],
                     help="log level of the server and uvicorn (default: %(default)s)")
    srv.add_argument("--disable-uvicorn-access-log", action="store_true",
                     help="no log line per HTTP request")
    srv.add_argument("--engine-transport", choices=["ipc", "tcp"], default="ipc",
                     help="how the server talks to its engine-core process: ipc (a private "
                          "0700 directory; default) or tcp (needs --zmq-keys or --insecure-tcp)")
    srv.add_argument("--zmq-keys", default=None, metavar="DIR",
                     help="CurveZMQ key directory made by `pp-engine keys DIR`: authenticate "
                          "and encrypt every tcp socket between server and engine core")
    srv.add_argument("--insecure-tcp", action="store_true",
                     help="allow --engine-transport tcp, or KV transfer on an address other "
                          "than loopback, without --zmq-keys (anyone who can reach the port "
                          "can read prompts and inject outputs)")
    srv.add_argument("--max-request-bytes", type=int_in(1), default=4 << 20,
                     help="largest request body accepted; a larger one gets HTTP 413 without "
                          "being read into memory (default: %(default)s, 4 MiB)")
    srv.add_argument("--protect-metrics", action="store_true",
                     help="with --api-key, /metrics needs the key too (/health and /version "
                          "stay open)")
    srv.add_argument("--restart-engine", action="store_true",
                     help="when the engine-core process dies, fail the requests in flight and "
                          "start a fresh engine core (default: the server exits with code 1)")
    srv.add_argument("--kv-transfer-config", default=None, metavar="JSON",
                     help="make this a prefill/decode instance for `pp-engine proxy`, e.g. "
                          "'{\"kv_role\": \"kv_producer\", \"kv_port\": 21001, "
                          "\"proxy_address\": \"127.0.0.1:30001\", \"send_type\": \"PUT\"}'")
    add_frontend_args(srv)
    srv.add_argument("--enable-auto-tool-choice", action="store_true",
                     help="serve tool_choice \"auto\" (the default when a chat request has "
                          "tools): the model's output is read for tool calls by "
                          "--tool-call-parser")
    srv.add_argument("--tool-call-parser", default=None, metavar="NAME",
                     help="the format of the model's tool calls, for --enable-auto-tool-choice: "
                          "hermes (<tool_call>{...}</tool_call>: Hermes, Qwen) or llama3_json "
                          "(Llama 3.1/3.2 JSON calls)")
    srv.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                     help="with tool_choice \"none\", do not give the tools to the chat "
                          "template (by default it still gets them)")
    add_engine_args(srv)
    add_data_parallel_args(srv)
    srv.set_defaults(subparser=srv, func=_serve)

    prx = sub.add_parser("proxy", help="the OpenAI-compatible front door of disaggregated "
                                       "prefill/decode",
                         description="Route each OpenAI request to a prefill instance, then to a "
                                     "decode instance that receives its KV cache. Instances "
                                     "(`pp-engine serve --kv-transfer-config ...`) register at "
                                     "the discovery socket.")
    prx.add_argument("--host", default="127.0.0.1",
                     help="address to listen on for HTTP (default: %(default)s)")
    prx.add_argument("--port", type=PORT, default=8000, help="HTTP port (default: %(default)s)")
    prx.add_argument("--discovery-host", default="127.0.0.1",
                     help="address of the discovery socket instances register at "
                          "(default: %(default)s)")
    prx.add_argument("--discovery-port", type=PORT, default=30001,
                     help="port of the discovery socket (default: %(default)s)")
    prx.add_argument("--zmq-keys", default=None, metavar="DIR",
                     help="CurveZMQ key directory made by `pp-engine keys DIR`: authenticate and "
                          "encrypt discovery and the requests sent to instances")
    prx.add_argument("--insecure-tcp", action="store_true",
                     help="run without --zmq-keys on a --discovery-host other than loopback, "
                          "and admit instances on other hosts (anyone who can reach the "
                          "sockets can register or read prompts); loopback needs neither")
    prx.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every /v1 route")
    prx.add_argument("--max-request-bytes", type=int_in(1), default=4 << 20,
                     help="largest request body accepted; a larger one gets HTTP 413 "
                          "(default: %(default)s, 4 MiB)")
    prx.add_argument("--request-timeout-s", type=_SECONDS, default=600.0,
                     help="longest wait for each message from an instance (default: "
                          "%(default)s)")
    prx.add_argument("--heartbeat-timeout-s", type=_SECONDS, default=3.0,
                     help="an instance silent this long (instances beat every second) is "
                          "dropped and its requests fail (default: %(default)s)")
    prx.add_argument("--uvicorn-log-level", default="info",
                     choices=["critical", "error", "warning", "info", "debug", "trace"],
                     help="log level of the proxy and uvicorn (default: %(default)s)")
    prx.set_defaults(subparser=prx, func=_proxy)

    keys = sub.add_parser("keys", help="write CurveZMQ key pairs for tcp between server and "
                                       "engine core",
                          description="Write a 'server' key pair (for the front-end, which "
                                      "binds) and a 'client' pair (for engine cores) into DIR, "
                                      "secret files mode 0600; existing keys are kept unless "
                                      "--force. Then run `pp-engine serve --engine-transport tcp "
                                      "--zmq-keys DIR`.")
    keys.add_argument("directory", metavar="DIR", help="where to write the keys (made 0700)")
    keys.add_argument("--force", action="store_true", help="replace existing keys")
    keys.set_defaults(subparser=keys, func=_keys)
    return parser


_LEADING_NAME = re.compile(r"^([a-z][a-z0-9_]*)\b")


def _flags_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the flag that sets it (its long spelling), for each option of `parser`."""
    return {action.dest: max(action.option_strings, key=len)
            for action in parser._actions if action.option_strings}


def _error_line(message: str, flags: dict[str, str]) -> str:
    """A startup error as one line, naming the flag when the message starts with the name of
    the setting it is about ("max_model_len=2000 exceeds ..." -> "argument --max-model-len:
    ...")."""
    line = " ".join(message.split())
    match = _LEADING_NAME.match(line)
    name = match.group(1) if match else None
    for dest in (name, f"data_parallel_{name}", name and name.removeprefix("data_parallel_")):
        if dest in flags and not line.startswith(flags[dest]):
            return f"argument {flags[dest]}: {line}"
    return line


def main(argv: list[str] | None = None) -> int:
    """Run a `pp-engine` command. Bad flags and startup errors (a bad value, values that
    conflict, a model directory or port that cannot be used) end in one line naming the flag
    and exit code 2, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        flags = _flags_of(args.subparser)
        print(f"pp-engine {args.command}: error: {_error_line(str(exc), flags)}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
