"""Engine flags on the command line (vLLM's names), shared by `pp-engine generate` and
`pp-engine serve`: `add_engine_args` declares them, `engine_kwargs` turns parsed ones into
`EngineArgs` keyword arguments."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

from engine_core.config import MAX_THREADS_PER_STAGE, DataParallelConfig
from engine_core.sampling_params import MAX_LOGPROBS
from engine_core.speculative_config import SpeculativeConfig

__all__ = ["INT_MAX", "SEED_MAX", "SEED_MIN", "add_data_parallel_args", "add_engine_args",
           "add_frontend_args", "data_parallel_config", "engine_kwargs",
           "finite_float", "int_in", "json_strings"]

# Engine arguments cross to the engine-core process as msgpack: every int must fit an int64.
INT_MAX = (1 << 63) - 1
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.manual_seed takes


def int_in(low: int, high: int = INT_MAX, what: str = "", bounds: str = ""
           ) -> Callable[[str], int]:
    """An argparse `type`: an int in [low, high], else argparse's "argument --flag: ..." error
    (exit code 2). `bounds` spells the range in that message (default: the numbers)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {_shown(text)}") from None
        if not low <= value <= high:
            if bounds:
                bound = bounds
            elif high == INT_MAX:
                bound = f">= {low}" if value < low else "at most 2**63 - 1"
            else:
                bound = f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {what or 'an integer'} {bound}, "
                                             f"got {_shown(text, quote=False)}")
        return value

    return parse


def _shown(text: str, quote: bool = True) -> str:
    """`text` for an error message, cut to a readable length."""
    cut = text if len(text) <= 40 else text[:37] + "..."
    return repr(cut) if quote else cut


def finite_float(low: float, high: float = math.inf, *, low_open: bool = False
                 ) -> Callable[[str], float]:
    """An argparse `type`: a finite float in [low, high] (`low_open`: (low, high])."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {_shown(text)}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got "
                                             f"{_shown(text, quote=False)}")
        if value < low or (low_open and value == low) or value > high:
            left = "(" if low_open else "["
            bound = f"> {low}" if high == math.inf and low_open else (
                f">= {low}" if high == math.inf else f"in {left}{low}, {high}]")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {_shown(text, quote=False)}")
        return value

    return parse


def json_strings(text: str) -> tuple[str, ...]:
    """An argparse `type`: a JSON list of strings, e.g. '["http://a.example"]'."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise argparse.ArgumentTypeError(f"must be a JSON list of strings, e.g. '[\"*\"]', "
                                         f"got {_shown(text)}")
    return tuple(value)


PORT = int_in(0, 65535, "a port")  # 0: any free port
SEED = int_in(SEED_MIN, SEED_MAX, "a 64-bit seed", "in [-2**63, 2**64 - 1]")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine options, named as vLLM's flags."""
    g = parser.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int_in(1), default=None)
    g.add_argument("--max-num-seqs", type=int_in(1), default=256)
    g.add_argument("--max-num-batched-tokens", type=int_in(1), default=None)
    g.add_argument("--block-size", type=int_in(1), default=16)
    g.add_argument("--num-kv-blocks", type=int_in(2), default=None,
                   help="KV blocks per stage (overrides --kv-cache-memory)")
    g.add_argument("--kv-cache-memory", type=int_in(1), default=None,
                   help="KV cache bytes per stage")
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false", help="turn prefix caching off")
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument("--device", default="cpu")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int_in(1), default=1)
    g.add_argument("--pp-layer-partition", default=None,
                   help="layers per stage, e.g. '3,2' (default: balanced by cost, the LM "
                        "head counted on the last stage)")
    g.add_argument("--max-concurrent-batches", type=int_in(1), default=None,
                   help="microbatches in flight (default: the pipeline size)")
    g.add_argument("--threads-per-stage", type=int_in(1, MAX_THREADS_PER_STAGE), default=None)
    g.add_argument("--distributed-executor-backend", choices=["ray", "inprocess"], default=None,
                   help="where stages run (default: ray when --pipeline-parallel-size > 1)")
    g.add_argument("--ray-compiled-graph", action="store_true",
                   help="pass hidden states through a Ray Compiled Graph (many-core/GPU nodes)")
    g.add_argument("--no-pipelined-chunked-prefill", dest="pipelined_chunked_prefill",
                   action="store_false",
                   help="never keep two chunks of one prompt in flight at once")
    g.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs",
                   help="fcfs: by arrival; priority: by each request's `priority` (lower "
                        "first), then arrival (default: %(default)s)")
    g.add_argument("--attention-backend", choices=["auto", "torch", "triton"], default="auto",
                   help="paged attention kernels: triton (CUDA), torch (any device); auto: "
                        "triton on CUDA, else torch (default: %(default)s)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="run every step eagerly: no CUDA graphs for decode steps")
    g.add_argument("--cudagraph-capture-sizes", type=int_in(1), nargs="+", default=None,
                   help="decode batch sizes to capture as CUDA graphs (default: 1 2 4 8 16 "
                        "... up to --max-num-seqs, at most 512)")
    g.add_argument("--gpu-memory-utilization", type=finite_float(0, 1, low_open=True),
                   default=0.9,
                   help="share of the GPU's memory for the engine (weights, activations, KV "
                        "cache) when neither --num-kv-blocks nor --kv-cache-memory is given "
                        "(default: %(default)s)")
    g.add_argument("--speculative-config", type=_speculative_config, default=None,
                   help="speculative decoding, as JSON with vLLM's keys, e.g. "
                        "'{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
                        "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 1}' or "
                        "'{\"method\": \"draft_model\", \"model\": \"DIR\", "
                        "\"num_speculative_tokens\": 4}'")
    g.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="directory holding tokenizer.json (and tokenizer_config.json) "
                        "(default: MODEL's)")
    g.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                   help="default sampling parameters for requests that leave them out: auto "
                        "(the model's generation_config.json: temperature, top_p, top_k, "
                        "min_p, repetition_penalty, max_new_tokens), vllm (the engine's own) "
                        "or DIR/generation_config.json (default: %(default)s)")
    g.add_argument("--max-logprobs", type=int_in(0), default=MAX_LOGPROBS,
                   help="the most logprobs (top_logprobs) a request may ask for (default: "
                        "%(default)s)")
    g.add_argument("--no-fair-share", dest="fair_share", action="store_false",
                   help="admit sequences in policy order alone, so one request with many "
                        "prompts or a large n may hold every slot while others wait")


def _speculative_config(text: str) -> SpeculativeConfig | None:
    try:
        return SpeculativeConfig.from_value(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = ["dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
             "num_kv_blocks", "kv_cache_memory", "enable_prefix_caching", "seed", "device",
             "pipeline_parallel_size", "pp_layer_partition", "max_concurrent_batches",
             "threads_per_stage", "distributed_executor_backend", "ray_compiled_graph",
             "pipelined_chunked_prefill", "scheduling_policy", "fair_share",
             "attention_backend", "enforce_eager", "cudagraph_capture_sizes",
             "gpu_memory_utilization", "speculative_config", "tokenizer",
             "generation_config", "max_logprobs"]
    kwargs = {name: getattr(args, name) for name in names}
    if kwargs["cudagraph_capture_sizes"] is not None:  # a frozen config holds tuples
        kwargs["cudagraph_capture_sizes"] = tuple(kwargs["cudagraph_capture_sizes"])
    return kwargs


def add_frontend_args(parser: argparse.ArgumentParser) -> None:
    """HTTP front-end options of `pp-engine serve` (vLLM's names): chat template, request log,
    CORS, root path, TLS."""
    g = parser.add_argument_group("front-end")
    g.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                   help="render /v1/chat/completions with this Jinja template (a file, or the "
                        "template itself) instead of the model's")
    g.add_argument("--enable-log-requests", dest="enable_log_requests", action="store_const",
                   const=True, default=False,
                   help="log one line when each request starts (id, prompt tokens, sampling "
                        "params) and one when it ends (default: off, as vLLM)")
    g.add_argument("--disable-log-requests", dest="enable_log_requests", action="store_const",
                   const=False, help="no per-request log lines (the default)")
    g.add_argument("--allowed-origins", type=json_strings, default=("*",), metavar="JSON",
                   help="CORS: origins allowed, as a JSON list (default: [\"*\"])")
    g.add_argument("--allowed-methods", type=json_strings, default=("*",), metavar="JSON",
                   help="CORS: methods allowed, as a JSON list (default: [\"*\"])")
    g.add_argument("--allowed-headers", type=json_strings, default=("*",), metavar="JSON",
                   help="CORS: request headers allowed, as a JSON list (default: [\"*\"])")
    g.add_argument("--allow-credentials", action="store_true",
                   help="CORS: allow credentials (cookies, Authorization) cross-origin")
    g.add_argument("--root-path", default=None, metavar="PATH",
                   help="the path prefix a proxy serves this API under, e.g. /api (FastAPI's "
                        "root_path: docs and OpenAPI links carry it)")
    g.add_argument("--ssl-keyfile", default=None, metavar="FILE",
                   help="TLS: the private key of --ssl-certfile (if not in that file)")
    g.add_argument("--ssl-certfile", default=None, metavar="FILE",
                   help="TLS: serve https with this certificate (PEM)")
    g.add_argument("--ssl-ca-certs", default=None, metavar="FILE",
                   help="TLS: CA certificates to check client certificates against")
    g.add_argument("--ssl-cert-reqs", type=int_in(0, 2), default=None,
                   help="TLS: client certificates: 0 not asked for (default), 1 optional, "
                        "2 required (Python's ssl.CERT_*)")


def add_data_parallel_args(parser: argparse.ArgumentParser) -> None:
    """Data-parallel options of `pp-engine serve` (vLLM's names)."""
    g = parser.add_argument_group("data parallel")
    g.add_argument("--data-parallel-size", "-dp", type=int_in(1), default=1,
                   help="engine cores in all, each a full engine (default: %(default)s)")
    g.add_argument("--data-parallel-size-local", "-dpl", type=int_in(0), default=None,
                   help="engine cores on this host (default: all; 0 on a head that only "
                        "serves the API)")
    g.add_argument("--data-parallel-start-rank", "-dpr", type=int_in(0), default=0,
                   help="first rank of this host's engines (--headless; the head's are 0..)")
    g.add_argument("--data-parallel-address", default="127.0.0.1",
                   help="the head's address: it binds there, headless engines connect there "
                        "(default: %(default)s)")
    g.add_argument("--data-parallel-rpc-port", type=int_in(1, 65535, "a port"), default=None,
                   help="the head's handshake port (needed with remote engines)")
    g.add_argument("--dp-routing", choices=["load", "prefix"], default="load",
                   help="load: the least loaded engine; prefix: the engine holding the most "
                        "of the prompt's leading KV blocks, unless it is much busier "
                        "(default: %(default)s)")
    g.add_argument("--data-parallel-backend", choices=["mp", "ray"], default="mp",
                   help="mp: local engine processes; ray: Ray actors on the cluster of "
                        "RAY_ADDRESS (or a local Ray), over tcp on --data-parallel-address "
                        "(default: %(default)s)")
    g.add_argument("--headless", action="store_true",
                   help="start this host's engine cores only (no API server); they connect to "
                        "the head at --data-parallel-address:--data-parallel-rpc-port")


def data_parallel_config(args: argparse.Namespace) -> DataParallelConfig:
    """The parsed data-parallel flags; ValueError (naming the flag) if they do not fit."""
    return DataParallelConfig(size=args.data_parallel_size,
                              size_local=args.data_parallel_size_local,
                              start_rank=args.data_parallel_start_rank,
                              address=args.data_parallel_address,
                              rpc_port=args.data_parallel_rpc_port, routing=args.dp_routing,
                              backend=args.data_parallel_backend)
