"""Prefill/decode setups behind `pp-engine proxy` against each other on one workload.

    python bench/disagg.py [--setups 2p2d,2both] [--send-type PUT_ASYNC] [--zmq-keys]
                           [--long 8 --long-len 1024] [--short 32 --short-len 32]
                           [--output-len 64] [--request-rate 2] [--slo-ttft-ms 3000]
                           [--slo-tpot-ms 250] [--model DIR]

Workload: --long requests of --long-len random prompt tokens mixed with --short requests of
--short-len tokens, all --output-len output tokens (ignore_eos), streamed, Poisson arrivals at
--request-rate (the same schedule for every setup). The point of disaggregation: a long prompt's
prefill runs on a prefill instance, so the short requests' decoding on a decode instance is
never stalled behind it.

Setups (--setups, the first is the baseline of the ratios), on this host, sharing --threads
CPU threads evenly:
- colocated: one plain `pp-engine serve`;
- 1p1d: the proxy + a kv_producer + a kv_consumer;
- 2p2d: the proxy + two kv_producers + two kv_consumers;
- 2both: the proxy + two kv_both instances (each request runs on one of them, no KV moves).

Prints, per setup: TTFT and ITL (p50/p99) of the short requests and of all, throughput,
goodput (requests per second within --slo-ttft-ms and --slo-tpot-ms), and the KV transfer
figures of the instances (MB/s while moving, ms per 1,000 tokens, pushes held back); then each
setup's ratios to the first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

sys.path.insert(0, ".")
from bench.common import standard_model_dir
from bench.serve import RequestResult, run_request
from engine_core.transport import create_keys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


class Processes:
    """`python -m engine_core ...` processes, each in its own group, stopped on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "engine_core", *args]
        print("launching:", " ".join(cmd), flush=True)
        self.procs.append(subprocess.Popen(cmd, start_new_session=True,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def check(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[3]} exited with {proc.returncode}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def _wait(procs: Processes, ready, what: str, timeout_s: float = 900.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs.check()
        with contextlib.suppress(httpx.HTTPError):
            if ready():
                return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready in {timeout_s} s")


def _serve_args(model: str, port: int, threads: int, max_model_len: int) -> list[str]:
    return ["serve", model, "--port", str(port), "--served-model-name", "model",
            "--max-model-len", str(max_model_len), "--threads-per-stage", str(threads),
            "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]


@contextlib.contextmanager
def baseline(model: str, threads: int, max_model_len: int):
    procs, port = Processes(), _free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        procs.start(*_serve_args(model, port, threads, max_model_len))
        _wait(procs, lambda: httpx.get(url + "/health", timeout=2).status_code == 200, "serve")
        yield url, []
    finally:
        procs.stop()


@contextlib.contextmanager
def behind_proxy(model: str, threads: int, max_model_len: int, send_type: str,
                 roles: list[str], keys: str | None = None):
    """`pp-engine proxy` + one instance per role, `threads // len(roles)` threads each (at least
    one). Yields (proxy url, [each instance's url])."""
    procs = Processes()
    port, discovery = _free_port(), _free_port()
    url = f"http://127.0.0.1:{port}"
    security = ["--zmq-keys", keys] if keys else []
    urls = []
    try:
        procs.start("proxy", "--port", str(port), "--discovery-port", str(discovery),
                    "--uvicorn-log-level", "warning", *security)
        for role in roles:
            http_port = _free_port()
            config = {"kv_role": role, "kv_port": _free_port(), "send_type": send_type,
                      "proxy_address": f"127.0.0.1:{discovery}"}
            procs.start(*_serve_args(model, http_port, max(1, threads // len(roles)),
                                     max_model_len),
                        "--kv-transfer-config", json.dumps(config), *security)
            urls.append(f"http://127.0.0.1:{http_port}")

        def registered() -> bool:
            text = httpx.get(url + "/metrics", timeout=2).text
            return sum(_metric(text, f'ppengine:proxy_instances{{role="{r}"}}')
                       for r in set(roles)) == len(roles)

        _wait(procs, registered, "the proxy and its instances")
        yield url, urls
    finally:
        procs.stop()


SETUPS = {  # name -> the roles behind the proxy (None: one plain `pp-engine serve`)
    "colocated": None,
    "1p1d": ["kv_producer", "kv_consumer"],
    "2p2d": ["kv_producer", "kv_producer", "kv_consumer", "kv_consumer"],
    "2both": ["kv_both", "kv_both"],
}


async def _run(url: str, prompts: list[list[int]], output_len: int, arrivals: list[float]
               ) -> tuple[list[RequestResult], float]:
    timeout = httpx.Timeout(3600.0, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        await run_request(http, "model", prompts[0][:16], 4)  # warm-up
        start = time.perf_counter()

        async def at(delay: float, prompt: list[int]) -> RequestResult:
            await asyncio.sleep(delay)
            return await run_request(http, "model", prompt, output_len)

        results = await asyncio.gather(*(at(d, p) for d, p in zip(arrivals, prompts)))
        return list(results), time.perf_counter() - start


def _summary(results: list[RequestResult], duration: float, short_len: int,
             slo_ttft_s: float, slo_tpot_s: float) -> dict:
    ok = [r for r in results if r.ok]
    short = [r for r in ok if r.prompt_len == short_len]
    good = [r for r in ok if r.ttft <= slo_ttft_s
            and (r.e2e - r.ttft) / max(r.output_len - 1, 1) <= slo_tpot_s]

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")

    tokens = sum(r.prompt_len + r.output_len for r in ok)
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_token_throughput": tokens / duration,
        "output_throughput": sum(r.output_len for r in ok) / duration,
        "short_ttft_p50_ms": pct([r.ttft for r in short], 50),
        "short_ttft_p99_ms": pct([r.ttft for r in short], 99),
        "short_itl_p50_ms": pct([g for r in short for g in r.itl], 50),
        "short_itl_p99_ms": pct([g for r in short for g in r.itl], 99),
        "all_ttft_p50_ms": pct([r.ttft for r in ok], 50),
        "all_ttft_p99_ms": pct([r.ttft for r in ok], 99),
        "all_itl_p50_ms": pct([g for r in ok for g in r.itl], 50),
        "all_itl_p99_ms": pct([g for r in ok for g in r.itl], 99),
        "goodput_req_per_s": len(good) / duration,
        "slo_met_fraction": len(good) / max(len(results), 1),
    }


def _kv_figures(urls: list[str]) -> dict:
    """KV moved into the instances, from their /metrics (summed)."""
    texts = [httpx.get(u + "/metrics", timeout=10).text for u in urls]

    def total(name: str) -> float:
        return sum(_metric(t, name) for t in texts)

    moved, seconds = total("ppengine:kv_transfer_received_tokens_total"), \
        total("ppengine:kv_transfer_seconds_total")
    return {"kv_tokens_moved": moved,
            "kv_mb_per_s": total("ppengine:kv_transfer_received_bytes_total") / 1e6
            / max(seconds, 1e-9),
            "kv_ms_per_1k_tokens": 1e6 * seconds / max(moved, 1),
            "kv_pushes_held": total("ppengine:kv_transfer_held_total"),
            "prompt_tokens_computed": total("ppengine:prompt_tokens_computed_total")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model dir (default: the standard "
                                                      "Qwen2-shaped random model)")
    parser.add_argument("--setups", default="2p2d,2both",
                        help=f"comma-separated, the first is the baseline of the ratios; from "
                             f"{', '.join(SETUPS)} (default: %(default)s)")
    parser.add_argument("--send-type", default="PUT_ASYNC", choices=["PUT", "GET", "PUT_ASYNC"])
    parser.add_argument("--zmq-keys", action="store_true",
                        help="CurveZMQ on every proxy/instance/KV socket (keys made in a temp "
                             "dir)")
    parser.add_argument("--long", type=int, default=8)
    parser.add_argument("--long-len", type=int, default=1024)
    parser.add_argument("--short", type=int, default=32)
    parser.add_argument("--short-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--request-rate", type=float, default=2.0)
    parser.add_argument("--slo-ttft-ms", type=float, default=3000.0,
                        help="goodput counts requests with TTFT at most this (default: "
                             "%(default)s)")
    parser.add_argument("--slo-tpot-ms", type=float, default=250.0,
                        help="... and a mean time per output token at most this (default: "
                             "%(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="CPU threads in all, shared evenly by a setup's instances")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-json", default=None)
    args = parser.parse_args()
    setups = args.setups.split(",")
    for name in setups:
        if name not in SETUPS:
            parser.error(f"unknown setup {name!r} (known: {', '.join(SETUPS)})")

    model = args.model or standard_model_dir()
    with open(os.path.join(model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    rng = random.Random(args.seed)
    lengths = [args.long_len] * args.long + [args.short_len] * args.short
    rng.shuffle(lengths)
    prompts = [[rng.randrange(10, vocab) for _ in range(n)] for n in lengths]
    arrivals, t = [], 0.0
    for _ in prompts:
        arrivals.append(t)
        t += rng.expovariate(args.request_rate)
    max_model_len = args.long_len + args.output_len + 16
    print(f"{args.long} x {args.long_len} + {args.short} x {args.short_len} tokens in, "
          f"{args.output_len} out, rate {args.request_rate}/s, {args.threads} threads in all, "
          f"send type {args.send_type}, CurveZMQ {'on' if args.zmq_keys else 'off'}, SLO "
          f"TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms", flush=True)

    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        keys = None
        if args.zmq_keys:
            keys = os.path.join(tmp, "keys")
            create_keys(keys)
        for name in setups:
            roles = SETUPS[name]
            setup = (baseline(model, args.threads, max_model_len) if roles is None else
                     behind_proxy(model, args.threads, max_model_len, args.send_type, roles,
                                  keys))
            with setup as (url, instance_urls):
                results, duration = asyncio.run(_run(url, prompts, args.output_len, arrivals))
                summary = _summary(results, duration, args.short_len,
                                   args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000)
                if instance_urls:
                    summary.update(_kv_figures(instance_urls))
                failures = [r.error for r in results if not r.ok]
            report[name] = summary
            print(f"== {name}", flush=True)
            for key, value in summary.items():
                print(f"  {key:32} {value:12.2f}" if isinstance(value, float)
                      else f"  {key:32} {value:>12}")
            for error in failures[:3]:
                print("  failed:", error)
    base = report[setups[0]]
    for name in setups[1:]:
        print(f"== {name} / {setups[0]}")
        for key in ("short_ttft_p50_ms", "short_ttft_p99_ms", "short_itl_p50_ms",
                    "short_itl_p99_ms", "all_ttft_p99_ms", "all_itl_p99_ms",
                    "total_token_throughput", "goodput_req_per_s"):
            ratio = report[name][key] / base[key] if base[key] else float("nan")
            print(f"  {key:32} {ratio:12.2f}x")
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump({"args": vars(args), **report}, f, indent=1)


if __name__ == "__main__":
    main()
