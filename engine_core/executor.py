"""The executor interface the engine loop drives: where pipeline stages run is hidden behind
`submit`. Implementations live in `executors/` (`executors.make_executor` picks one); the loop
never imports them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Protocol

from engine_core.messages import StepBatch, StepOutput

if TYPE_CHECKING:
    import torch


class StepFuture(Protocol):
    """The pending result of one submitted step."""

    def result(self, timeout: float | None = None) -> StepOutput:
        """Block until the step's output is ready. Raises `TimeoutError` after `timeout` seconds and
        `RuntimeError` (naming the stage) if a stage failed or died."""
        ...


class KVStage(Protocol):
    """One pipeline stage's KV cache, as the KV connector (disaggregated prefill/decode) sees it.

    Layers are named by their *global* index. K and V of a layer in `block_ids` are host-side
    tensors `[len(block_ids), block_size, num_kv_heads, head_dim]` in the engine's dtype. Calls
    may come from any thread; each one is bounded (a stage that does not answer or died raises
    `RuntimeError` naming the stage). Reads and writes are ordered after every step submitted
    before them."""

    def read_kv_blocks(self, block_ids: list[int]) -> list[tuple[int, torch.Tensor,
                                                                 torch.Tensor]]:
        """Copies of `block_ids` for every layer this stage holds: (global layer, K, V)."""
        ...

    def holds_layer(self, layer: int) -> bool:
        """Whether global `layer` lives on this stage (answered locally, no remote call)."""
        ...

    def write_kv_blocks(self, block_ids: list[int], layer: int, k: torch.Tensor,
                        v: torch.Tensor) -> None:
        """Write K and V of global `layer` (which this stage holds) into `block_ids`."""
        ...

    def write_kv_layers(self, block_ids: list[int],
                        layers: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """`write_kv_blocks` for several layers this stage holds, in one call."""
        ...


class Executor(ABC):
    """Runs scheduled steps through the pipeline stages.

    Contract: `submit` returns at once; steps are executed in submission order at every stage, so
    a step may depend on KV written by any step submitted before it.
    """

    num_kv_blocks: int  # the number of KV blocks every stage holds (the minimum over stages)

    @abstractmethod
    def submit(self, batch: StepBatch) -> StepFuture: ...

    def kv_stages(self) -> list[KVStage]:
        """The stages' KV caches, for a KV connector (disaggregated prefill/decode)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not expose its KV cache for disaggregated prefill/decode")

    @abstractmethod
    def shutdown(self) -> None:
        """Release the stages. Idempotent."""
