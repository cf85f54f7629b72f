"""`executors/host_memory.py`: the malloc tuning applies on Linux/glibc and can be turned off."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import sys
from engine_core.executors.host_memory import keep_freed_memory
print(keep_freed_memory())
"""


def _run(env_value: str | None) -> str:
    import os

    env = dict(os.environ)
    env.pop("PP_ENGINE_KEEP_FREED_MEMORY", None)
    if env_value is not None:
        env["PP_ENGINE_KEEP_FREED_MEMORY"] = env_value
    return subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, timeout=60,
                          capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_applied_by_default_and_off_on_request():
    assert _run(None) == "True"
    assert _run("0") == "False"
