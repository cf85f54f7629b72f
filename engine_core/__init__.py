"""pp-engine: a pipeline-parallel LLM inference engine.

    from engine_core import LLM, SamplingParams

The names below load on first use, so importing a light part of the package (the proxy, the
wire messages) never loads torch. The layers, lowest first: `models` (model code), the core
(this folder's modules: the loop, scheduler, block manager, messages, configs and the interfaces
the loop drives), `executors` (where stages run), `kv_transfer` (the engine side of P/D),
`client` (engine processes and their clients), `entrypoints` (LLM, AsyncLLM, the CLI, the
OpenAI server and the P/D proxy). ARCHITECTURE.md draws them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine_core.config import EngineArgs
    from engine_core.entrypoints.llm import LLM
    from engine_core.outputs import CompletionOutput, Logprob, RequestOutput
    from engine_core.sampling_params import SamplingParams
    from engine_core.structured_outputs import StructuredOutputsParams

__all__ = ["LLM", "CompletionOutput", "EngineArgs", "Logprob", "RequestOutput", "SamplingParams",
           "StructuredOutputsParams"]

_LAZY = {
    "LLM": "engine_core.entrypoints.llm",
    "EngineArgs": "engine_core.config",
    "CompletionOutput": "engine_core.outputs",
    "Logprob": "engine_core.outputs",
    "RequestOutput": "engine_core.outputs",
    "SamplingParams": "engine_core.sampling_params",
    "StructuredOutputsParams": "engine_core.structured_outputs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
