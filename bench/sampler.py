"""The sampler's cost per step, this tree's against another revision's, in the same run.

    .venv/bin/python bench/sampler.py [--baseline-rev 98a5ab1~1] [--rows 64] [--vocab 32000]

The baseline is `executors/sampler.py` as it was at `--baseline-rev` (by default the commit
before the invariants of issue 18: ids in range, finite logprobs, a guarded draw), loaded from
git beside this tree's. Both sample the same clean logits; prints the median time of each case
and the ratio now / baseline.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine_core.executors import sampler as current  # noqa: E402

from engine_core.sampling_params import SamplingParams  # noqa: E402

CASES = {
    "greedy": dict(temperature=0),
    "random": dict(temperature=1.0),
    "top_k+top_p": dict(temperature=0.8, top_k=50, top_p=0.9),
    "penalties": dict(temperature=0.8, repetition_penalty=1.1, frequency_penalty=0.5),
    "logprobs=5": dict(temperature=0.8, logprobs=5),
}


def load_baseline(rev: str):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:executors/sampler.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_sampler.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_sampler", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def median_ms(module, logits: torch.Tensor, params: dict, repeats: int) -> float:
    rows = [module.SamplingRow(SamplingParams(**params), [1, 2, 3], list(range(i, i + 32)), ())
            for i in range(logits.shape[0])]
    sampler = module.Sampler(seed=0)
    sampler(logits, rows)  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sampler(logits, rows)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-rev", default="98a5ab1~1")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    baseline = load_baseline(args.baseline_rev)
    logits = torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0)) * 3
    print(f"sampler, [{args.rows}, {args.vocab}] float32 logits, 1 thread, median of "
          f"{args.repeats}; baseline {args.baseline_rev}")
    print(f"{'case':<14}{'baseline ms':>12}{'now ms':>10}{'now/base':>10}")
    for name, params in CASES.items():
        base_runs, now_runs = [], []
        for _ in range(3):  # alternating, so drift of the machine hits both alike
            base_runs.append(median_ms(baseline, logits, params, args.repeats))
            now_runs.append(median_ms(current, logits, params, args.repeats))
        base, now = min(base_runs), min(now_runs)
        print(f"{name:<14}{base:>12.3f}{now:>10.3f}{now / base:>9.2f}x")


if __name__ == "__main__":
    main()
