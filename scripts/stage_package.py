"""Lay out the `engine_core` package as it installs, under DEST, for tools that read source
trees rather than import hooks (the import linter, the type checker).

`pyproject.toml` maps the repository's top-level `models/` and `executors/` folders onto
`engine_core.models` and `engine_core.executors`; an editable install resolves them with an
import hook, which those tools do not see. DEST/engine_core gets a symlink to every entry of
`engine_core/` plus one per mapped subpackage, so their reports name the repository's files.

    python scripts/stage_package.py DEST
"""

from __future__ import annotations

import os
import sys

import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stage(dest: str) -> str:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        package_dir: dict[str, str] = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    package = os.path.join(dest, "engine_core")
    os.makedirs(package, exist_ok=True)
    source = os.path.join(ROOT, package_dir["engine_core"])
    for name in os.listdir(source):
        if name != "__pycache__":
            os.symlink(os.path.join(source, name), os.path.join(package, name))
    for name, folder in package_dir.items():
        if name != "engine_core":
            os.symlink(os.path.join(ROOT, folder), os.path.join(dest, *name.split(".")))
    return package


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    stage(sys.argv[1])
