"""The README's demo: continue three snippets of Python with the shipped default model."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_core import LLM, SamplingParams


def main() -> None:
    llm = LLM(dtype="float32")  # no model named: the shipped models/default
    prompts = ["def fibonacci(n):", "import os\n\n\ndef main():", "class Stack:"]
    # A 5.8M-parameter model loops under pure greedy decoding; light sampling reads better.
    params = SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.2, seed=1,
                            max_tokens=64)
    for out in llm.generate(prompts, params, use_tqdm=False):
        print("-" * 60)
        print(out.prompt + out.outputs[0].text)
    llm.shutdown()


if __name__ == "__main__":
    main()
