"""KV transfer between a prefill and a decode engine in one process (issues 10 and 12): each send
type (GET, PUT, PUT_ASYNC), without and with CurveZMQ, several requests in flight at once.

For each case one P and one D engine are built. P prefills `--requests` prompts of
`--prompt-len` tokens in one step (max_tokens=1; the token budget is raised so they finish
together); as soon as P returns them, D gets all of them at once and decodes one token each.
Two warm-up rounds (P computes the prompts, sockets and CURVE handshakes are set up, kernels
are compiled for D's batch shapes), then `--rounds` measured rounds (P's prompts come from its
prefix cache, so a round is the transfer and D's tails); medians are reported:

- hand-over: wall time from P's step having computed every prompt (its `after_step`, where
  the KV is lent or pushed) to D having written the last transfer into its blocks; KV MB/s and
  ms per 1,000 tokens from it. PUT includes P's push from its engine loop; PUT_ASYNC's push
  runs beside it; GET's pull starts when D has the requests.
- work: the connector's own timers (reading blocks, framing, sockets, writing blocks), summed
  over transfers and both sides, per 1,000 tokens (the figure of issue 10's table).
- P after_step: how long P's engine loop spent lending (and, with PUT, pushing) the KV.
- D TTFT: from D getting the requests to each one's first token (mean and max), against D
  computing the same prompts itself (one fresh engine, the same concurrency).

Then the encryption cost per send type: hand-over MB/s without CurveZMQ / with it.

    python bench/kv_transfer.py [--prompt-len 1024] [--requests 8] [--rounds 5]
                                [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_core.executors.inprocess import InProcessExecutor

from bench.common import Workload, standard_model_dir
from engine_core.config import EngineArgs
from engine_core.engine import EngineCore
from engine_core.kv_transfer.connector import KVConnector
from engine_core.kv_transfer_config import KVTransferConfig
from engine_core.messages import EngineCoreRequest
from engine_core.sampling_params import SamplingParams
from engine_core.transfer_params import KVTransferParams
from engine_core.transport import create_keys

SEND_TYPES = ("GET", "PUT", "PUT_ASYNC")
GREEDY = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(model_dir: str, dtype: str, budget: int, role: str | None, send_type: str,
            zmq_keys: str | None) -> EngineCore:
    config = EngineArgs(model=model_dir, dtype=dtype, max_model_len=2048, num_kv_blocks=1024,
                        max_num_batched_tokens=budget).resolve()
    executor = InProcessExecutor(config)
    connector = None
    if role is not None:
        kv = KVTransferConfig(kv_role=role, kv_port=_port(), proxy_address="127.0.0.1:1",
                              send_type=send_type, kv_buffer_size=4e9)
        connector = KVConnector(config, kv, executor.kv_stages(), zmq_keys=zmq_keys)
    return EngineCore(config, executor, kv_connector=connector)


def _run(engine: EngineCore, requests: list[EngineCoreRequest]) -> tuple[dict, dict]:
    """Add the requests, step until each finished: (final outputs, first-token times)."""
    for r in requests:
        engine.add_request(r)
    final, first_token_at = {}, {}
    deadline = time.monotonic() + 600
    while len(final) < len(requests):
        if time.monotonic() > deadline:
            raise TimeoutError("the engine did not finish in 600 s")
        for out in engine.step():
            first_token_at.setdefault(out.request_id, time.perf_counter())
            if out.finish_reason is not None:
                final[out.request_id] = out
        if not engine.in_flight:
            time.sleep(0.0005)
    return final, first_token_at


class _StepClock:
    """Times P's `after_step` (where finished prefills' KV is lent or pushed): when the last one
    began and how long it took."""

    def __init__(self, connector: KVConnector) -> None:
        self.started = self.seconds = 0.0
        inner = connector.after_step

        def after_step(scheduler, outputs) -> None:
            self.started = time.perf_counter()
            inner(scheduler, outputs)
            self.seconds = time.perf_counter() - self.started

        connector.after_step = after_step


def _when_received(connector: KVConnector, num_tokens: int, stop: threading.Event) -> list:
    """A thread that notes when D's connector has written `num_tokens` tokens' KV (polled every
    millisecond); the time lands in the returned list."""
    landed: list[float] = []

    def watch() -> None:
        while not stop.is_set():
            if connector.stats.received_tokens >= num_tokens:
                landed.append(time.perf_counter())
                return
            time.sleep(0.001)

    threading.Thread(target=watch, daemon=True).start()
    return landed


@dataclass
class Round:
    nbytes: int
    tokens: int
    handover_s: float
    work_s: float
    p_step_s: float
    ttft_s: list[float]
    prompt_tokens_computed: int


def _round(p: EngineCore, d: EngineCore, prompts: list[list[int]], send_type: str,
           tag: str, clock: _StepClock) -> Round:
    """P prefills every prompt, then D takes their KV and decodes one token each."""
    pc, dc = p.kv_connector, d.kv_connector
    before = (pc.stats.seconds + dc.stats.seconds, dc.stats.received_bytes,
              dc.stats.received_tokens, d.scheduler.num_prompt_tokens_computed)
    requests = []
    for i, prompt in enumerate(prompts):
        target = None if send_type == "GET" else KVTransferParams(
            dc.endpoint, [], 0, dc.compat_hash, f"{tag}-{i}", send_type)
        requests.append(EngineCoreRequest(f"{tag}-{i}", prompt, GREEDY, do_remote_decode=True,
                                          kv_transfer_params=target))
    final, _ = _run(p, requests)
    tokens = sum(out.kv_transfer_params.num_tokens for out in final.values())
    stop = threading.Event()
    landed = _when_received(dc, before[2] + tokens, stop)
    start = time.perf_counter()
    _, first = _run(d, [EngineCoreRequest(rid, prompts[int(rid.rsplit("-", 1)[1])], GREEDY,
                                          kv_transfer_params=out.kv_transfer_params)
                        for rid, out in final.items()])
    stop.set()
    if dc.stats.received_tokens - before[2] != tokens:
        raise RuntimeError(f"D received {dc.stats.received_tokens - before[2]} of {tokens} "
                           f"tokens' KV ({send_type}): a transfer failed")
    return Round(nbytes=dc.stats.received_bytes - before[1], tokens=tokens,
                 handover_s=landed[0] - clock.started,
                 work_s=pc.stats.seconds + dc.stats.seconds - before[0],
                 p_step_s=clock.seconds, ttft_s=[t - start for t in first.values()],
                 prompt_tokens_computed=d.scheduler.num_prompt_tokens_computed - before[3])


def _case(model_dir: str, args: argparse.Namespace, prompts: list[list[int]], send_type: str,
          zmq_keys: str | None) -> list[Round]:
    budget = max(2048, args.requests * args.prompt_len)
    p = _engine(model_dir, args.dtype, budget, "kv_producer", send_type, zmq_keys)
    try:
        d = _engine(model_dir, args.dtype, budget, "kv_consumer", send_type, zmq_keys)
    except BaseException:
        p.shutdown()
        raise
    try:
        clock = _StepClock(p.kv_connector)
        for i in range(2):  # P computes the prompts; both compile their kernels for D's shapes
            _round(p, d, prompts, send_type, f"warmup{i}", clock)
        return [_round(p, d, prompts, send_type, f"round{i}", clock) for i in range(args.rounds)]
    finally:
        p.shutdown()
        d.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    model_dir = standard_model_dir()
    prompts = Workload(args.requests, args.prompt_len, 1).prompts(32000)

    local = _engine(model_dir, args.dtype, max(2048, args.requests * args.prompt_len), None,
                    "GET", None)
    try:
        start = time.perf_counter()
        _, first = _run(local, [EngineCoreRequest(f"l{i}", p, GREEDY)
                                for i, p in enumerate(prompts)])
        local_ttft = [t - start for t in first.values()]
    finally:
        local.shutdown()
    print(f"model {model_dir}, dtype {args.dtype}: {args.requests} requests x {args.prompt_len} "
          f"tokens in flight together; medians of {args.rounds} rounds after 2 warm-ups")
    print(f"D computing the prompts itself: first tokens after "
          f"{statistics.mean(local_ttft) * 1000:.0f} ms mean, {max(local_ttft) * 1000:.0f} ms max")
    print()
    print("| send type | CurveZMQ | KV moved | hand-over | MB/s | ms per 1,000 tokens | work ms "
          "per 1,000 tokens | P after_step | D TTFT mean / max | D prompt tokens computed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rates: dict[tuple[str, bool], float] = {}
    with tempfile.TemporaryDirectory() as keys_dir:
        create_keys(keys_dir)
        for curve in (False, True):
            for send_type in SEND_TYPES:
                rounds = _case(model_dir, args, prompts, send_type, keys_dir if curve else None)
                med = {name: statistics.median(getattr(r, name) for r in rounds)
                       for name in ("handover_s", "work_s", "p_step_s")}
                mb = rounds[0].nbytes / 1e6
                tokens = rounds[0].tokens
                ttft = [statistics.median(r.ttft_s[i] for r in rounds)
                        for i in range(len(rounds[0].ttft_s))]
                rates[send_type, curve] = mb / med["handover_s"]
                print(f"| {send_type} | {'on' if curve else 'off'} | {mb:.1f} MB | "
                      f"{med['handover_s'] * 1000:.1f} ms | {rates[send_type, curve]:.0f} | "
                      f"{med['handover_s'] * 1e6 / tokens:.2f} | "
                      f"{med['work_s'] * 1e6 / tokens:.2f} | {med['p_step_s'] * 1000:.1f} ms | "
                      f"{statistics.mean(ttft) * 1000:.0f} / {max(ttft) * 1000:.0f} ms | "
                      f"{rounds[0].prompt_tokens_computed} |", flush=True)
    print()
    print("CurveZMQ cost (hand-over MB/s without / with): " + ", ".join(
        f"{s} {rates[s, False] / rates[s, True]:.2f}x" for s in SEND_TYPES))


if __name__ == "__main__":
    main()
