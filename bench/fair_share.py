"""A small request behind a giant one: its time to first token with fair share and without
(issue 18).

    python bench/fair_share.py [--prompts 4] [--n 16] [--giant-tokens 32] [--max-num-seqs 32]

Starts two `pp-engine serve` on the standard model side by side, one with fair share (the
default) and one with `--no-fair-share` (plain FCFS admission over sequences, the old
behaviour), both with --max-num-seqs seats and --max-model-len 512, and measures them in turns
(--rounds times each, so that load from others on a shared machine falls on both alike), each
round after a warm-up run of the giant:

1. the giant alone: one /v1/completions request of --prompts token-id prompts x n=--n,
   --giant-tokens tokens each (ignore_eos): its end-to-end time and output tokens/s;
2. the giant again, and --small requests (8 prompt tokens -> 8 tokens, streamed), the first
   --delay s after the giant was sent, then one a second: their TTFT and end-to-end time, and
   the giant's end-to-end time beside them.

Prints the medians over the rounds for both servers and the ratios (FCFS over fair share).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time

import httpx

sys.path.insert(0, ".")
from bench.common import standard_model_dir
from bench.serve import _vocab_size, launched_server, run_request


async def giant_request(http: httpx.AsyncClient, model: str, prompts: list[list[int]], n: int,
                        max_tokens: int) -> tuple[float, int]:
    """(seconds, output tokens) of one request holding every prompt x n sequences."""
    body = {"model": model, "prompt": prompts, "n": n, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    response = await http.post("/v1/completions", json=body)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed, response.json()["usage"]["completion_tokens"]


async def small_requests(http: httpx.AsyncClient, model: str, vocab: int, count: int,
                         delay: float) -> list[tuple[float, float]]:
    """(TTFT, end to end) of each small request, sent `delay` s from now, then one a second."""
    rng = random.Random(1)

    async def one(index: int) -> tuple[float, float]:
        await asyncio.sleep(delay + index)
        prompt = [rng.randrange(10, vocab) for _ in range(8)]
        result = await run_request(http, model, prompt, 8)
        if not result.ok:
            raise RuntimeError(f"a small request failed: {result.error}")
        return result.ttft, result.e2e

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def measure(url: str, model: str, args: argparse.Namespace) -> dict[str, float]:
    vocab = _vocab_size(model)
    rng = random.Random(0)
    prompts = [[rng.randrange(10, vocab) for _ in range(args.prompt_len)]
               for _ in range(args.prompts)]
    async with httpx.AsyncClient(base_url=url, timeout=3600) as http:
        await giant_request(http, model, prompts, args.n, args.giant_tokens)  # warm-up
        alone_s, tokens = await giant_request(http, model, prompts, args.n, args.giant_tokens)
        giant = asyncio.create_task(
            giant_request(http, model, prompts, args.n, args.giant_tokens))
        smalls = await small_requests(http, model, vocab, args.small, args.delay)
        giant_s, _ = await giant
    return {
        "giant alone s": alone_s,
        "giant alone output tok/s": tokens / alone_s,
        "giant beside the small ones s": giant_s,
        "small TTFT median s": statistics.median(t for t, _ in smalls),
        "small TTFT max s": max(t for t, _ in smalls),
        "small e2e median s": statistics.median(e for _, e in smalls),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--giant-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--small", type=int, default=3, help="small requests")
    parser.add_argument("--delay", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model = standard_model_dir()
    print(f"giant: {args.prompts} prompts x n={args.n} x {args.giant_tokens} tokens; "
          f"{args.small} small requests from {args.delay} s on; --max-num-seqs "
          f"{args.max_num_seqs}; {args.rounds} rounds", flush=True)
    seats = ["--max-num-seqs", str(args.max_num_seqs), "--max-model-len", "512"]
    runs: dict[str, list[dict[str, float]]] = {"fair share": [], "fcfs": []}
    with (launched_server(model, 1, seats) as fair_url,
          launched_server(model, 1, [*seats, "--no-fair-share"]) as fcfs_url):
        for _ in range(args.rounds):
            for name, url in (("fair share", fair_url), ("fcfs", fcfs_url)):
                runs[name].append(asyncio.run(measure(url, model, args)))
                print(name, {k: round(v, 3) for k, v in runs[name][-1].items()}, flush=True)
    results = {name: {key: statistics.median(run[key] for run in rs) for key in rs[0]}
               for name, rs in runs.items()}
    print("\n| median of the rounds | fair share | fcfs (--no-fair-share) | fcfs / fair share |")
    print("|---|---|---|---|")
    for key in results["fair share"]:
        fair, fcfs = results["fair share"][key], results["fcfs"][key]
        print(f"| {key} | {fair:.2f} | {fcfs:.2f} | {fcfs / fair:.2f}x |")


if __name__ == "__main__":
    main()
