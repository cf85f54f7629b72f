"""pp-engine: a pipeline-parallel LLM inference engine.

    from engine_core import LLM, SamplingParams
"""

from engine_core.config import EngineArgs
from engine_core.llm import LLM
from engine_core.outputs import CompletionOutput, Logprob, RequestOutput
from engine_core.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineArgs", "Logprob", "RequestOutput", "SamplingParams"]
