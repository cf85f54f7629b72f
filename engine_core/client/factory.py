"""`make_client`: the one way a front-end gets a client of its engine-core processes."""

from __future__ import annotations

from engine_core.client.core_client import EngineCoreClient
from engine_core.config import DataParallelConfig, EngineArgs

__all__ = ["make_client"]


def make_client(engine_args: EngineArgs, data_parallel: DataParallelConfig | None = None, *,
                transport: str = "ipc", host: str = "127.0.0.1", zmq_keys: str | None = None,
                insecure_tcp: bool = False) -> EngineCoreClient:
    """A client of the engine cores `engine_args` and `data_parallel` ask for, not started yet:
    `await client.start(timeout_s)` (AsyncLLM), or hand it to `sync.SyncEngineCoreClient`
    (LLM), which starts it.

    One engine (no `data_parallel`, or one of size 1 with no remote rank and no rpc port): a
    local engine-core process; its sockets are ipc, or with `transport="tcp"` tcp on `host`.
    Otherwise N engines as `data_parallel` says (local processes or Ray actors, and remote
    ranks; tcp on its `address` as soon as one is remote). Over tcp the sockets are CurveZMQ
    with the `zmq_keys` directory, or unsecured only with `insecure_tcp`.

    ValueError for a bad transport or data-parallel flags, tcp without keys, or an unreadable
    key directory."""
    dp = data_parallel
    if dp is None or not (dp.size > 1 or dp.has_remote or dp.rpc_port is not None):
        dp = DataParallelConfig(address=host)
    return EngineCoreClient(engine_args, dp, transport=transport, zmq_keys=zmq_keys,
                            insecure_tcp=insecure_tcp)
