"""Disaggregated prefill/decode (1P1D behind `pp-engine proxy`) against one colocated instance.

    python bench/disagg.py [--model DIR] [--send-type PUT_ASYNC] [--long 8 --long-len 1024]
                           [--short 32 --short-len 32] [--output-len 64] [--request-rate 2]

Workload: --long requests of --long-len random prompt tokens mixed with --short requests of
--short-len tokens, all --output-len output tokens (ignore_eos), streamed, Poisson arrivals at
--request-rate (the same schedule for both setups). The point of disaggregation: a long prompt's
prefill runs on the prefill instance, so the short requests' decoding on the decode instance is
never stalled behind it.

Setups, on this host, with the same total CPU threads:
- baseline: one `pp-engine serve` (a colocated instance: prefill and decode in one engine),
  --threads threads;
- disagg: `pp-engine proxy` + one kv_producer + one kv_consumer, --threads / 2 threads each.

Prints, per setup: TTFT and ITL (p50/p99) of the short requests and of all, total throughput,
and the KV transfer figures of the decode instance (MB/s while moving, ms per 1,000 tokens).
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
import time

import httpx
import numpy as np

sys.path.insert(0, ".")
from bench.common import standard_model_dir
from bench.serve import RequestResult, run_request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


class Processes:
    """`python -m engine_core.cli ...` processes, each in its own group, stopped on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "engine_core.cli", *args]
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
        yield url, None
    finally:
        procs.stop()


@contextlib.contextmanager
def disaggregated(model: str, threads: int, max_model_len: int, send_type: str):
    procs = Processes()
    port, discovery = _free_port(), _free_port()
    url = f"http://127.0.0.1:{port}"
    decode_url = ""
    try:
        procs.start("proxy", "--port", str(port), "--discovery-port", str(discovery),
                    "--insecure-tcp", "--uvicorn-log-level", "warning")
        for role in ("kv_producer", "kv_consumer"):
            http_port = _free_port()
            config = {"kv_role": role, "kv_port": _free_port(), "send_type": send_type,
                      "proxy_address": f"127.0.0.1:{discovery}"}
            procs.start(*_serve_args(model, http_port, max(1, threads // 2), max_model_len),
                        "--kv-transfer-config", json.dumps(config), "--insecure-tcp")
            decode_url = f"http://127.0.0.1:{http_port}"

        def registered() -> bool:
            text = httpx.get(url + "/metrics", timeout=2).text
            return (_metric(text, 'ppengine:proxy_instances{role="kv_producer"}') >= 1
                    and _metric(text, 'ppengine:proxy_instances{role="kv_consumer"}') >= 1)

        _wait(procs, registered, "the proxy and its instances")
        yield url, decode_url
    finally:
        procs.stop()


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


def _summary(results: list[RequestResult], duration: float, short_len: int) -> dict:
    ok = [r for r in results if r.ok]
    short = [r for r in ok if r.prompt_len == short_len]

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
        "all_itl_p99_ms": pct([g for r in ok for g in r.itl], 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model dir (default: the standard "
                                                      "Qwen2-shaped random model)")
    parser.add_argument("--send-type", default="PUT_ASYNC", choices=["PUT", "GET", "PUT_ASYNC"])
    parser.add_argument("--long", type=int, default=8)
    parser.add_argument("--long-len", type=int, default=1024)
    parser.add_argument("--short", type=int, default=32)
    parser.add_argument("--short-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--request-rate", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="CPU threads in all (the 1P1D setup gives each instance half)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-json", default=None)
    args = parser.parse_args()

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
          f"send type {args.send_type}", flush=True)

    report = {}
    for name, setup in (("colocated (1 instance)", baseline(model, args.threads, max_model_len)),
                        ("1P1D", disaggregated(model, args.threads, max_model_len,
                                               args.send_type))):
        with setup as (url, decode_url):
            results, duration = asyncio.run(_run(url, prompts, args.output_len, arrivals))
            summary = _summary(results, duration, args.short_len)
            if decode_url:
                text = httpx.get(decode_url + "/metrics", timeout=10).text
                moved = _metric(text, "ppengine:kv_transfer_received_tokens_total")
                nbytes = _metric(text, "ppengine:kv_transfer_received_bytes_total")
                seconds = _metric(text, "ppengine:kv_transfer_seconds_total")
                computed = _metric(text, "ppengine:prompt_tokens_computed_total")
                summary.update(kv_tokens_moved=moved, kv_mb_per_s=nbytes / 1e6 / max(seconds,
                               1e-9), kv_ms_per_1k_tokens=1e6 * seconds / max(moved, 1),
                               decode_prompt_tokens_computed=computed)
            failures = [r.error for r in results if not r.ok]
        report[name] = summary
        print(f"== {name}")
        for key, value in summary.items():
            print(f"  {key:32} {value:12.2f}" if isinstance(value, float)
                  else f"  {key:32} {value:>12}")
        for error in failures[:3]:
            print("  failed:", error)
    base, dis = report["colocated (1 instance)"], report["1P1D"]
    print("== 1P1D / colocated")
    for key in ("short_ttft_p50_ms", "short_ttft_p99_ms", "short_itl_p50_ms",
                "short_itl_p99_ms", "total_token_throughput"):
        print(f"  {key:32} {dis[key] / base[key]:12.2f}x")
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump({"args": vars(args), **report}, f, indent=1)


if __name__ == "__main__":
    main()
