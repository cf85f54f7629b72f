"""Online serving benchmark against an OpenAI-compatible server, like `vllm bench serve`.

    python bench/serve.py --url http://127.0.0.1:8000 [--request-rate 4] [--max-concurrency 32]
    python bench/serve.py --launch [MODEL] [--pp 2]        # start a server, benchmark, stop it

Workload (bench/common.py): --num-prompts requests of 128 random prompt token ids each, sent to
/v1/completions as token-id prompts, 128 output tokens each (ignore_eos), streamed. Arrivals are
a Poisson process at --request-rate requests/s (`inf`: all at once), at most --max-concurrency in
flight. `--launch` without MODEL serves the standard Qwen2-shaped random model.

Reports request throughput, output tokens/s, and mean/median/p99 of TTFT (time to first token),
TPOT (time per output token after the first), ITL (gap between streamed chunks) and E2E latency.
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
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

sys.path.insert(0, ".")
from bench.common import Workload, standard_model_dir


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def run_request(http: httpx.AsyncClient, model: str, prompt: list[int],
                      output_len: int) -> RequestResult:
    """One streamed /v1/completions request, timed chunk by chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}
    result = RequestResult(prompt_len=len(prompt))
    start = last = time.perf_counter()
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")[:200]
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
                if not any(c.get("token_ids") for c in chunk["choices"]):
                    continue
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.e2e = time.perf_counter() - start
        result.ok = result.output_len > 0
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def benchmark(url: str, model: str, prompts: list[list[int]], output_len: int,
                    request_rate: float, max_concurrency: int | None, seed: int
                    ) -> tuple[list[RequestResult], float]:
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency or len(prompts))
    timeout = httpx.Timeout(3600.0, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        await run_request(http, model, prompts[0][:16], 4)  # warm-up

        async def limited(prompt: list[int]) -> RequestResult:
            async with limit:
                return await run_request(http, model, prompt, output_len)

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    output = sum(r.output_len for r in ok)
    summary = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": sum(r.prompt_len for r in ok), "total_output_tokens": output,
        "request_throughput": len(ok) / duration, "output_throughput": output / duration,
        "total_token_throughput": (output + sum(r.prompt_len for r in ok)) / duration,
    }
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.e2e for r in ok],
    }
    for name, values in series.items():
        ms = np.array(values or [0.0]) * 1000
        summary[f"mean_{name}_ms"] = float(ms.mean())
        summary[f"median_{name}_ms"] = float(np.median(ms))
        summary[f"p99_{name}_ms"] = float(np.percentile(ms, 99))
    return summary


def print_summary(summary: dict[str, float], failures: list[str]) -> None:
    line = "{:<40} {:>12}"
    print("{:=^53}".format(" Serving Benchmark Result "))
    for key, label in (("completed", "Successful requests:"), ("failed", "Failed requests:"),
                       ("duration_s", "Benchmark duration (s):"),
                       ("total_input_tokens", "Total input tokens:"),
                       ("total_output_tokens", "Total generated tokens:"),
                       ("request_throughput", "Request throughput (req/s):"),
                       ("output_throughput", "Output token throughput (tok/s):"),
                       ("total_token_throughput", "Total token throughput (tok/s):")):
        value = summary[key]
        print(line.format(label, f"{value:.2f}" if isinstance(value, float) else value))
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        print(f"{title:-^53}")
        for stat in ("mean", "median", "p99"):
            label = f"{stat.capitalize()} {name.upper()} (ms):"
            print(line.format(label, f"{summary[f'{stat}_{name}_ms']:.2f}"))
    print("=" * 53)
    for error in failures[:5]:
        print("failed:", error)


def _vocab_size(model_dir: str) -> int:
    """The served model's vocabulary, when its directory is readable here (else 32000)."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return json.load(f)["vocab_size"]
    except (OSError, KeyError, ValueError):
        return 32000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched_server(model_dir: str, pp: int, extra: list[str]):
    """`pp-engine serve` on a free local port; yields its URL; stops it afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "engine_core", "serve", model_dir, "--port", str(port),
           "--pipeline-parallel-size", str(pp), "--disable-uvicorn-access-log",
           "--uvicorn-log-level", "warning", *extra]
    with launched_process(cmd, f"http://127.0.0.1:{port}") as url:
        yield url


@contextlib.contextmanager
def launched_process(cmd: list[str], url: str, env: dict[str, str] | None = None):
    """Start a server command in its own session, wait (up to 15 min) until `url/health`
    answers 200, yield `url`; afterwards SIGTERM it, then SIGKILL its whole process group."""
    print("launching:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not become healthy")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="a running server")
    parser.add_argument("--model", default=None,
                        help="model name to send (default: the server's first model)")
    parser.add_argument("--launch", nargs="?", const="standard", default=None, metavar="MODEL",
                        help="start a server on MODEL (default: the standard model) first")
    parser.add_argument("--pp", type=int, default=1, help="--pipeline-parallel-size (--launch)")
    parser.add_argument("--server-args", default="",
                        help="more `pp-engine serve` flags for --launch, as one string")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests/s of the Poisson arrivals (default: inf, all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-json", default=None, help="also write the summary here")
    args = parser.parse_args()

    workload = Workload(num_requests=args.num_prompts, prompt_len=args.input_len,
                        output_len=args.output_len, seed=args.seed)
    with contextlib.ExitStack() as stack:
        url = args.url
        if args.launch is not None:
            model_dir = standard_model_dir() if args.launch == "standard" else args.launch
            url = stack.enter_context(launched_server(model_dir, args.pp,
                                                      args.server_args.split()))
        info = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
        model = args.model or info["id"]
        prompts = workload.prompts(_vocab_size(info.get("root", "")))
        print(f"{args.num_prompts} requests x {args.input_len} -> {args.output_len} tokens, "
              f"rate {args.request_rate}, max concurrency {args.max_concurrency}, "
              f"model {model}", flush=True)
        results, duration = asyncio.run(benchmark(url, model, prompts, args.output_len,
                                                  args.request_rate, args.max_concurrency,
                                                  args.seed))
    summary = summarize(results, duration)
    print_summary(summary, [r.error for r in results if not r.ok])
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump({"args": vars(args), **summary,
                       "requests": [asdict(r) for r in results]}, f, indent=1)


if __name__ == "__main__":
    main()
