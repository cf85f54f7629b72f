"""`pp-engine serve --headless`: data-parallel engine cores for a head on another host.

Starts `--data-parallel-size-local` engine-core processes with ranks R..R+L-1 (R is
`--data-parallel-start-rank`) and no API server. Each connects to the head's handshake socket at
`--data-parallel-address:--data-parallel-rpc-port` over tcp (CurveZMQ with `--zmq-keys`; without
keys only with `--insecure-tcp`), runs its own engine arguments (the head refuses it, naming the
field, if they differ from its own), and exits when the head is gone (the connection drops) or
tells it to stop. This process exits when its engines have: 0 if all stopped cleanly, else 1.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys

import msgspec

from engine_core.client.core_process import run_engine_core
from engine_core.config import DataParallelConfig, EngineArgs
from engine_core.transport import require_keys_for_tcp

__all__ = ["run_headless"]

logger = logging.getLogger(__name__)


def _engine_main(handshake_address: str, rank: int, zmq_keys: str | None,
                 engine_args: bytes) -> None:
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s engine-dp{rank}: %(message)s")
    sys.exit(run_engine_core(handshake_address, rank, zmq_keys, engine_args,
                             watch_front_end=True))


def run_headless(engine_args: EngineArgs, dp: DataParallelConfig, zmq_keys: str | None,
                 insecure_tcp: bool) -> int:
    """Run the local ranks until they exit; returns the exit code. ValueError for bad flags."""
    if dp.rpc_port is None:
        raise ValueError("--headless needs --data-parallel-rpc-port: the head's handshake port")
    if dp.local < 1:
        raise ValueError("--headless needs --data-parallel-size-local (-dpl) >= 1")
    require_keys_for_tcp("tcp", zmq_keys, insecure_tcp)
    engine_args.resolve()  # fail fast on bad arguments
    address = f"tcp://{dp.address}:{dp.rpc_port}"
    payload = msgspec.msgpack.encode(engine_args)
    spawn = multiprocessing.get_context("spawn")
    processes = [spawn.Process(target=_engine_main, name=f"pp-engine-core-dp{rank}",
                               args=(address, rank, zmq_keys, payload))
                 for rank in range(dp.start_rank, dp.start_rank + dp.local)]

    def stop(signum: int, frame: object) -> None:
        for process in processes:
            if process.is_alive():
                process.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for process in processes:
        process.start()
    logger.info("headless: engine ranks %d..%d connecting to the head at %s (pids %s)",
                dp.start_rank, dp.start_rank + dp.local - 1, address,
                [p.pid for p in processes])
    for process in processes:
        process.join()
    codes = [p.exitcode for p in processes]
    logger.info("headless: engines exited with codes %s", codes)
    return 0 if all(code == 0 for code in codes) else 1
