"""Serving under hostile traffic: does one bad client slow everyone else down? (issue 8)

    python bench/hostile.py [--launch MODEL] [--url URL] [--num-prompts 32] [--hostile-rate 20]

Runs the serving workload of bench/serve.py twice against one server: alone (the baseline), then
with 4 hostile clients sending, for as long as the workload runs, --hostile-rate requests/s in
all (`inf`: as fast as they can) of a rotation of bad requests: 20 MB bodies (413), ~4 MB text
prompts far over the context (400 before tokenizing), bodies with 2**70 ints, NaN,
out-of-vocabulary stop ids and junk types (400), and streams that disconnect after their first
chunk. A /health poller runs all along. Prints good-request throughput, TTFT/ITL and /health
latency of both runs and their ratios, the status codes the hostile requests got (any 5xx is a
bug), and whether every KV block is free at the end. The hostile clients share the machine's
cores with the server, as the benchmark client does.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import sys
import time

import httpx
import numpy as np

sys.path.insert(0, ".")
from bench.common import Workload, standard_model_dir
from bench.serve import _vocab_size, benchmark, launched_server, summarize


def hostile_bodies(model: str) -> list[tuple[str, bytes]]:
    """(path, body) of each bad request of the rotation, encoded once."""
    def body(**fields) -> bytes:
        return json.dumps({"model": model, "max_tokens": 8, **fields}).encode()

    huge = b'{"prompt": "' + b"a" * 20_000_000 + b'"}'
    return [
        ("/v1/completions", huge),
        ("/v1/completions", body(prompt="hello world " * 330_000)),
        ("/v1/completions", body(prompt="x", seed=2**70)),
        ("/v1/completions", body(prompt="x", top_k=2**70, stream=True)),
        ("/v1/completions", body(prompt="x", min_tokens=2, stop_token_ids=[99_999_999])),
        ("/v1/completions", body(prompt=[[1, 2], [2**70]])),
        ("/v1/completions", body(prompt="x", temperature=float("nan"))),
        ("/v1/chat/completions", body(messages=[{"role": "user", "content": {"a": [1]}}])),
        ("/v1/chat/completions", body(messages=[{"role": "user", "content": "hi " * 400_000}])),
        ("/v1/completions", b"\xff\xfe{not json"),
    ]


async def hostile_worker(url: str, bodies: list[tuple[str, bytes]], offset: int, model: str,
                         rate: float, stop: asyncio.Event, codes: collections.Counter) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as http:
        i = offset
        while not stop.is_set():
            await asyncio.sleep(1 / rate)
            if i % (len(bodies) + 1) == len(bodies):  # a stream dropped after its first chunk
                payload = {"model": model, "prompt": [1, 2, 3, 4], "max_tokens": 256,
                           "ignore_eos": True, "stream": True}
                with contextlib.suppress(httpx.HTTPError):
                    async with http.stream("POST", "/v1/completions", json=payload) as r:
                        codes[f"{r.status_code} (dropped stream)"] += 1
                        async for _ in r.aiter_lines():
                            break
            else:
                path, content = bodies[i % (len(bodies) + 1)]
                try:
                    r = await http.post(path, content=content,
                                        headers={"content-type": "application/json"})
                    codes[str(r.status_code)] += 1
                except httpx.HTTPError as exc:
                    codes[type(exc).__name__] += 1
            i += 1


async def poll_health(url: str, stop: asyncio.Event) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as http:
        while not stop.is_set():
            start = time.perf_counter()
            await http.get("/health")
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(0.05)
    return latencies


HOSTILE_CLIENTS = 4


async def run(url: str, model: str, prompts: list[list[int]], output_len: int,
              hostile_rate: float) -> tuple[dict, list[float], collections.Counter]:
    stop = asyncio.Event()
    codes: collections.Counter = collections.Counter()
    health = asyncio.create_task(poll_health(url, stop))
    bodies = hostile_bodies(model)
    clients = HOSTILE_CLIENTS if hostile_rate > 0 else 0
    workers = [asyncio.create_task(hostile_worker(url, bodies, i * 3, model,
                                                  hostile_rate / HOSTILE_CLIENTS, stop, codes))
               for i in range(clients)]
    results, duration = await benchmark(url, model, prompts, output_len, float("inf"), None, 0)
    stop.set()
    await asyncio.gather(*workers)
    return summarize(results, duration), await health, codes


def free_blocks(url: str) -> tuple[float, float]:
    metrics = httpx.get(url + "/metrics", timeout=30).text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith(("ppengine:num_free_kv_blocks", "ppengine:num_kv_blocks"))}
    return values["ppengine:num_free_kv_blocks"], values["ppengine:num_kv_blocks"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (default: launch one)")
    parser.add_argument("--launch", default="standard", metavar="MODEL",
                        help="model to serve when no --url (default: the standard model)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hostile-rate", type=float, default=20.0,
                        help="bad requests per second, all hostile clients together")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            model_dir = standard_model_dir() if args.launch == "standard" else args.launch
            url = stack.enter_context(launched_server(model_dir, 1, []))
        info = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
        model = info["id"]
        prompts = Workload(args.num_prompts, args.input_len, args.output_len).prompts(
            _vocab_size(info.get("root", "")))
        rows: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
        # warm-up (not counted), then the baseline on both sides of the attack: machine drift
        # shows as a difference between the two baseline runs
        phases = [("warm-up", 0.0), ("alone", 0.0), ("under attack", args.hostile_rate),
                  ("alone", 0.0)]
        for name, rate in phases:
            summary, health, codes = asyncio.run(run(url, model, prompts, args.output_len,
                                                     rate))
            health_ms = np.array(health) * 1000
            summary["health_p99_ms"] = float(np.percentile(health_ms, 99))
            summary["health_max_ms"] = float(health_ms.max())
            rows[name].append(summary)
            print(f"{name}: {summary['completed']} ok / {summary['failed']} failed, "
                  f"{summary['output_throughput']:.1f} tok/s, hostile requests "
                  f"{dict(codes) or '-'}", flush=True)
        free, total = free_blocks(url)

    print(f"\n{'':<20}{'alone (2 runs)':>18}{'under attack':>14}{'ratio':>8}")
    for label, key in (("output tok/s", "output_throughput"), ("median TTFT ms", "median_ttft_ms"),
                       ("median ITL ms", "median_itl_ms"), ("p99 ITL ms", "p99_itl_ms"),
                       ("/health p99 ms", "health_p99_ms"), ("/health max ms", "health_max_ms")):
        alone = [r[key] for r in rows["alone"]]
        attacked = rows["under attack"][0][key]
        both = " / ".join(f"{a:.1f}" for a in alone)
        print(f"{label:<20}{both:>18}{attacked:>14.1f}{attacked / np.mean(alone):>8.2f}")
    print(f"KV blocks free at the end: {free:.0f} / {total:.0f}")


if __name__ == "__main__":
    main()
