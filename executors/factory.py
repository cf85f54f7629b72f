"""`make_executor`: the executor a config asks for."""

from __future__ import annotations

from engine_core.config import EngineConfig
from engine_core.executor import Executor

__all__ = ["make_executor"]


def make_executor(config: EngineConfig) -> Executor:
    """The executor `config.parallel.executor_backend` asks for, with its stages started."""
    if config.parallel.executor_backend == "ray":
        from engine_core.executors.ray_executor import RayExecutor

        return RayExecutor(config)
    from engine_core.executors.inprocess import InProcessExecutor

    return InProcessExecutor(config)
