"""Run one benchmark on another revision and on this tree, alternately, in the same session.

    .venv/bin/python bench/vs_revision.py --rev a38be34 [--rounds 2] -- bench/throughput.py ...

The machine is noisy and absolute figures drift, so a change is judged against its baseline
measured in the same run. The baseline revision is checked out with `git worktree` in a temporary
folder and imported from there through PYTHONPATH (laid out as the package installs, with its own
`scripts/stage_package.py`, where it has one; older revisions had top-level packages), while this
tree runs from its editable install. Each round runs the baseline, then this tree, each script
with its own copy of the benchmark, from its own folder, on the same checkpoints (`bench/out/`).

At the end, every output line that both sides printed with the same words (numbers aside) is
shown once with the mean of its first figure on each side and the ratio this tree / baseline.
Figures that do not depend on the engine (transformers' tok/s in `bench/throughput.py`) show the
session's noise.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def baseline_path(checkout: str) -> str:
    """The folder to put first on PYTHONPATH so that `engine_core` imports from `checkout`."""
    stager = os.path.join(checkout, "scripts", "stage_package.py")
    if not os.path.exists(stager):
        return checkout  # top-level engine_core/, models/, executors/
    staged = os.path.join(checkout, ".staged")
    subprocess.run([sys.executable, stager, staged], check=True)
    return staged


def run(script: list[str], cwd: str, pythonpath: str | None) -> list[str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    probe = "import engine_core; print(engine_core.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=env, text=True,
                           capture_output=True, check=True)
    print(f"(engine_core from {where.stdout.strip()})", flush=True)
    result = subprocess.run([sys.executable, *script], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(result.stdout, flush=True)
    if result.returncode != 0:
        raise SystemExit(f"{script[0]} failed in {cwd} (exit code {result.returncode})")
    return result.stdout.splitlines()


def figures(lines: list[str]) -> dict[str, float]:
    """{the line with its numbers blanked: its first number} for lines that hold one."""
    found = {}
    for line in lines:
        numbers = NUMBER.findall(line)
        if numbers and not line.startswith(("threads=", "dtype=")):
            found[NUMBER.sub("#", line.strip())] = float(numbers[0])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", required=True, help="the baseline revision (any git name)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("script", nargs=argparse.REMAINDER,
                        help="-- then the benchmark script (a path in the repo) and its flags")
    args = parser.parse_args()
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        parser.error("name the benchmark script after --")
    results: dict[str, dict[str, list[float]]] = {"baseline": defaultdict(list),
                                                  "this tree": defaultdict(list)}
    with tempfile.TemporaryDirectory(prefix="pp-engine-baseline-") as tmp:
        checkout = os.path.join(tmp, "tree")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", checkout,
                        args.rev], check=True)
        try:
            # one copy of the benchmark's checkpoints (bench/out/), built by whichever runs first
            os.makedirs(os.path.join(ROOT, "bench", "out"), exist_ok=True)
            if not os.path.exists(os.path.join(checkout, "bench", "out")):
                os.symlink(os.path.join(ROOT, "bench", "out"),
                           os.path.join(checkout, "bench", "out"))
            path = baseline_path(checkout)
            for round_index in range(args.rounds):
                for side, cwd, pythonpath in (("baseline", checkout, path),
                                              ("this tree", ROOT, None)):
                    print(f"==== round {round_index + 1}: {side} "
                          f"({args.rev if side == 'baseline' else 'working tree'})", flush=True)
                    for key, value in figures(run(script, cwd, pythonpath)).items():
                        results[side][key].append(value)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", checkout],
                           check=False)
    print(f"==== {' '.join(script)}: mean of {args.rounds} round(s), this tree vs {args.rev}")
    for key, before in results["baseline"].items():
        after = results["this tree"].get(key)
        if after:
            b, a = statistics.mean(before), statistics.mean(after)
            ratio = f"{a / b:.3f}x" if b else "n/a"
            print(f"{b:10.2f} -> {a:10.2f}  {ratio:>8}  {key}")


if __name__ == "__main__":
    main()
