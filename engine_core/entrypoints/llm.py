"""`LLM`: offline batch generation, the same API as vLLM's `LLM`."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from engine_core.client.base import SyncEngineClient
from engine_core.client.factory import make_client
from engine_core.client.sync import SyncEngineCoreClient
from engine_core.config import DataParallelConfig, EngineArgs
from engine_core.engine import EngineCore
from engine_core.entrypoints.chat import check_messages
from engine_core.entrypoints.engine_metrics import Metric, read_engine_metrics
from engine_core.entrypoints.input_processor import (
    InputProcessor,
    ProcessedPrompt,
    ProcessedRequest,
)
from engine_core.entrypoints.interrupts import DeferredInterrupt
from engine_core.entrypoints.output_processor import OutputProcessor
from engine_core.executors.factory import make_executor, make_proposer
from engine_core.models import load_tokenizer
from engine_core.outputs import RequestOutput
from engine_core.sampling_params import SamplingParams

# A prompt of `LLM.generate`: its text, {"prompt": text} or {"prompt_token_ids": ids} (a list is
# a list of prompts, never one prompt's token ids).
PromptType = str | dict[str, Any]


class LLM:
    """Generate from an HF-format model directory.

        llm = LLM("path/to/model", dtype="float32")
        outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))

    Keyword arguments are those of `EngineArgs` (vLLM's names): dtype, max_model_len,
    max_num_seqs, max_num_batched_tokens, block_size, num_kv_blocks, kv_cache_memory,
    enable_prefix_caching, seed, pipeline_parallel_size, ... With `engine_process=True` the
    engine core runs in its own process behind the same ZMQ client the server uses
    (`engine_transport` "ipc", or "tcp" on 127.0.0.1; tcp needs `zmq_keys`, a CurveZMQ key
    directory made by `pp-engine keys DIR`, or an explicit `insecure_tcp=True`).
    With `data_parallel_size=N` (N > 1), N engine-core processes serve the prompts, each
    request routed to the least loaded one (`engine_core/client/core_client.py`), or with
    `dp_routing="prefix"` to the one holding most of its prompt's prefix;
    `data_parallel_backend="ray"` runs the engines as Ray actors (tcp: needs `zmq_keys` or
    `insecure_tcp`).
    """

    def __init__(self, model: str | None = None, *, engine_process: bool = False,
                 engine_transport: str = "ipc", zmq_keys: str | None = None,
                 insecure_tcp: bool = False, data_parallel_size: int = 1,
                 dp_routing: str = "load", data_parallel_backend: str = "mp",
                 **engine_kwargs: Any) -> None:
        if model is None:
            from engine_core.models import default_model_dir

            model = default_model_dir()
        field_names = {f.name for f in dataclasses.fields(EngineArgs)}
        unknown = sorted(set(engine_kwargs) - field_names)
        if unknown:
            raise ValueError(f"unknown LLM argument(s) {unknown}; "
                             f"valid ones are {sorted(field_names - {'model'})}")
        self.engine_args = EngineArgs(model=model, **engine_kwargs)
        self.config = self.engine_args.resolve()
        self.tokenizer = load_tokenizer(self.config.tokenizer_path)
        dp = DataParallelConfig(size=data_parallel_size, routing=dp_routing,
                                backend=data_parallel_backend)
        self.engine: SyncEngineClient
        if dp.size > 1 or engine_process:  # engine-core process(es) behind one client
            self.engine = SyncEngineCoreClient(make_client(
                self.engine_args, dp, transport=engine_transport, zmq_keys=zmq_keys,
                insecure_tcp=insecure_tcp))
        else:
            executor = make_executor(self.config)
            self.engine = EngineCore(self.config, executor,
                                     proposer=make_proposer(self.config, executor))
        self.input_processor = InputProcessor(self.config, self.tokenizer)
        self._closed = False
        self.processor = OutputProcessor(self.tokenizer)
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The SamplingParams `generate` and `chat` use when given none (vLLM's): the
        `generation_config` defaults (by default the model's generation_config.json:
        temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens as max_tokens),
        SamplingParams' own for the rest."""
        return self.input_processor.default_sampling_params()

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None
                 ) -> list[RequestOutput]:
        """Generate completions for the prompts; outputs come back in input order.

        A prompt is a string or `{"prompt_token_ids": [...]}`. `sampling_params` is one for all
        prompts or one per prompt. `priority` (vLLM's): one int per prompt, lower served first;
        needs `scheduling_policy="priority"` unless all are 0. Every prompt is validated before
        any is started, so a bad one raises ValueError and leaves the engine untouched.
        Each prompt is a user request of its own for fair share (`request_queue.py`).
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        inputs = self.input_processor
        params_list = inputs.params_per_prompt(sampling_params, len(prompts))
        priorities = inputs.priorities_per_prompt(priority, len(prompts))
        requests = [ProcessedRequest(self._process_prompt(p, i), params, prio)
                    for i, (p, params, prio) in enumerate(zip(prompts, params_list, priorities))]
        return self._run(requests, use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, *,
             tools: list[dict[str, Any]] | None = None, chat_template: str | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} messages) or to a
        list of conversations, rendered with the model's chat template (or `chat_template`, a
        Jinja template), which also gets `tools` (OpenAI's function list, as in HF's
        apply_chat_template) and `chat_template_kwargs`, as vLLM's `LLM.chat` passes them. A
        message without content (only an assistant message with tool_calls may omit it), with
        content that is neither a string nor a non-empty list of text parts, or with an unknown
        role raises ValueError naming the field, e.g. "messages[1].content". The output is
        the model's text: constrain it with `SamplingParams.structured_outputs` to force a
        call's JSON."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template; this model directory "
                             "has no tokenizer.json")
        if tools is not None and (not isinstance(tools, list)
                                  or not all(isinstance(t, dict) for t in tools)):
            raise ValueError("tools must be a list of tool dicts "
                             '({"type": "function", "function": {...}})')
        tokenizer = (self.tokenizer if chat_template is None
                     else self.tokenizer.with_chat_template(chat_template))
        single = not isinstance(messages, list) or not messages or not isinstance(
            messages[0], list)
        conversations = [messages] if single else messages
        prompts: list[PromptType] = []
        for k, conversation in enumerate(conversations):
            where = "" if single else f"conversation {k}: "
            try:
                text = tokenizer.apply_chat_template(
                    check_messages(conversation), add_generation_prompt=add_generation_prompt,
                    **{"tools": tools, **(chat_template_kwargs or {})})
            except (ValueError, TypeError, LookupError, ArithmeticError, AttributeError) as exc:
                # the template fails on these messages: a bad argument, as for the server
                raise ValueError(f"{where}{exc}") from None
            prompts.append({"prompt": text, "add_special_tokens": False})
        params_list = self.input_processor.params_per_prompt(sampling_params, len(prompts))
        requests = [ProcessedRequest(self._process_prompt(p, i), params)
                    for i, (p, params) in enumerate(zip(prompts, params_list))]
        return self._run(requests, use_tqdm)

    def _process_prompt(self, prompt: PromptType, index: int) -> ProcessedPrompt:
        try:
            return self.input_processor.process_prompt(prompt)
        except ValueError as exc:
            raise ValueError(f"prompt {index}: {exc}") from None

    def _run(self, requests: list[ProcessedRequest], use_tqdm: bool) -> list[RequestOutput]:
        """Run the requests to completion. Any exception or interrupt (Ctrl-C) aborts every
        request of this call and finishes the steps in flight, so all KV blocks are back and the
        next call works; Ctrl-C is taken between engine steps (twice: at once)."""
        request_ids: list[str] = []
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(requests), desc="Processed prompts", dynamic_ncols=True,
                   disable=not use_tqdm)
        start, num_output_tokens = time.perf_counter(), 0
        try:
            with DeferredInterrupt() as interrupt:
                for request in requests:
                    request_id = str(next(self._request_counter))
                    core_requests = self.input_processor.make_requests(
                        request_id, request, arrival_time=time.time())
                    self.processor.add_request(request_id, request.prompt.text, core_requests)
                    request_ids.append(request_id)
                    self.engine.add_requests(core_requests)
                while len(finished) < len(request_ids):
                    core_outputs = self.engine.step()
                    num_output_tokens += sum(len(o.new_token_ids) for o in core_outputs)
                    changed, to_abort = self.processor.process(core_outputs)
                    if to_abort:
                        self.engine.abort_requests(to_abort)
                    for output in changed:
                        if output.finished:
                            finished[output.request_id] = output
                            bar.update(1)
                    if use_tqdm:
                        rate = num_output_tokens / max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(f"output {rate:.1f} toks/s", refresh=False)
                    interrupt.check()
        except BaseException:
            self._abort(request_ids)
            raise
        finally:
            bar.close()
        return [finished[request_id] for request_id in request_ids]

    def _abort(self, request_ids: list[str]) -> None:
        """Abort these requests, then finish the engine's steps in flight (their outputs all
        belong to aborted requests) so every block is back in the pool."""
        for request_id in request_ids:
            core_ids = self.processor.core_request_ids(request_id)
            self.processor.abort_request(request_id)
            self.engine.abort_requests(core_ids)
        with contextlib.suppress(Exception):  # a dead engine has nothing in flight
            while self.engine.has_unfinished_requests():
                self.engine.step()

    def get_metrics(self) -> list[Metric]:
        """The engine's figures now, as vLLM's `LLM.get_metrics()` gives them: one `Counter`
        or `Gauge` per series, named and labelled as the server's `GET /metrics` names them
        (`engine_metrics.ENGINE_METRICS`: requests running and waiting, free and total KV
        blocks, prompt tokens computed, KV transfer, ...), summed over the data-parallel
        engines. With the engine in other processes the figures are the last they reported."""
        return read_engine_metrics(self.engine.stats(), {"model_name": self.engine_args.model})

    # ---- lifecycle ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Release the engine and its stages. Idempotent."""
        if getattr(self, "_closed", True):  # closed, or __init__ never got an engine
            return
        self._closed = True
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.shutdown()
