"""The executor interface the engine loop drives: where pipeline stages run is hidden behind
`submit`. Implementations live in `executors/` (`executors.make_executor` picks one); the loop
never imports them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from engine_core.messages import StepBatch, StepOutput


class StepFuture(Protocol):
    """The pending result of one submitted step."""

    def result(self, timeout: float | None = None) -> StepOutput:
        """Block until the step's output is ready. Raises `TimeoutError` after `timeout` seconds and
        `RuntimeError` (naming the stage) if a stage failed or died."""
        ...


class Executor(ABC):
    """Runs scheduled steps through the pipeline stages.

    Contract: `submit` returns at once; steps are executed in submission order at every stage, so
    a step may depend on KV written by any step submitted before it.
    """

    num_kv_blocks: int  # the number of KV blocks every stage holds (the minimum over stages)

    @abstractmethod
    def submit(self, batch: StepBatch) -> StepFuture: ...

    @abstractmethod
    def shutdown(self) -> None:
        """Release the stages. Idempotent."""
