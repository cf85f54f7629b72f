"""Batch generation as a Ray job on an existing cluster.

    ray start --head
    ray job submit --working-dir . -- python examples/ray_job.py MODEL_DIR -pp 2

Inside a job, RAY_ADDRESS is set, so `LLM` attaches to the cluster instead of starting one and
places its pipeline stages with a placement group (one bundle per stage).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_core import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="HF model dir (default: shipped)")
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=2)
    parser.add_argument("--threads-per-stage", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    llm = LLM(args.model, pipeline_parallel_size=args.pipeline_parallel_size,
              threads_per_stage=args.threads_per_stage)
    prompts = [{"prompt_token_ids": [1, 10 + i, 20 + i, 30 + i]} for i in range(4)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                                   ignore_eos=True), use_tqdm=False)
    llm.shutdown()
    for out in outputs:
        print(out.request_id, out.outputs[0].token_ids)
    total = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"RESULT generated {len(outputs)} completions, {total} tokens")


if __name__ == "__main__":
    main()
