"""The engine core: the two-stage engine loop over the scheduler and an executor.

Execution is split into *submit* (returns a future at once) and *finish* (wait for the oldest
future, then update the scheduler). Filling the pipeline has priority over collecting:

    while len(in_flight) < max_concurrent_batches and (batch := scheduler.schedule()):
        in_flight.append((batch, executor.submit(batch)))       # submit
    batch, future = in_flight.popleft()                         # finish the oldest
    outputs = scheduler.update(batch, future.result(timeout))

One thread drives it: the caller adds requests and aborts between calls to `step()`.

Failures are kept to their owner. A request that fails on its own (its sampling row raised, a
stage found its inputs out of range, or its returned token broke an invariant, see
`invariants.py`) finishes with finish_reason "error" and the batch goes on; only a failed step
(a stage down, a timeout, a malformed output) fails the engine. An interrupt (KeyboardInterrupt,
or any non-`Exception`) raised inside `step()` leaves the engine sound: a step being waited for
stays in flight and is finished by the next call, and a batch whose submission was cut short is
cancelled (its requests aborted, its blocks returned once nothing of theirs is in flight).
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from engine_core.block_manager import KVBlockManager
from engine_core.config import EngineConfig
from engine_core.executor import Executor, StepFuture
from engine_core.grammars import COMPILE_TIMEOUT_S, GrammarCompiler
from engine_core.invariants import checked_step_output
from engine_core.messages import (
    EngineCoreOutput,
    EngineCoreRequest,
    SchedulerStats,
    StepBatch,
    StructuredOutputStats,
)
from engine_core.ngram_proposer import NgramProposer
from engine_core.proposer import Proposer
from engine_core.request import Request
from engine_core.scheduler import Scheduler
from engine_core.validation import validate_core_request, validate_kv_transfer

if TYPE_CHECKING:
    from engine_core.kv_connector import KVConnectorBase

DEFAULT_STEP_TIMEOUT_S = 600.0
GRAMMAR_POLL_S = 0.005  # how long an otherwise idle step waits for a grammar being compiled


@dataclass
class LoopStats:
    """Where the loop's time goes: `wait_s` blocked on a step's future, `submit_s` handing steps
    to the executor (with the in-process executor that is the model's compute itself), and the
    driver's own work: `schedule_s` in the scheduler, `update_s` applying outputs."""

    num_steps: int = 0
    total_s: float = 0.0
    wait_s: float = 0.0
    submit_s: float = 0.0
    schedule_s: float = 0.0
    update_s: float = 0.0

    @property
    def overhead_per_step_s(self) -> float:
        """Everything but waiting, per step (with a remote executor: the driver's time)."""
        return (self.total_s - self.wait_s) / max(self.num_steps, 1)

    @property
    def driver_share(self) -> float:
        """The scheduler's and output update's share of the loop's time, whatever executor runs
        the model (issue 11's target: <= 5 % at 64 running requests)."""
        return (self.schedule_s + self.update_s) / max(self.total_s, 1e-9)


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor,
                 step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
                 kv_connector: KVConnectorBase | None = None,
                 proposer: Proposer | None = None) -> None:
        """Drive `executor` (built for `config`, e.g. by `executors.make_executor`); the engine
        owns it from here on and shuts it down, also when this constructor raises.
        `kv_connector`: disaggregated prefill/decode (`engine_core.kv_connector`); None: off.
        `proposer`: speculative decoding's drafts when `config.speculative` is set; None builds
        the n-gram proposer (a draft model's comes from `executors.make_proposer`, for this
        executor's KV blocks). The engine owns and shuts it down too."""
        self.config = config
        self.executor = executor
        self.kv_connector = kv_connector
        spec = config.speculative
        if spec is not None and proposer is None:
            if spec.method != "ngram":
                executor.shutdown()
                raise ValueError(f"speculative_config method {spec.method!r} needs its "
                                 f"proposer (executors.make_proposer)")
            assert spec.prompt_lookup_min is not None and spec.prompt_lookup_max is not None
            proposer = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
        self.proposer = proposer if spec is not None else None
        cache, sched = config.cache, config.scheduler
        blocks_per_max_request = math.ceil(sched.max_model_len / cache.block_size)
        if self.executor.num_kv_blocks - 1 < blocks_per_max_request:
            self.executor.shutdown()
            if self.proposer is not None:
                self.proposer.shutdown()
            raise ValueError(
                f"the KV cache holds {self.executor.num_kv_blocks - 1} blocks of "
                f"{cache.block_size} tokens, too few for one request of "
                f"max_model_len={sched.max_model_len} tokens "
                f"({blocks_per_max_request} blocks); raise num_kv_blocks/kv_cache_memory or "
                f"lower max_model_len")
        self.block_manager = KVBlockManager(self.executor.num_kv_blocks, cache.block_size,
                                            cache.enable_prefix_caching)
        self.scheduler = Scheduler(sched, self.block_manager, spec, self.proposer)
        if kv_connector is not None:  # it tells senders whether a pushed transfer fits
            kv_connector.set_free_blocks(self.block_manager.num_free_blocks)
        self.in_flight: deque[tuple[StepBatch, StepFuture]] = deque()
        self.step_timeout_s = step_timeout_s
        self.error: BaseException | None = None  # set once a step failed: the engine is dead
        self.loop_stats = LoopStats()
        self._pending_outputs: list[EngineCoreOutput] = []  # to return with the next step
        self._stalled = False  # the last step found waiting requests but could schedule nothing
        # Structured outputs: the compiler (made on the first constrained request) and the
        # requests whose grammar is being compiled, off the loop: (request, compile, deadline).
        self.grammars: GrammarCompiler | None = None
        self._compiling: dict[str, tuple[Request, concurrent.futures.Future, float]] = {}

    def add_request(self, core_request: EngineCoreRequest) -> None:
        """Queue a request. ValueError (naming the field) if it is invalid for this model; the
        engine is then untouched."""
        validate_core_request(core_request, self.config)
        kv_config = None if self.kv_connector is None else self.kv_connector.kv_config
        validate_kv_transfer(core_request, kv_config, self.config.cache.block_size)
        request = Request(core_request, self.config.scheduler.max_model_len)
        constraint = core_request.sampling_params.structured_outputs
        if constraint is None:
            self.scheduler.add_request(request)
        else:  # queued once its grammar is compiled (`_admit_compiled`)
            if request.request_id in self.scheduler.requests or \
                    request.request_id in self._compiling:
                raise ValueError(f"request_id {request.request_id!r} is already in use")
            if self.grammars is None:
                self.grammars = GrammarCompiler(self.config.tokenizer_path,
                                                self.config.model.vocab_size)
            self._compiling[request.request_id] = (
                request, self.grammars.compile(constraint), time.monotonic() + COMPILE_TIMEOUT_S)
        self._stalled = False

    def _admit_compiled(self) -> None:
        """Queue the requests whose grammar is ready, each with its own matcher; a grammar that
        failed, or is not ready by its deadline, fails its request alone."""
        now = time.monotonic()
        for request_id, (request, future, deadline) in list(self._compiling.items()):
            if not future.done() and now < deadline:
                continue
            del self._compiling[request_id]
            assert self.grammars is not None
            constraint = request.sampling_params.structured_outputs
            assert constraint is not None
            error = None
            if not future.done():
                self.grammars.forget(constraint)
                error = (f"structured_outputs.{constraint.kind} took longer than "
                         f"{COMPILE_TIMEOUT_S:g} s to compile")
            elif future.exception() is not None:
                error = str(future.exception())
            if error is not None:
                self._pending_outputs.append(EngineCoreOutput(
                    request_id, [], finish_reason="error", error=error))
                continue
            spec = self.config.speculative
            request.grammar = self.grammars.matcher(
                future.result(), request.grammar_stop_ids,
                max_rollback_tokens=spec.num_speculative_tokens if spec is not None else 0)
            self.scheduler.add_request(request)

    def _wait_for_grammars(self) -> None:
        """Nothing to compute but grammars being compiled: wait a little for one (no spin)."""
        futures = [future for _, future, _ in self._compiling.values()]
        concurrent.futures.wait(futures, timeout=GRAMMAR_POLL_S,
                                return_when=concurrent.futures.FIRST_COMPLETED)

    def add_requests(self, core_requests: list[EngineCoreRequest]) -> None:
        """Queue the sequences of one user request (see `client/base.py`)."""
        for core_request in core_requests:
            self.add_request(core_request)

    def abort_requests(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._compiling.pop(request_id, None)
        self.scheduler.abort_requests(request_ids)
        self._stalled = False

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished_requests() or bool(self.in_flight)
                or bool(self._pending_outputs) or bool(self._compiling))

    def needs_compute(self) -> bool:
        """True if `step()` has model work to do now (or outputs to hand back). Waiting requests
        that could not be scheduled because KV transfers hold the blocks do not count: they
        wait for `has_kv_transfers` to change something."""
        s = self.scheduler
        return bool(self.in_flight or self._pending_outputs or s.running or self._compiling
                    or (s.waiting and not self._stalled))

    def has_kv_transfers(self) -> bool:
        """True while KV is on its way in (requests waiting for it) or held for a decoder
        (leases): `step()` must still be called now and then to finish them."""
        return self.kv_connector is not None and bool(
            self.scheduler.waiting_for_kv or self.scheduler.kv_held)

    def step(self) -> list[EngineCoreOutput]:
        """One turn of the loop: fill the pipeline, then finish the oldest batch in flight.

        If a stage fails, dies or times out, every request is dropped (its blocks freed) and
        `RuntimeError` is raised, now and on every later call: the engine is dead."""
        if self.error is not None:
            raise RuntimeError(f"the engine has failed: {self.error}") from self.error
        start = time.perf_counter()
        if self._compiling:
            self._admit_compiled()
        if self.kv_connector is not None:
            self.kv_connector.before_step(self.scheduler)
        try:
            max_in_flight = self.config.scheduler.max_concurrent_batches
            while len(self.in_flight) < max_in_flight:
                schedule_start = time.perf_counter()
                batch = self.scheduler.schedule()
                submit_start = time.perf_counter()
                self.loop_stats.schedule_s += submit_start - schedule_start
                if batch is None:
                    break
                self.in_flight.append((batch, self._submit(batch)))
                self.loop_stats.submit_s += time.perf_counter() - submit_start
            s = self.scheduler
            self._stalled = not self.in_flight and bool(s.waiting)
            if not self.in_flight:
                # blocks held for or by KV transfers come back by themselves; else stuck for good
                if s.has_unfinished_requests() and not (s.waiting_for_kv or s.kv_held):
                    raise RuntimeError(
                        f"the scheduler can make no progress: {s.num_running} running and "
                        f"{s.num_waiting} waiting requests, nothing in flight, "
                        f"{self.block_manager.num_free_blocks} free KV blocks")
                if self._compiling and not self._pending_outputs:
                    self._wait_for_grammars()
                return self._take_pending()
            batch, future = self.in_flight.popleft()
            wait_start = time.perf_counter()
            try:
                output = future.result(timeout=self.step_timeout_s)
            except BaseException as exc:
                if not isinstance(exc, Exception):  # interrupted: the step itself still runs
                    self.in_flight.appendleft((batch, future))
                raise
            self.loop_stats.wait_s += time.perf_counter() - wait_start
            output = checked_step_output(batch, output, self.scheduler.requests,
                                         self.config.model.vocab_size)
        except Exception as exc:
            self.error = exc
            self.in_flight.clear()
            self.scheduler.drop_all()
            raise RuntimeError(str(exc)) from exc
        update_start = time.perf_counter()
        outputs = self._take_pending() + self.scheduler.update(batch, output)
        if self.kv_connector is not None:
            self.kv_connector.after_step(self.scheduler, outputs)
        end = time.perf_counter()
        self.loop_stats.update_s += end - update_start
        self.loop_stats.num_steps += 1
        self.loop_stats.total_s += end - start
        return outputs

    def _submit(self, batch: StepBatch) -> StepFuture:
        try:
            return self.executor.submit(batch)
        except BaseException as exc:
            if not isinstance(exc, Exception):  # interrupted mid-submit: the batch never ran
                self._pending_outputs.extend(self.scheduler.cancel_step(batch))
            raise

    def _take_pending(self) -> list[EngineCoreOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        return outputs

    def stats(self) -> SchedulerStats:
        """The engine's figures now: load, KV blocks, counters since start, and its KV
        connector's (zero without one). The one place they are read; the process, the clients
        and the metrics only carry and sum this message."""
        scheduler, blocks = self.scheduler, self.block_manager
        stats = SchedulerStats(
            num_running=scheduler.num_running, num_waiting=scheduler.num_waiting,
            num_free_blocks=blocks.num_free_blocks, num_total_blocks=blocks.num_usable_blocks,
            num_preemptions=scheduler.num_preemptions,
            num_prompt_tokens_computed=scheduler.num_prompt_tokens_computed,
            spec_decode=msgspec.structs.replace(scheduler.spec_stats),  # a copy
            structured_outputs=(StructuredOutputStats() if self.grammars is None
                                else msgspec.structs.replace(self.grammars.stats)))
        if self.kv_connector is not None:
            stats.kv_transfer = self.kv_connector.stats()
        return stats

    def shutdown(self) -> None:
        self._compiling.clear()
        if self.grammars is not None:
            self.grammars.shutdown()
        self.in_flight.clear()
        self.scheduler.drop_all()
        if self.kv_connector is not None:
            self.kv_connector.shutdown()
        if self.proposer is not None:
            self.proposer.shutdown()
        self.executor.shutdown()

