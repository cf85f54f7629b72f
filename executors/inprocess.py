"""Runs every pipeline stage in the engine's own process, one after another.

With one stage this is the plain single-process engine. With several it executes the same layer
split as the Ray executor, synchronously, which makes pipeline-split correctness cheap to test.
All stages run on `config.device`; on a GPU they share one gpu_memory_utilization budget.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch
from engine_core.executors.gpu_memory import StartupMemory, sized_by_gpu_budget
from engine_core.executors.stage_worker import StageWorker, kv_blocks_that_fit

from engine_core.config import EngineConfig
from engine_core.executor import Executor, KVStage
from engine_core.messages import StepBatch, StepOutput


class InProcessExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        num_stages = config.parallel.pipeline_parallel_size
        # every stage is on config.device: on a GPU they share its gpu_memory_utilization
        start = (StartupMemory.take(torch.device(config.device))
                 if sized_by_gpu_budget(config) else None)
        self.stages = [StageWorker(config, i) for i in range(num_stages)]
        self.num_kv_blocks = kv_blocks_that_fit(self.stages, start)
        for stage in self.stages:
            stage.init_kv_cache(self.num_kv_blocks)

    def submit(self, batch: StepBatch) -> Future[StepOutput]:
        """Executes the step now and returns a completed future (the loop's contract is kept: the
        result is collected by `finish`)."""
        future: Future[StepOutput] = Future()
        try:
            hidden = None
            for stage in self.stages[:-1]:
                out = stage.execute(batch, hidden)
                if isinstance(out, StepOutput):
                    raise RuntimeError(f"stage {stage.stage_index} is not the last but sampled")
                hidden = out
            output = self.stages[-1].execute(batch, hidden)
            if not isinstance(output, StepOutput):
                raise RuntimeError("the last stage returned hidden states, not sampled tokens")
            future.set_result(output)
        except Exception as exc:  # surfaced to the engine loop by future.result()
            future.set_exception(exc)
        return future

    def kv_stages(self) -> list[KVStage]:
        """The stage workers themselves: they read and write their KV caches directly."""
        return list(self.stages)

    def shutdown(self) -> None:
        self.stages = []
