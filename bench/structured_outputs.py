"""Structured outputs: the standard workload with every request under one JSON schema, against
the same workload unconstrained, in the same run (rounds alternate), plus the grammar's compile
time, cold and cached.

    python bench/structured_outputs.py [--rounds 3] [--pp 1 2]

The standard workload (64 requests x 128 random prompt tokens -> 128 output tokens, greedy) on
its Qwen2-shaped 150M random model, here with a byte-level BPE tokenizer of its 32000 ids
(trained once on the Python standard library's sources, `constrained_model_dir`), since a JSON
grammar needs tokens for JSON's punctuation. The schema (`SCHEMA`) walks through an integer, a
bounded string, an enum array and then a long string, so every request makes exactly 128
tokens on both sides and the two runs do the same model work: the ratio is the cost of the
constraint (compiling once, a bitmask per token filled by the engine's driver, applied at the
last stage).

Compile time: `GrammarCompiler` on its own, for the schema: the first compile of a fresh
compiler (xgrammar imported, the vocabulary read), a compile of a new schema on a warm one,
and the same schema again (a cache hit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
from bench.common import STANDARD_MODEL, Workload, standard_model_dir
from bench.spec_decode import start_ray

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999999},
        "title": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "body": {"type": "string", "minLength": 4000, "maxLength": 4000},
    },
    "required": ["id", "title", "tags", "body"],
}


def constrained_model_dir(root: str = "bench/out") -> str:
    """The standard checkpoint (symlinked) with a 32000-token byte-level BPE tokenizer."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = os.path.join(root, "qwen2-shaped-150m-bpe")
    if os.path.exists(os.path.join(path, "tokenizer_config.json")):
        return path
    weights = os.path.abspath(standard_model_dir(root))
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(weights):
        if not os.path.exists(os.path.join(path, name)):
            os.symlink(os.path.join(weights, name), os.path.join(path, name))

    def corpus(limit: int = 8 << 20):
        """Up to `limit` characters of the standard library's Python sources (tests left out)."""
        stdlib, total = sysconfig.get_paths()["stdlib"], 0
        for folder, dirs, files in os.walk(stdlib):
            dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "test", "tests"))
            for name in sorted(files):
                if name.endswith(".py") and total < limit:
                    with open(os.path.join(folder, name), encoding="utf-8",
                              errors="replace") as source:
                        text = source.read()
                    total += len(text)
                    yield text

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=STANDARD_MODEL["vocab_size"],
                                  special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
    return path


def measure(model: str, prompts: list[list[int]], output_len: int, pp: int,
            constrained: bool) -> tuple[float, float]:
    """(output tokens per second, driver seconds per step) of one run."""
    from engine_core import LLM, SamplingParams, StructuredOutputsParams

    kwargs: dict = dict(dtype="float32", enable_prefix_caching=False)
    if pp > 1:
        kwargs.update(pipeline_parallel_size=pp, threads_per_stage=1)
    llm = LLM(model, **kwargs)
    try:
        constraint = StructuredOutputsParams(json=SCHEMA) if constrained else None
        warm = [{"prompt_token_ids": p} for p in prompts[:8]]
        llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                          structured_outputs=constraint), use_tqdm=False)
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                                structured_outputs=constraint)
        loop = llm.engine.loop_stats if hasattr(llm.engine, "loop_stats") else None
        before = (loop.schedule_s, loop.num_steps) if loop is not None else (0.0, 0)
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
        elapsed = time.perf_counter() - start
        schedule_per_step = 0.0
        if loop is not None:
            schedule_per_step = (loop.schedule_s - before[0]) / max(loop.num_steps - before[1], 1)
    finally:
        llm.shutdown()
    total = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert total == len(prompts) * output_len, total
    if constrained:  # what came out is the schema's start, and the body under way
        text = outputs[0].outputs[0].text
        assert text.startswith('{"id": '), text[:40]
    return total / elapsed, schedule_per_step


def compile_times(model: str) -> dict[str, float]:
    from engine_core.config import EngineArgs
    from engine_core.grammars import GrammarCompiler
    from engine_core.structured_outputs import StructuredOutputsParams

    config = EngineArgs(model=model).resolve()
    compiler = GrammarCompiler(config.tokenizer_path, config.model.vocab_size)
    try:
        times = {}
        start = time.perf_counter()
        compiler.compile(StructuredOutputsParams(json=SCHEMA)).result()
        times["first compile (xgrammar loaded, vocabulary read)"] = time.perf_counter() - start
        other = dict(SCHEMA, properties=dict(SCHEMA["properties"],
                                             extra={"type": "boolean"}))
        start = time.perf_counter()
        compiler.compile(StructuredOutputsParams(json=other)).result()
        times["compile of a new schema (warm compiler)"] = time.perf_counter() - start
        start = time.perf_counter()
        compiler.compile(StructuredOutputsParams(json=SCHEMA)).result()
        times["the same schema again (cache hit)"] = time.perf_counter() - start
    finally:
        compiler.shutdown()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pp", nargs="+", type=int, default=[1])
    parser.add_argument("--threads", type=int, default=2, help="torch threads at PP=1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = constrained_model_dir()
    workload = Workload()
    prompts = workload.prompts(STANDARD_MODEL["vocab_size"])
    print(f"threads={args.threads} rounds={args.rounds} torch={torch.__version__}", flush=True)
    for name, seconds in compile_times(model).items():
        print(f"compile: {name}: {seconds * 1e3:.1f} ms", flush=True)
    for pp in args.pp:
        if pp > 1:
            start_ray()
        ratios, free, constrained = [], [], []
        for round_index in range(args.rounds):
            plain, plain_driver = measure(model, prompts, workload.output_len, pp, False)
            schema, schema_driver = measure(model, prompts, workload.output_len, pp, True)
            free.append(plain)
            constrained.append(schema)
            ratios.append(schema / plain)
            print(f"PP={pp} round {round_index}: unconstrained {plain:.1f} tok/s, "
                  f"JSON schema {schema:.1f} tok/s ({schema / plain:.3f}x); scheduling "
                  f"{plain_driver * 1e3:.2f} -> {schema_driver * 1e3:.2f} ms/step", flush=True)
        print(f"standard 64x128->128 float32, PP={pp}: unconstrained "
              f"{statistics.median(free):.1f} tok/s, JSON schema "
              f"{statistics.median(constrained):.1f} tok/s, median ratio "
              f"{statistics.median(ratios):.3f}x (target >= 0.9x)", flush=True)


if __name__ == "__main__":
    main()
