"""`AsyncLLM`: the asyncio front-end the server uses; the engine core runs in its own process.

Tokenization, incremental detokenization, stop strings and output assembly happen here; the
engine-core process only sees token ids (over ZMQ, msgspec messages; see
`client/core_client.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from engine_core.client.base import AsyncEngineClient
from engine_core.client.factory import make_client
from engine_core.config import DataParallelConfig, EngineArgs, EngineConfig
from engine_core.entrypoints.input_processor import (
    InputProcessor,
    ProcessedRequest,
    PromptType,
)
from engine_core.entrypoints.output_processor import OutputProcessor
from engine_core.messages import EngineCoreOutputs, SchedulerStats
from engine_core.models import Tokenizer, load_tokenizer
from engine_core.outputs import RequestOutput
from engine_core.sampling_params import SamplingParams
from engine_core.transfer_params import KVTransferParams


class EngineDeadError(RuntimeError):
    """The engine-core process died or failed; no request can be served any more."""


@dataclass
class _Stream:
    queue: asyncio.Queue
    core_ids: list[str]


class AsyncLLM:
    """Async generation over an engine-core process.

        llm = await AsyncLLM.create(EngineArgs(model=...))
        async for output in llm.generate("Hello", SamplingParams(max_tokens=16), "req-1"):
            ...   # cumulative RequestOutput snapshots; the last one has finished=True
        llm.shutdown()
    """

    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None,
                 client: AsyncEngineClient) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.client = client
        self.input_processor = InputProcessor(config, tokenizer)
        self.processor = OutputProcessor(tokenizer)
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self.stats = SchedulerStats()
        self.error: BaseException | None = None
        self.num_restarts = 0
        self._dead = asyncio.Event()
        self._output_task: asyncio.Task | None = None
        # Starts a fresh engine core like the first one (set by `create`); see `restart`.
        self._start_client: Callable[[], Awaitable[AsyncEngineClient]] | None = None

    @classmethod
    async def create(cls, engine_args: EngineArgs, *, transport: str = "ipc",
                     host: str = "127.0.0.1", startup_timeout_s: float = 600.0,
                     zmq_keys: str | None = None, insecure_tcp: bool = False,
                     data_parallel: DataParallelConfig | None = None) -> AsyncLLM:
        """Resolve the config, spawn the engine-core process and wait until it is READY.
        `transport` is "ipc" (a private temp dir) or "tcp" (on `host`: CurveZMQ with the
        `zmq_keys` directory, or unsecured only with `insecure_tcp`). With `data_parallel`
        (more than one engine, or remote ones), N engine cores serve behind this one front-end
        (`client/core_client.py`); everything else is unchanged."""
        config = engine_args.resolve()
        tokenizer = load_tokenizer(config.tokenizer_path)

        async def start_client() -> AsyncEngineClient:
            client = make_client(engine_args, data_parallel, transport=transport, host=host,
                                 zmq_keys=zmq_keys, insecure_tcp=insecure_tcp)
            await client.start(startup_timeout_s)
            return client

        llm = cls(config, tokenizer, await start_client())
        llm._start_client = start_client
        llm._output_task = asyncio.get_running_loop().create_task(llm._pump_outputs())
        return llm

    # ---- status -------------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self.error is None and self.client.is_alive()

    def check_health(self) -> None:
        """Raise EngineDeadError if the engine core is down."""
        if self.error is not None:
            raise EngineDeadError(str(self.error))
        if not self.client.is_alive():
            raise EngineDeadError("the engine-core process is not running")

    async def wait_until_dead(self) -> BaseException:
        """Wait until the engine core has died or failed (the output pump set `error`), and
        return that error. Returns at once if it is dead already."""
        await self._dead.wait()
        assert self.error is not None
        return self.error

    async def restart(self) -> None:
        """Replace a dead engine core with a fresh one behind this same AsyncLLM.

        The old engine-core process is stopped and reaped first (its requests have already
        failed with EngineDeadError); new requests are served once this returns. Raises
        RuntimeError if the engine is not dead or was not made by `create`, and whatever
        `EngineCoreClient.start` raises if the new engine core does not come up (the AsyncLLM
        then stays dead)."""
        if self.error is None:
            raise RuntimeError("restart() needs a dead engine core; this one is running")
        if self._start_client is None:
            raise RuntimeError("restart() needs an AsyncLLM made by AsyncLLM.create")
        if self._output_task is not None:
            self._output_task.cancel()
            self._output_task = None
        # Reap the old process off the event loop (a failed engine that is still alive is given
        # its shutdown grace period, then killed); then close its sockets here, on the loop.
        await asyncio.to_thread(self.client.stop_engines)
        self.client.shutdown()
        self.client = await self._start_client()
        self.processor = OutputProcessor(self.tokenizer)
        self.stats = SchedulerStats()
        self.num_restarts += 1
        self.error = None
        self._dead.clear()
        self._output_task = asyncio.get_running_loop().create_task(self._pump_outputs())

    # ---- requests -----------------------------------------------------------------------------
    async def generate(self, prompt: PromptType, sampling_params: SamplingParams,
                       request_id: str | None = None, *, add_special_tokens: bool = True,
                       do_remote_decode: bool = False,
                       kv_transfer_params: KVTransferParams | None = None,
                       priority: int = 0, owner_id: str | None = None
                       ) -> AsyncGenerator[RequestOutput, None]:
        """Stream cumulative snapshots of the request's output; the last has `finished=True`.

        `prompt`: text, token ids or a prompt dict (`input_processor.PromptType`). `priority`
        (vLLM's): lower is served first; non-zero needs an engine with scheduling_policy
        "priority". `owner_id`: the user request this prompt belongs to, for fair share (the
        server passes one id for every prompt of a request); default: its own.

        Disaggregated prefill/decode (an engine with a KV transfer config): `do_remote_decode`
        keeps the prompt's KV for a decode instance (the final output carries its
        `kv_transfer_params`); `kv_transfer_params` (from a prefill instance; with PUT, on the
        prefill side, where to push) goes to the first sequence, the others compute the prompt.

        ValueError for a bad prompt or parameters (before anything is sent). Closing or
        cancelling the iterator (a client disconnect) aborts the request and frees its KV blocks.
        EngineDeadError if the engine core dies meanwhile."""
        self.check_health()
        request = self.input_processor.process(prompt, sampling_params, priority,
                                               add_special_tokens)
        outputs = self.generate_processed(request, request_id, do_remote_decode=do_remote_decode,
                                          kv_transfer_params=kv_transfer_params,
                                          owner_id=owner_id)
        async with contextlib.aclosing(outputs):  # closing this iterator aborts the request
            async for output in outputs:
                yield output

    async def generate_processed(self, request: ProcessedRequest, request_id: str | None = None,
                                 *, do_remote_decode: bool = False,
                                 kv_transfer_params: KVTransferParams | None = None,
                                 owner_id: str | None = None
                                 ) -> AsyncGenerator[RequestOutput, None]:
        """`generate` for a request the caller has already checked with `input_processor` (the
        server does, to answer each bad field with its own 400): nothing is checked again
        here."""
        self.check_health()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        core_requests = self.input_processor.make_requests(
            request_id, request, arrival_time=time.time(), owner_id=owner_id or "",
            do_remote_decode=do_remote_decode, kv_transfer_params=kv_transfer_params)
        self.processor.add_request(request_id, request.prompt.text, core_requests)
        stream = _Stream(asyncio.Queue(), [r.request_id for r in core_requests])
        self._streams[request_id] = stream
        finished = False
        try:
            self.client.add_requests(core_requests)  # all n sequences: one engine
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    break
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._abort(request_id, stream.core_ids)

    async def abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            final = self._abort(request_id, stream.core_ids)
            if final is not None:
                stream.queue.put_nowait(_snapshot(final))

    def _abort(self, request_id: str, core_ids: list[str]) -> RequestOutput | None:
        """Abort in the core; returns the request's final output (finish_reason "abort")."""
        final = self.processor.abort_request(request_id)
        if self.error is None:
            self.client.abort_requests(core_ids)
        return final

    # ---- the output pump ----------------------------------------------------------------------
    async def _pump_outputs(self) -> None:
        """Receive engine-core outputs, turn them into RequestOutputs, wake the streams."""
        try:
            while True:
                batch: EngineCoreOutputs = await self.client.get_outputs()
                self.stats = self.client.stats()
                changed, to_abort = self.processor.process(batch.outputs)
                if to_abort:
                    self.client.abort_requests(to_abort)
                for output in changed:
                    stream = self._streams.get(output.request_id)
                    if stream is not None:
                        stream.queue.put_nowait(_snapshot(output))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the engine is gone: fail every open stream
            self.error = exc if isinstance(exc, EngineDeadError) else EngineDeadError(str(exc))
            for stream in self._streams.values():
                stream.queue.put_nowait(self.error)
            self._dead.set()

    def shutdown(self) -> None:
        """Stop the engine-core process. Idempotent."""
        if self._output_task is not None:
            self._output_task.cancel()
            self._output_task = None
        self.client.shutdown()


def _snapshot(output: RequestOutput) -> RequestOutput:
    """A copy the consumer can keep while the processor goes on updating the original."""
    snap = copy.copy(output)
    snap.outputs = []
    for completion in output.outputs:
        c = copy.copy(completion)
        c.token_ids = list(completion.token_ids)
        if completion.logprobs is not None:
            c.logprobs = list(completion.logprobs)
        snap.outputs.append(c)
    return snap

