"""The README's demo: generate from the shipped default model, or, where none is installed yet,
from a small random Llama checkpoint built here (its text is noise, but every piece runs)."""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_core import LLM, SamplingParams


def model_dir() -> str:
    from models import default_model_dir

    try:
        return default_model_dir()
    except ValueError:
        from tests.checkpoints import make_checkpoint
        from tests.text_checkpoint import add_tokenizer

        root = tempfile.mkdtemp(prefix="pp-engine-demo-")
        print(f"no default model installed; building a random Llama checkpoint in {root}")
        return add_tokenizer(make_checkpoint(root, "llama"), os.path.join(root, "llama-tok"))


def main() -> None:
    llm = LLM(model_dir(), dtype="float32")
    prompts = ["def fibonacci(n):", "import os\n", "class Stack:"]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48))
    for out in outputs:
        print("-" * 60)
        print(out.prompt + out.outputs[0].text)
    llm.shutdown()


if __name__ == "__main__":
    main()
