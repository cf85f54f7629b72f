"""A/B of `executors/host_memory.keep_freed_memory` on the standard offline workload.

    python bench/host_memory.py [--dtypes float32 bfloat16] [--rounds 2]

Runs `bench/throughput.py`'s engine measurement in fresh processes, alternating malloc kept
(the default) and left alone (`PP_ENGINE_KEEP_FREED_MEMORY=0`), and prints output tokens/s of
each and the median of the pairwise ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CHILD = """
import sys
sys.path.insert(0, ".")
from bench.common import Workload, standard_model_dir
from bench.throughput import bench_engine
print(bench_engine(standard_model_dir(), sys.argv[1], Workload()))
"""


def measure(dtype: str, keep: bool) -> float:
    env = dict(os.environ, PP_ENGINE_KEEP_FREED_MEMORY="1" if keep else "0")
    out = subprocess.run([sys.executable, "-c", CHILD, dtype], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for dtype in args.dtypes:
        ratios = []
        for round_index in range(args.rounds):
            off, on = measure(dtype, keep=False), measure(dtype, keep=True)
            ratios.append(on / off)
            print(f"{dtype} round {round_index}: malloc left alone {off:7.1f} tok/s, "
                  f"freed memory kept {on:7.1f} tok/s ({on / off:.2f}x)", flush=True)
        print(f"{dtype}: median ratio {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
