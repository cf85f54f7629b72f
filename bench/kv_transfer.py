"""KV transfer between a prefill and a decode engine in one process (issue 10), per send type.

For each send type: P prefills `--requests` prompts of `--prompt-len` tokens (max_tokens=1), D
receives their KV and decodes one token. Reports KV moved (MB), transfer MB/s and ms per 1,000
tokens (the connector's own timers: reading blocks, framing, sockets, writing blocks), and D's
time to first token against computing the same prompt on D itself.

    python bench/kv_transfer.py [--prompt-len 1024] [--requests 4] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Workload, standard_model_dir
from engine_core.config import EngineArgs
from engine_core.disagg.config import KVTransferConfig
from engine_core.disagg.connector import KVConnector
from engine_core.disagg.transfer_params import KVTransferParams
from engine_core.engine import EngineCore
from engine_core.messages import EngineCoreRequest
from engine_core.sampling_params import SamplingParams
from executors.inprocess import InProcessExecutor


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(model_dir: str, dtype: str, role: str | None, send_type: str) -> EngineCore:
    config = EngineArgs(model=model_dir, dtype=dtype, max_model_len=2048,
                        num_kv_blocks=1024).resolve()
    executor = InProcessExecutor(config)
    connector = None
    if role is not None:
        kv = KVTransferConfig(kv_role=role, kv_port=_port(), proxy_address="127.0.0.1:1",
                              send_type=send_type, kv_buffer_size=4e9)
        connector = KVConnector(config, kv, executor.kv_stages())
    return EngineCore(config, executor, kv_connector=connector)


def _run(engine: EngineCore, requests: list[EngineCoreRequest]) -> dict:
    for r in requests:
        engine.add_request(r)
    final, first_token_at = {}, {}
    while len(final) < len(requests):
        for out in engine.step():
            first_token_at.setdefault(out.request_id, time.perf_counter())
            if out.finish_reason is not None:
                final[out.request_id] = out
        if not engine.in_flight:
            time.sleep(0.0005)
    return {"final": final, "first": first_token_at}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    model_dir = standard_model_dir()
    prompts = Workload(args.requests, args.prompt_len, 1).prompts(32000)
    greedy = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    local = _engine(model_dir, args.dtype, None, "GET")
    start = time.perf_counter()
    _run(local, [EngineCoreRequest(f"l{i}", p, greedy) for i, p in enumerate(prompts)])
    local_s = time.perf_counter() - start
    local.shutdown()
    print(f"model {model_dir} dtype {args.dtype}: {args.requests} x {args.prompt_len} tokens; "
          f"D computing the prompts itself: {local_s * 1000:.0f} ms")

    for send_type in ("GET", "PUT", "PUT_ASYNC"):
        p = _engine(model_dir, args.dtype, "kv_producer", send_type)
        d = _engine(model_dir, args.dtype, "kv_consumer", send_type)
        try:
            reqs = []
            for i, prompt in enumerate(prompts):
                target = None if send_type == "GET" else KVTransferParams(
                    d.kv_connector.endpoint, [], 0, d.kv_connector.compat_hash, f"t{i}",
                    send_type)
                reqs.append(EngineCoreRequest(f"r{i}", prompt, greedy, do_remote_decode=True,
                                              kv_transfer_params=target))
            first = _run(p, reqs)["final"]
            time.sleep(0.2)  # let PUT_ASYNC finish pushing: measure the transfer, not the race
            start = time.perf_counter()
            _run(d, [EngineCoreRequest(rid, prompts[int(rid[1:])], greedy,
                                       kv_transfer_params=out.kv_transfer_params)
                     for rid, out in first.items()])
            d_s = time.perf_counter() - start
            stats = (p.kv_connector.stats, d.kv_connector.stats)
            tokens = stats[1].received_tokens
            nbytes = stats[1].received_bytes
            if stats[0].sent_tokens != tokens:
                print(f"  P sent {stats[0].sent_tokens} tokens, D received {tokens}")
            seconds = stats[0].seconds + stats[1].seconds
            print(f"{send_type:9s}: {tokens} tokens, {nbytes / 1e6:.1f} MB in {seconds * 1000:.1f} "
                  f"ms of transfer work ({nbytes / 1e6 / seconds:.0f} MB/s, "
                  f"{seconds * 1000 / tokens * 1000:.1f} ms per 1,000 tokens); D first tokens "
                  f"after {d_s * 1000:.0f} ms, D computed "
                  f"{d.scheduler.num_prompt_tokens_computed} prompt tokens")
        finally:
            p.shutdown()
            d.shutdown()


if __name__ == "__main__":
    main()
