"""Speculative decoding (n-gram) against no speculation, measured in the same run (issue 21).

    python bench/spec_decode.py [--workloads code standard] [--pp 1 2] [--dtypes float32 auto]
                                [--k 4] [--rounds 3] [--num-prompts 16]
    python bench/spec_decode.py --batch-sizes 1,2,4,8,16,32 [--dtypes float32] [--rounds 2]

Workload "code" (A): the held-out Python file beginnings of `bench/code_prompts.py` on the
shipped default model (`LLM()`'s), batch 1 (`max_num_seqs=1`: one request at a time), greedy,
256 output tokens each (ignore_eos), prefix caching off; at PP=1 (in-process, `--threads`
torch threads) and PP=2 (Ray, one thread per stage, as bench/pipeline.py). Targets: spec /
no-spec >= 2x at PP=1 and at PP=2.

Workload "standard" (B): 64 requests x 128 random prompt tokens -> 128 output tokens, greedy,
ignore_eos, on the Qwen2-shaped random model of `bench/common.py`, PP=1, all at once, with the
engine's default `disable_by_batch_size` (so a batch this large proposes no drafts: what it
measures is that turning speculation on costs nothing there). Target: spec >= 0.95x.

`--batch-sizes`: the code prompts at each batch size b (`max_num_seqs=b`; max(b,
`--num-prompts`) requests, rounded up to a multiple of b, so every batch runs full), with
`disable_by_batch_size` far above any b (speculation always on): where speculation stops paying
on this machine, to choose `DEFAULT_DISABLE_BY_BATCH_SIZE`. On the default model (5.8M
parameters, a step mostly fixed costs) or, `--sweep-model standard`, on the standard workload's
150M one (a step mostly matmuls; random weights, so its acceptance is its own).

Speculation: {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4,
"prompt_lookup_min": 1}. Every measurement builds its own `LLM` (shut down after), warms it up
on the same settings, then times one `generate` of all the requests. Each round runs both sides
one after the other, alternating which goes first; the summary is the median of the per-round
ratios, so a machine that drifts during the run moves both sides of a ratio alike. Acceptance
(share of draft tokens accepted) and mean accepted length (tokens per verification step, the
target's own included) come from `llm.engine.stats().spec_decode`, counted over the timed
`generate` only. "same outputs" counts the requests whose tokens are identical with and
without speculation (greedy: all of them in float32).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, ".")
from bench.code_prompts import code_prompt_ids
from bench.common import Workload, standard_model_dir

ALWAYS_SPECULATE = 1 << 30  # a `disable_by_batch_size` no batch reaches


@dataclass(frozen=True)
class Measurement:
    """One timed `generate`: output tokens/s, its outputs, and its speculation counters."""

    tok_s: float
    token_ids: tuple[tuple[int, ...], ...]
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / max(self.num_draft_tokens, 1)

    @property
    def mean_accepted_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / max(self.num_drafts, 1)


@dataclass(frozen=True)
class Setting:
    """What one measurement runs: the engine's arguments and the requests."""

    model: str | None  # None: the shipped default model
    prompts: tuple[tuple[int, ...], ...]
    output_len: int
    dtype: str
    max_num_seqs: int
    pp: int = 1


def spec_config(k: int, disable_by_batch_size: int | None) -> dict:
    config = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
              "prompt_lookup_min": 1}
    if disable_by_batch_size is not None:
        config["disable_by_batch_size"] = disable_by_batch_size
    return config


def measure(setting: Setting, speculative: dict | None) -> Measurement:
    from engine_core import LLM, SamplingParams

    kwargs: dict = dict(dtype=setting.dtype, max_num_seqs=setting.max_num_seqs,
                        enable_prefix_caching=False)
    if setting.pp > 1:
        kwargs.update(pipeline_parallel_size=setting.pp, threads_per_stage=1)
    if speculative is not None:
        kwargs["speculative_config"] = speculative
    llm = LLM(setting.model, **kwargs)
    try:
        prompts = [{"prompt_token_ids": list(p)} for p in setting.prompts]
        warm = prompts[:setting.max_num_seqs]
        llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                     use_tqdm=False)  # warm-up, drafts verified too when speculating
        before = llm.engine.stats().spec_decode
        params = SamplingParams(temperature=0.0, max_tokens=setting.output_len, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        after = llm.engine.stats().spec_decode
    finally:
        llm.shutdown()
    token_ids = tuple(tuple(o.outputs[0].token_ids) for o in outputs)
    total = sum(len(t) for t in token_ids)
    assert total == len(prompts) * setting.output_len, (total, len(prompts))
    return Measurement(
        total / elapsed, token_ids,
        num_drafts=after.num_drafts - before.num_drafts,
        num_draft_tokens=after.num_draft_tokens - before.num_draft_tokens,
        num_accepted_tokens=after.num_accepted_tokens - before.num_accepted_tokens)


@dataclass(frozen=True)
class Comparison:
    """Rounds of (no speculation, speculation) measurements of one setting."""

    rounds: tuple[tuple[Measurement, Measurement], ...]

    @property
    def ratio(self) -> float:
        return statistics.median(spec.tok_s / plain.tok_s for plain, spec in self.rounds)

    def median_tok_s(self, side: int) -> float:
        return statistics.median(r[side].tok_s for r in self.rounds)

    @property
    def acceptance_rate(self) -> float:
        return _pooled(self, "num_accepted_tokens") / max(_pooled(self, "num_draft_tokens"), 1)

    @property
    def mean_accepted_length(self) -> float:
        return 1.0 + _pooled(self, "num_accepted_tokens") / max(_pooled(self, "num_drafts"), 1)

    @property
    def same_outputs(self) -> tuple[int, int]:
        plain, spec = self.rounds[0]
        return sum(a == b for a, b in zip(plain.token_ids, spec.token_ids)), len(plain.token_ids)


def _pooled(comparison: Comparison, name: str) -> int:
    return sum(getattr(spec, name) for _, spec in comparison.rounds)


def compare(label: str, setting: Setting, speculative: dict, rounds: int) -> Comparison:
    """`rounds` rounds of both sides, alternating which goes first; prints each round."""
    results = []
    for round_index in range(rounds):
        if round_index % 2 == 0:
            plain = measure(setting, None)
            spec = measure(setting, speculative)
        else:
            spec = measure(setting, speculative)
            plain = measure(setting, None)
        results.append((plain, spec))
        print(f"  {label} round {round_index}: no spec {plain.tok_s:7.1f} tok/s, spec "
              f"{spec.tok_s:7.1f} tok/s ({spec.tok_s / plain.tok_s:.2f}x), acceptance "
              f"{spec.acceptance_rate:.1%}, mean accepted length "
              f"{spec.mean_accepted_length:.2f}, drafts {spec.num_drafts}", flush=True)
    return Comparison(tuple(results))


def summary(label: str, c: Comparison, target: str) -> str:
    same, total = c.same_outputs
    return (f"{label:<34} no spec {c.median_tok_s(0):7.1f}  spec {c.median_tok_s(1):7.1f} "
            f"tok/s  ratio {c.ratio:.2f}x ({target})  acceptance {c.acceptance_rate:.1%}  "
            f"mean accepted length {c.mean_accepted_length:.2f}  same outputs {same}/{total}")


def start_ray() -> None:
    """One local Ray for every PP=2 measurement (as bench/pipeline.py), so no run pays for
    starting it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False, configure_logging=False, _node_ip_address="127.0.0.1",
                 _system_config={"worker_niceness": 0, "max_direct_call_object_size": 1 << 20})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=["code", "standard"],
                        default=["code", "standard"])
    parser.add_argument("--pp", nargs="+", type=int, default=[1, 2],
                        help="code workload: pipeline sizes (PP > 1 runs on Ray)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "auto"],
                        help="code workload and sweep ('auto': the checkpoint's, bfloat16)")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=16,
                        help="code prompts per measurement (16 written; more repeat)")
    parser.add_argument("--output-len", type=int, default=256, help="code workload tokens")
    parser.add_argument("--threads", type=int, default=2, help="torch threads at PP=1")
    parser.add_argument("--disable-by-batch-size", type=int, default=None,
                        help="code and standard workloads (default: the engine's)")
    parser.add_argument("--batch-sizes", default=None,
                        help="comma-separated: run the batch-size sweep instead")
    parser.add_argument("--sweep-model", choices=["default", "standard"], default="default",
                        help="the sweep's model: the shipped default one, or the standard "
                             "workload's 150M random one (same prompt ids)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} k={args.k} rounds={args.rounds} "
          f"torch={torch.__version__}", flush=True)
    lines = []
    if args.batch_sizes:
        speculative = spec_config(args.k, ALWAYS_SPECULATE)
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        model = standard_model_dir() if args.sweep_model == "standard" else None
        for dtype in args.dtypes:
            for b in sizes:
                n = -(-max(b, args.num_prompts) // b) * b
                setting = Setting(model, tuple(map(tuple, code_prompt_ids(count=n))),
                                  args.output_len, dtype, max_num_seqs=b)
                label = f"code, {args.sweep_model} model, batch {b} ({n} requests), {dtype}"
                lines.append(summary(label, compare(label, setting, speculative, args.rounds),
                                     "spec always on"))
        print("\n".join(lines))
        return
    speculative = spec_config(args.k, args.disable_by_batch_size)
    if "code" in args.workloads:
        prompts = tuple(map(tuple, code_prompt_ids(count=args.num_prompts)))
        for pp in args.pp:
            if pp > 1:
                start_ray()
            for dtype in args.dtypes:
                setting = Setting(None, prompts, args.output_len, dtype, max_num_seqs=1, pp=pp)
                label = f"code, batch 1, PP={pp}, {dtype}"
                lines.append(summary(label, compare(label, setting, speculative, args.rounds),
                                     "target >= 2x"))
    if "standard" in args.workloads:
        workload = Workload()
        setting = Setting(standard_model_dir(), tuple(map(tuple, workload.prompts(32000))),
                          workload.output_len, "float32", max_num_seqs=256)
        label = "standard 64x128->128, float32"
        lines.append(summary(label, compare(label, setting, speculative, args.rounds),
                             "target >= 0.95x"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
