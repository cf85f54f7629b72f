"""The package's shape: one import name whatever the working directory holds, a proxy that
loads no torch, and layers contracts that fail on an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
from stage_package import stage  # noqa: E402

LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _shadowing_folders(where: str) -> None:
    """A user's own `models/` (checkpoints) and `executors/` packages, which break if imported."""
    for name in ("models", "executors"):
        os.makedirs(os.path.join(where, name))
        with open(os.path.join(where, name, "__init__.py"), "w") as f:
            f.write(f"raise ImportError('the user\\'s own {name}/ was imported')\n")


def _run(code: str, cwd: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_users_models_folder_does_not_shadow_the_package(tmp_path):
    _shadowing_folders(str(tmp_path))
    result = _run("""
        import sys
        sys.path.insert(0, '')  # a script beside the folders sees them, as `python -c` does
        from engine_core import LLM, SamplingParams
        import engine_core.models, engine_core.executors
        llm = LLM(engine_core.models.default_model_dir(), max_model_len=64)
        out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=3, temperature=0))
        assert len(out[0].outputs[0].token_ids) == 3, out
        assert 'models' not in sys.modules and 'executors' not in sys.modules, sorted(sys.modules)
        print(engine_core.models.__file__)
    """, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith(REPO), result.stdout


def test_the_proxy_loads_no_torch(tmp_path):
    _shadowing_folders(str(tmp_path))
    result = _run("""
        import sys
        from engine_core.entrypoints.cli import build_parser
        from engine_core.entrypoints.proxy.server import run_proxy
        import engine_core
        loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))
        assert not loaded, loaded
        assert callable(run_proxy) and build_parser() is not None
    """, cwd=str(tmp_path), timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]


def _lint_imports(root: str) -> subprocess.CompletedProcess:
    return subprocess.run([LINT_IMPORTS, "--no-cache", os.path.join(REPO, "pyproject.toml")],
                          cwd=root, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not os.path.exists(LINT_IMPORTS), reason="import-linter is not installed")
def test_the_layers_contracts_hold_and_catch_an_upward_import(tmp_path):
    kept = tmp_path / "kept"
    stage(str(kept))
    result = _lint_imports(str(kept))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout

    broken = tmp_path / "broken"
    package = stage(str(broken))
    models = os.path.join(package, "models")
    os.unlink(models)  # a copy of models/ (not the link) to add an upward import to
    shutil.copytree(os.path.join(REPO, "models"), models,
                    ignore=shutil.ignore_patterns("__pycache__", "default"))
    with open(os.path.join(models, "upward.py"), "w") as f:
        f.write("from engine_core.entrypoints.llm import LLM  # model code reaching the top\n")
    result = _lint_imports(str(broken))
    assert result.returncode != 0, result.stdout[-3000:]
    assert "engine_core.models.upward -> engine_core.entrypoints.llm" in result.stdout, (
        result.stdout[-3000:])
