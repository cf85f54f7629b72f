"""Pipeline parallelism on the standard workload, each stage on one thread.

    python bench/pipeline.py [--dtype float32] [--num-requests 64] [--output-len 128]

Runs, in one process and one Ray cluster:
  A  PP=1, 1 thread                     (in-process)
  B  PP=2, 1 batch in flight            (the synchronous pipeline; Ray, 1 thread per stage)
  C  PP=2, 2 batches in flight          (the two-stage loop filling the pipeline)
  D  PP=1, 2 threads                    (the same cores without a pipeline)
and prints output tokens/s, C/B (target >= 1.8: the pipeline is full), C/D (target >= 0.9: little
overhead) and the driver's own time per step (schedule + submit + update, outside waiting).
Then the time to first token of one 2048-token prompt at PP=2 (512-token chunks), with and without
pipelined chunked prefill.
"""

from __future__ import annotations

import argparse
import sys
import time

import ray
import torch

sys.path.insert(0, ".")
from bench.common import Workload, standard_model_dir
from engine_core import LLM, SamplingParams


def run(model_dir: str, workload: Workload, dtype: str, **kwargs) -> tuple[float, float]:
    llm = LLM(model_dir, dtype=dtype, enable_prefix_caching=False, **kwargs)
    prompts = [{"prompt_token_ids": p} for p in workload.prompts(32000)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    llm.engine.loop_stats.__init__()
    params = SamplingParams(temperature=0.0, max_tokens=workload.output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    overhead = llm.engine.loop_stats.overhead_per_step_s
    llm.shutdown()
    total = sum(len(o.outputs[0].token_ids) for o in outputs)
    return total / elapsed, overhead


def ttft(model_dir: str, dtype: str, pipelined: bool) -> float:
    llm = LLM(model_dir, dtype=dtype, enable_prefix_caching=False, pipeline_parallel_size=2,
              threads_per_stage=1, max_num_batched_tokens=1024, pipelined_chunked_prefill=pipelined)
    prompt = {"prompt_token_ids": Workload(1, 2048).prompts(32000)[0]}
    llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=2), use_tqdm=False)
    start = time.perf_counter()
    llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    elapsed = time.perf_counter() - start
    llm.shutdown()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    model_dir = standard_model_dir()
    workload = Workload(num_requests=args.num_requests, output_len=args.output_len)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config={"worker_niceness": 0, "max_direct_call_object_size": 1 << 20})
    print(f"dtype={args.dtype} workload={workload}", flush=True)
    results = {}
    torch.set_num_threads(1)
    results["A"] = run(model_dir, workload, args.dtype)
    pp2 = dict(pipeline_parallel_size=2, threads_per_stage=1)
    results["B"] = run(model_dir, workload, args.dtype, max_concurrent_batches=1, **pp2)
    results["C"] = run(model_dir, workload, args.dtype, max_concurrent_batches=2, **pp2)
    torch.set_num_threads(2)
    results["D"] = run(model_dir, workload, args.dtype)
    names = {"A": "PP=1, 1 thread", "B": "PP=2, 1 in flight", "C": "PP=2, 2 in flight",
             "D": "PP=1, 2 threads"}
    for key, (rate, overhead) in results.items():
        print(f"{key} {names[key]:<20} {rate:8.1f} output tok/s   driver overhead "
              f"{overhead * 1e3:6.2f} ms/step", flush=True)
    print(f"C/B two-in-flight / one-in-flight: {results['C'][0] / results['B'][0]:.2f}x "
          f"(target >= 1.8)")
    print(f"C/D PP=2 / PP=1 with 2 threads:    {results['C'][0] / results['D'][0]:.2f}x "
          f"(target >= 0.9)")
    plain, piped = ttft(model_dir, args.dtype, False), ttft(model_dir, args.dtype, True)
    print(f"TTFT 2048-token prompt, PP=2, 512-token chunks: {plain:.2f} s plain, {piped:.2f} s "
          f"pipelined chunked prefill ({plain / piped:.2f}x)")
    ray.shutdown()


if __name__ == "__main__":
    main()
