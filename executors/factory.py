"""`make_executor` and `make_proposer`: the executor and the draft proposer a config asks for."""

from __future__ import annotations

from engine_core.config import EngineConfig
from engine_core.executor import Executor
from engine_core.proposer import Proposer

__all__ = ["make_executor", "make_proposer"]


def make_executor(config: EngineConfig) -> Executor:
    """The executor `config.parallel.executor_backend` asks for, with its stages started."""
    if config.parallel.executor_backend == "ray":
        from engine_core.executors.ray_executor import RayExecutor

        return RayExecutor(config)
    from engine_core.executors.inprocess import InProcessExecutor

    return InProcessExecutor(config)


def make_proposer(config: EngineConfig, executor: Executor) -> Proposer | None:
    """The proposer `EngineCore` takes for `config.speculative`, sized to `executor`'s KV
    blocks: a `DraftModelProposer` (loaded here, in the engine core's process) for
    "draft_model"; None without speculation and for "ngram" (the engine builds that one). If
    building it raises, `executor` is shut down first (the caller owned it and gets nothing
    to hand it to)."""
    spec = config.speculative
    if spec is None or spec.method != "draft_model":
        return None
    try:
        from engine_core.executors.draft_model import DraftModelProposer

        return DraftModelProposer(config, executor.num_kv_blocks)
    except BaseException:
        executor.shutdown()
        raise
