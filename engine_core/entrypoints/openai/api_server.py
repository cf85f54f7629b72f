"""The OpenAI-compatible HTTP server: `build_app` (a FastAPI app over an `AsyncLLM`) and
`run_server` (`pp-engine serve`: the engine core in its own process, uvicorn on uvloop here).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (all behind
`--api-key` when one is set), GET /health, GET /version, GET /metrics. The /v1 routes are
served by `serving.OpenAIServing`.

Bodies are capped (`--max-request-bytes`, a 413) before they are read. If the engine core dies,
the requests in flight get errors and `pp-engine serve` exits with code 1 (or, with
`--restart-engine`, starts a fresh engine core).

vLLM's front-end flags: `--chat-template`, `--enable-log-requests`, CORS (`--allowed-origins`
...), `--root-path` (FastAPI's root_path) and TLS (`--ssl-certfile` ...), each checked before
the engine starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from engine_core.client.core_process import engine_version
from engine_core.config import EngineArgs
from engine_core.entrypoints.arg_utils import data_parallel_config, engine_kwargs
from engine_core.entrypoints.async_llm import AsyncLLM
from engine_core.entrypoints.chat_template import load_chat_template
from engine_core.entrypoints.http.errors import error_body
from engine_core.entrypoints.http.limits import DEFAULT_MAX_REQUEST_BYTES, RequestBodyLimit
from engine_core.entrypoints.http.setup import (
    CorsConfig,
    add_cors,
    add_error_handlers,
    check_tls_files,
)
from engine_core.entrypoints.http.setup import api_key_check as _api_key_check
from engine_core.entrypoints.http.setup import exit_on_sigterm as _exit_on_sigterm
from engine_core.entrypoints.http.setup import listen as _listen
from engine_core.entrypoints.openai.instance import DisaggInstance
from engine_core.entrypoints.openai.metrics import ServerMetrics
from engine_core.entrypoints.openai.serving import OpenAIServing
from engine_core.entrypoints.openai.tool_parsers import ToolCallingConfig
from engine_core.kv_transfer_config import KVTransferConfig
from engine_core.transport import require_keys_for_hosts, require_keys_for_tcp

if TYPE_CHECKING:
    import uvicorn


logger = logging.getLogger("engine_core.entrypoints.openai")


def build_app(llm: AsyncLLM, served_model_name: str, api_key: str | None = None, *,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              protect_metrics: bool = False, chat_template: str | None = None,
              log_requests: bool = False, cors: CorsConfig | None = None,
              root_path: str = "", tool_calling: ToolCallingConfig | None = None) -> FastAPI:
    """The OpenAI-compatible app over `llm` (which the caller owns and shuts down).

    With `api_key`, every /v1 route needs `Authorization: Bearer <api_key>`, and so does
    /metrics when `protect_metrics` is set; /health and /version stay open. A request body over
    `max_request_bytes` gets a 413 without being read into memory. `chat_template` and
    `log_requests`: see `OpenAIServing`; `cors`: cross-origin access (default: any origin);
    `root_path`: the prefix a proxy serves the app under (FastAPI's: routes answer with or
    without it, the docs link to it); `tool_calling`: how chat requests with tools are served
    (default: tool_choice "auto" refused)."""
    if protect_metrics and not api_key:
        raise ValueError("protect_metrics needs an api_key (--protect-metrics needs --api-key)")
    version = engine_version()
    metrics = ServerMetrics(llm, served_model_name)
    serving = OpenAIServing(llm, served_model_name, metrics, max_request_bytes,
                            chat_template=chat_template, log_requests=log_requests,
                            tool_calling=tool_calling)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            serving.close()

    app = FastAPI(title="pp-engine OpenAI-compatible server", version=version,
                  lifespan=lifespan, root_path=root_path)
    app.add_middleware(RequestBodyLimit, max_bytes=max_request_bytes)
    add_cors(app, cors if cors is not None else CorsConfig())
    app.state.serving = serving

    async def handle(work: Callable[[Request], Awaitable[Response]], request: Request
                     ) -> Response:
        try:
            return await work(request)
        except Exception as exc:
            return serving.error_response(exc)

    auth = [Depends(_api_key_check(api_key))] if api_key else []
    v1 = APIRouter(prefix="/v1", dependencies=auth)

    @v1.post("/completions")
    async def create_completion(request: Request) -> Response:
        return await handle(serving.completions, request)

    @v1.post("/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        return await handle(serving.chat_completions, request)

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return serving.models()

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        if llm.is_running:
            return Response(status_code=200)
        return JSONResponse(error_body("the engine is not running", "server_error",
                                       code="engine_dead"), status_code=503)

    @app.get("/version")
    async def show_version() -> dict[str, str]:
        return {"version": version}

    @app.get("/metrics", dependencies=auth if protect_metrics else [])
    async def show_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    add_error_handlers(app)

    return app


# ---- pp-engine serve --------------------------------------------------------------------------
def _kv_transfer_config(args: argparse.Namespace) -> KVTransferConfig | None:
    """`--kv-transfer-config`, parsed and given the key directory; ValueError naming the key at
    fault, or for disaggregation sockets (every one is tcp) that reach past this host with
    neither keys nor --insecure-tcp."""
    if getattr(args, "kv_transfer_config", None) is None:
        return None
    config = KVTransferConfig.from_json(args.kv_transfer_config)
    hosts = [config.kv_ip] + [a.rpartition(":")[0] for a in config.proxy_addresses]
    require_keys_for_hosts("the KV transfer and proxy sockets", hosts, args.zmq_keys,
                           args.insecure_tcp)
    return dataclasses.replace(config, zmq_keys=args.zmq_keys)


def _cors_config(args: argparse.Namespace) -> CorsConfig:
    return CorsConfig(allowed_origins=args.allowed_origins,
                      allowed_methods=args.allowed_methods,
                      allowed_headers=args.allowed_headers,
                      allow_credentials=args.allow_credentials)


def _root_path(value: str | None) -> str:
    """`--root-path` without its trailing slashes ("" for none); ValueError unless it is a
    path."""
    if not value:
        return ""
    if not value.startswith("/"):
        raise ValueError(f"--root-path must start with '/', got {value!r}")
    return value.rstrip("/")


def _check_frontend_args(args: argparse.Namespace) -> str | None:
    """Check the front-end flags before anything starts; the `--chat-template` to use."""
    _root_path(args.root_path)
    check_tls_files(args.ssl_keyfile, args.ssl_certfile, args.ssl_ca_certs, args.ssl_cert_reqs)
    if args.chat_template is None:
        return None
    return load_chat_template(args.chat_template)


def _tool_calling(args: argparse.Namespace) -> ToolCallingConfig:
    """The tool-calling flags; ValueError naming the setting of a bad one."""
    return ToolCallingConfig(
        enable_auto_tool_choice=getattr(args, "enable_auto_tool_choice", False),
        tool_call_parser=getattr(args, "tool_call_parser", None),
        exclude_tools_when_tool_choice_none=getattr(args, "exclude_tools_when_tool_choice_none",
                                                    False))


async def _serve(args: argparse.Namespace, engine_args: EngineArgs, model_name: str,
                 sock: socket.socket, chat_template: str | None) -> int:
    """Serve until told to stop (0) or until the engine core dies for good (1)."""
    import uvicorn

    llm = await AsyncLLM.create(engine_args, transport=args.engine_transport,
                                zmq_keys=args.zmq_keys, insecure_tcp=args.insecure_tcp,
                                data_parallel=data_parallel_config(args))
    supervisor: asyncio.Task[int] | None = None
    instance: DisaggInstance | None = None
    refused: list[str] = []
    try:
        app = build_app(llm, model_name, args.api_key, max_request_bytes=args.max_request_bytes,
                        protect_metrics=args.protect_metrics, chat_template=chat_template,
                        log_requests=args.enable_log_requests, cors=_cors_config(args),
                        root_path=_root_path(args.root_path), tool_calling=_tool_calling(args))
        config = uvicorn.Config(app, log_level=args.uvicorn_log_level, loop="uvloop",
                                access_log=not args.disable_uvicorn_access_log,
                                timeout_graceful_shutdown=5, ssl_keyfile=args.ssl_keyfile,
                                ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
                                ssl_cert_reqs=(ssl.CERT_NONE if args.ssl_cert_reqs is None
                                               else args.ssl_cert_reqs))
        server = uvicorn.Server(config)
        supervisor = asyncio.create_task(_supervise_engine(llm, server, args.restart_engine))
        if llm.config.kv_transfer is not None:  # a prefill/decode instance of a proxy

            def on_refused(message: str) -> None:
                refused.append(message)
                server.should_exit = True

            serving: OpenAIServing = app.state.serving
            instance = DisaggInstance.for_engine(serving.serve_proxied, llm, model_name,
                                                 on_refused)
            await instance.start()
        defaults = llm.input_processor.default_sampling
        if defaults:
            logger.info("default sampling params from %s: %s (--generation-config vllm for the "
                        "engine's own)", os.path.join(llm.config.generation_config,
                                                       "generation_config.json"), defaults)
        scheme = "https" if args.ssl_certfile else "http"
        logger.info("serving %s (max_model_len=%d) on %s://%s:%d", model_name,
                    llm.config.scheduler.max_model_len, scheme, args.host, args.port)
        await server.serve(sockets=[sock])
    finally:
        if instance is not None:
            await instance.close()
        if supervisor is not None and not supervisor.done():
            supervisor.cancel()
        llm.shutdown()
    if refused:
        return 1
    return supervisor.result() if supervisor.done() and not supervisor.cancelled() else 0


async def _supervise_engine(llm: AsyncLLM, server: uvicorn.Server, restart: bool) -> int:
    """Watch the engine core. When it dies, the requests in flight have already been failed by
    AsyncLLM; then either restart it (`restart`) and keep watching, or stop uvicorn and return
    the exit code 1, so an orchestrator sees the server die with its engine."""
    while True:
        error = await llm.wait_until_dead()
        if not restart:
            logger.error("the engine core died (%s); shutting the server down", error)
            server.should_exit = True
            return 1
        logger.error("the engine core died (%s); restarting it (restart #%d)", error,
                     llm.num_restarts + 1)
        try:
            await llm.restart()
        except Exception as exc:
            logger.error("could not restart the engine core (%s); shutting the server down",
                         exc)
            server.should_exit = True
            return 1
        logger.info("the engine core is running again (restarts so far: %d)",
                    llm.num_restarts)


def run_server(args: argparse.Namespace) -> int:
    """`pp-engine serve`: start the engine core, then serve until SIGINT/SIGTERM (exit code 0)
    or until the engine core dies without `--restart-engine` (exit code 1).
    ValueError (bad arguments, no model, port in use) before anything starts."""
    import uvloop

    from engine_core.models import default_model_dir

    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key must not be empty (omit it to serve without a key)")
    kv_transfer = _kv_transfer_config(args)
    _tool_calling(args)  # fail fast on bad tool-calling flags
    model = args.model if args.model is not None else default_model_dir()
    model_name = args.served_model_name or args.model or os.path.basename(
        os.path.normpath(model))
    engine_args = EngineArgs(model=model, kv_transfer_config=kv_transfer, **engine_kwargs(args))
    engine_args.resolve()  # fail fast on bad arguments
    dp = data_parallel_config(args)  # ValueError for flags that do not fit
    if kv_transfer is not None and (dp.size > 1 or args.headless):
        raise ValueError("--kv-transfer-config with data parallelism is not supported yet: run "
                         "one instance per engine behind `pp-engine proxy` instead")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("engine_core").addHandler(handler)
    logging.getLogger("engine_core").setLevel(args.uvicorn_log_level.upper()
                                              if args.uvicorn_log_level != "trace" else "DEBUG")
    if args.headless:
        from engine_core.client.headless import run_headless

        return run_headless(engine_args, dp, args.zmq_keys, args.insecure_tcp)
    if args.protect_metrics and not args.api_key:
        raise ValueError("--protect-metrics needs --api-key")
    if dp.has_remote or (dp.backend == "ray" and dp.size > 1):  # tcp between the engines
        require_keys_for_tcp("tcp", args.zmq_keys, args.insecure_tcp)
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    require_keys_for_tcp(args.engine_transport, args.zmq_keys, args.insecure_tcp)
    chat_template = _check_frontend_args(args)
    sock = _listen(args.host, args.port)
    # uvicorn re-raises a captured SIGTERM once it has shut down; exit through the `finally`
    # that stops the engine core instead of dying on the spot.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    exit_code = 0
    try:
        exit_code = uvloop.run(_serve(args, engine_args, model_name, sock, chat_template))
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return exit_code
