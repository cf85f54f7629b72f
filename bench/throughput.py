"""Offline throughput on the standard workload, against transformers measured in the same run.

    python bench/throughput.py [--dtypes float32 bfloat16] [--hf-batch-sizes 16 32 64]

Workload: 64 requests x 128 random prompt tokens -> 128 output tokens, greedy, ignore_eos, on a
locally built Qwen2-shaped model (hidden 896, 8 layers, 14 heads, 2 kv heads, intermediate 4864,
vocab 32000). Prints output tokens/s for pp-engine and for transformers `generate` at each batch
size, the ratio to transformers' best, and batch-1 decode tokens/s of both.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, ".")
from bench.common import Workload, standard_model_dir


def bench_engine(model_dir: str, dtype: str, workload: Workload) -> float:
    from engine_core import LLM, SamplingParams

    llm = LLM(model_dir, dtype=dtype, max_num_seqs=256, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=workload.output_len, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in workload.prompts(32000)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    llm.engine.loop_stats.__init__()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    stats = llm.engine.loop_stats
    print(f"[{dtype}] engine loop: {stats.num_steps} steps, scheduler "
          f"{stats.schedule_s / stats.num_steps * 1e3:.2f} ms + output update "
          f"{stats.update_s / stats.num_steps * 1e3:.2f} ms per step = "
          f"{stats.driver_share:.1%} of step time; outside the engine (LLM front-end: "
          f"detokenize, outputs) {(elapsed - stats.total_s) / elapsed:.1%} of the run",
          flush=True)
    llm.shutdown()
    total = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert total == workload.num_requests * workload.output_len
    return total / elapsed


def bench_hf(model_dir: str, dtype: str, workload: Workload, batch_size: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    prompts = torch.tensor(workload.prompts(32000))
    total, start = 0, time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            ids = prompts[i:i + batch_size]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=workload.output_len,
                                 min_new_tokens=workload.output_len, pad_token_id=0)
            total += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--hf-batch-sizes", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = standard_model_dir()
    workload = Workload()
    single = Workload(num_requests=1, output_len=args.decode_tokens)
    print(f"threads={args.threads} workload={workload}")
    for dtype in args.dtypes:
        ours = bench_engine(model_dir, dtype, workload)
        hf = {bs: bench_hf(model_dir, dtype, workload, bs) for bs in args.hf_batch_sizes}
        best_bs = max(hf, key=hf.get)
        ours_1 = bench_engine(model_dir, dtype, single)
        hf_1 = bench_hf(model_dir, dtype, single, 1)
        print(f"[{dtype}] pp-engine: {ours:.1f} output tok/s")
        for bs, rate in hf.items():
            print(f"[{dtype}] transformers generate batch={bs}: {rate:.1f} output tok/s")
        print(f"[{dtype}] ratio vs transformers best (batch={best_bs}): {ours / hf[best_bs]:.2f}x")
        print(f"[{dtype}] batch-1 decode: pp-engine {ours_1:.1f} tok/s, transformers "
              f"{hf_1:.1f} tok/s ({ours_1 / hf_1:.2f}x)")


if __name__ == "__main__":
    main()
