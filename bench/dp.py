"""Data parallelism on this machine: DP=2 (one thread per engine) vs DP=1 (two threads).

    python bench/dp.py [--num-requests 64] [--skip-throughput] [--skip-prefix]

Throughput: the standard workload (bench/common.py: 64 requests x 128 random prompt tokens ->
128 output tokens, greedy, ignore_eos, Qwen2-shaped 150M model, float32), all submitted at once
through `LLM`, both configurations with the engine core(s) in their own process(es): output
tokens/s of each, their ratio, and the requests each DP engine got.

Prefix hits: a shared-prefix workload (groups of requests whose prompts share a long prefix,
interleaved A1 B1 C1 ... A2 B2 ...), DP=2 with `dp_routing="load"` vs `"prefix"`: the fraction
of prompt tokens served from the prefix cache, and output tokens/s.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

sys.path.insert(0, ".")
from bench.common import Workload, standard_model_dir


def run(model_dir: str, prompts: list[list[int]], output_len: int, **llm_kwargs) -> dict:
    from engine_core import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", max_num_seqs=256, **llm_kwargs)
    try:
        llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}] * 4, SamplingParams(max_tokens=4),
                     use_tqdm=False)  # warm-up (every engine gets one)
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
        elapsed = time.perf_counter() - start
        states = llm.engine.engine_states() if hasattr(llm.engine, "engine_states") else []
    finally:
        llm.shutdown()
    total = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"tok_s": total / elapsed, "elapsed": elapsed,
            "per_engine": [s.num_routed - 2 for s in states],  # minus the warm-up's
            "hit": sum(o.num_cached_tokens for o in outputs) / sum(len(p) for p in prompts)}


def shared_prefix_prompts(groups: int, per_group: int, prefix_len: int, suffix_len: int,
                          vocab: int = 32000) -> list[list[int]]:
    rng = random.Random(1)
    prefixes = [[rng.randrange(10, vocab) for _ in range(prefix_len)] for _ in range(groups)]
    return [prefixes[g] + [rng.randrange(10, vocab) for _ in range(suffix_len)]
            for _ in range(per_group) for g in range(groups)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-prefix", action="store_true")
    args = parser.parse_args()
    model_dir = standard_model_dir()
    if not args.skip_throughput:
        workload = Workload(num_requests=args.num_requests)
        prompts = workload.prompts(32000)
        print(f"workload={workload}", flush=True)
        one = run(model_dir, prompts, workload.output_len, engine_process=True,
                  threads_per_stage=2, enable_prefix_caching=False)
        print(f"DP=1 (2 threads): {one['tok_s']:.1f} output tok/s ({one['elapsed']:.1f} s)",
              flush=True)
        two = run(model_dir, prompts, workload.output_len, data_parallel_size=2,
                  threads_per_stage=1, enable_prefix_caching=False)
        print(f"DP=2 (1 thread each): {two['tok_s']:.1f} output tok/s ({two['elapsed']:.1f} s), "
              f"requests per engine {two['per_engine']}", flush=True)
        print(f"ratio DP=2 / DP=1: {two['tok_s'] / one['tok_s']:.2f}x", flush=True)
    if not args.skip_prefix:
        prompts = shared_prefix_prompts(groups=5, per_group=8, prefix_len=512, suffix_len=16)
        print("shared-prefix workload: 5 groups x 8 requests, 512-token shared prefix + 16 "
              "tokens, 16 output tokens, DP=2", flush=True)
        for routing in ("load", "prefix"):
            result = run(model_dir, prompts, 16, data_parallel_size=2, threads_per_stage=1,
                         dp_routing=routing)
            print(f"routing={routing}: prefix-cache hit rate {result['hit']:.1%}, "
                  f"{result['tok_s']:.1f} output tok/s ({result['elapsed']:.1f} s), requests "
                  f"per engine {result['per_engine']}", flush=True)


if __name__ == "__main__":
    main()
