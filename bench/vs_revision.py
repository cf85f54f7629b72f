"""Run one benchmark on another revision and on this tree, alternately, in the same session.

    .venv/bin/python bench/vs_revision.py --rev a38be34 [--rounds 2] -- bench/throughput.py ...

The machine is noisy and absolute figures drift, so a change is judged against its baseline
measured in the same run. The baseline revision is checked out with `git worktree` in a temporary
folder and imported from there through PYTHONPATH (laid out as the package installs, with its own
`scripts/stage_package.py`, where it has one; older revisions had top-level packages), while this
tree runs from its editable install. Each round runs both, the baseline first in odd rounds and
this tree first in even ones (so a drifting machine favours neither; use an even --rounds), each
script with its own copy of the benchmark, from its own folder, on the same checkpoints
(`bench/out/`).

At the end, every figure of the output lines that both sides printed with the same words
(numbers aside) is shown with its mean on each side and the ratio this tree / baseline.
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

import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:")  # a library's log line (Ray's), no figure
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?")  # "float32" is a word


def baseline_path(checkout: str) -> str:
    """The folder to put first on PYTHONPATH so that `engine_core` imports from `checkout`.

    Revisions whose `models/` and `executors/` install as `engine_core.models` and
    `engine_core.executors` get those two as symlinks inside their own `engine_core/`: a
    benchmark script puts its checkout first on sys.path, and an `engine_core` found there
    without them would fall back to this tree's editable install for the subpackages."""
    pyproject = os.path.join(checkout, "pyproject.toml")
    with open(pyproject, "rb") as f:
        package_dir = tomllib.load(f).get("tool", {}).get("setuptools", {}).get("package-dir", {})
    for name, folder in package_dir.items():
        parent, _, leaf = name.rpartition(".")
        if parent == "engine_core":
            link = os.path.join(checkout, "engine_core", leaf)
            if not os.path.exists(link):
                os.symlink(os.path.join(checkout, folder), link)
    return checkout

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


def figures(lines: list[str]) -> dict[str, list[float]]:
    """{the line with its numbers blanked: its numbers} for lines that hold any. A number inside
    a word ("float32") is part of the line's words; progress bars and log lines are skipped; a
    line printed again with other numbers gets its ordinal ("[2]")."""
    found: dict[str, list[float]] = {}
    for line in lines:
        numbers = NUMBER.findall(line)
        if (numbers and "it/s" not in line and not LOG_LINE.match(line)
                and not line.startswith(("threads=", "dtype="))):
            key = NUMBER.sub("#", line.strip())
            repeat = sum(k == key or k.startswith(key + " [") for k in found)
            found[f"{key} [{repeat + 1}]" if repeat else key] = [float(n) for n in numbers]
    return found


def summary(results: dict[str, dict[str, list[list[float]]]]) -> list[str]:
    """One line per figure that both sides printed: the mean of each side, this tree / baseline.
    A line's numbers that never change (a batch size) are not figures."""
    lines = []
    for key, before in results["baseline"].items():
        after = results["this tree"].get(key)
        if not after or len({len(v) for v in before + after}) != 1:
            continue
        for position in range(len(before[0])):
            values = [run[position] for run in before + after]
            if len(set(values)) == 1:
                continue
            b = statistics.mean(run[position] for run in before)
            a = statistics.mean(run[position] for run in after)
            ratio = f"{a / b:.3f}x" if b else "n/a"
            lines.append(f"{b:10.2f} -> {a:10.2f}  {ratio:>8}  #{position + 1} of: {key}")
    return lines


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
    results: dict[str, dict[str, list[list[float]]]] = {"baseline": defaultdict(list),
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
            sides = [("baseline", checkout, path), ("this tree", ROOT, None)]
            for round_index in range(args.rounds):
                # ABBA: the order flips each round, so a machine that drifts slower (or faster)
                # through the session favours neither side
                for side, cwd, pythonpath in sides if round_index % 2 == 0 else sides[::-1]:
                    print(f"==== round {round_index + 1}: {side} "
                          f"({args.rev if side == 'baseline' else 'working tree'})", flush=True)
                    for key, values in figures(run(script, cwd, pythonpath)).items():
                        results[side][key].append(values)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", checkout],
                           check=False)
    print(f"==== {' '.join(script)}: mean of {args.rounds} round(s), this tree vs {args.rev}")
    print("\n".join(summary(results)))

if __name__ == "__main__":
    main()
