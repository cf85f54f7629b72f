"""Engine flags on the command line (vLLM's names), shared by `pp-engine generate` and
`pp-engine serve`: `add_engine_args` declares them, `engine_kwargs` turns parsed ones into
`EngineArgs` keyword arguments."""

from __future__ import annotations

import argparse
from typing import Any

from engine_core.config import DataParallelConfig

__all__ = ["add_data_parallel_args", "add_engine_args", "data_parallel_config", "engine_kwargs"]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine options, named as vLLM's flags."""
    g = parser.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV blocks per stage (overrides --kv-cache-memory)")
    g.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache bytes per stage")
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false", help="turn prefix caching off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    g.add_argument("--pp-layer-partition", default=None,
                   help="layers per stage, e.g. '3,2' (default: balanced by cost, the LM "
                        "head counted on the last stage)")
    g.add_argument("--max-concurrent-batches", type=int, default=None,
                   help="microbatches in flight (default: the pipeline size)")
    g.add_argument("--threads-per-stage", type=int, default=None)
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
    g.add_argument("--no-fair-share", dest="fair_share", action="store_false",
                   help="admit sequences in policy order alone, so one request with many "
                        "prompts or a large n may hold every slot while others wait")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = ["dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
             "num_kv_blocks", "kv_cache_memory", "enable_prefix_caching", "seed", "device",
             "pipeline_parallel_size", "pp_layer_partition", "max_concurrent_batches",
             "threads_per_stage", "distributed_executor_backend", "ray_compiled_graph",
             "pipelined_chunked_prefill", "scheduling_policy", "fair_share"]
    return {name: getattr(args, name) for name in names}


def add_data_parallel_args(parser: argparse.ArgumentParser) -> None:
    """Data-parallel options of `pp-engine serve` (vLLM's names)."""
    g = parser.add_argument_group("data parallel")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="engine cores in all, each a full engine (default: %(default)s)")
    g.add_argument("--data-parallel-size-local", "-dpl", type=int, default=None,
                   help="engine cores on this host (default: all; 0 on a head that only "
                        "serves the API)")
    g.add_argument("--data-parallel-start-rank", "-dpr", type=int, default=0,
                   help="first rank of this host's engines (--headless; the head's are 0..)")
    g.add_argument("--data-parallel-address", default="127.0.0.1",
                   help="the head's address: it binds there, headless engines connect there "
                        "(default: %(default)s)")
    g.add_argument("--data-parallel-rpc-port", type=int, default=None,
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
