"""What the end-to-end tests need to run `pp-engine` commands as processes, in one place.

- `free_port()`: a loopback TCP port nobody listens on now;
- `wait_for(predicate, timeout_s, what)` (and `async_wait_for`): poll a condition until it
  holds, with a deadline. The way to wait for something to *start* before asserting that
  something else did not happen (a fixed sleep then an assertion of absence passes when the
  thing never started);
- `CliProcess`: `python -m engine_core ARGS` in its own process group with its output in a log
  file; stopped by its pid (SIGTERM, then SIGKILL to the group), never by name;
- `ServerProcess`: `pp-engine serve MODEL` on a free port, returned once /health answers 200
  (over https, checked against a CA file, when the server is given a certificate);
- `stop_processes(procs)`, `group_gone`, `pid_gone`: stop them and check that no process of
  theirs is left; `spawned_children`: a server's engine-core processes;
- `connect_and_handshake`: a ZMQ peer attached (or refused) before a test checks it got
  nothing; `metric_sum`: one metric of a Prometheus page.

Failures carry the tail of the process's log. The `cli_processes` fixture (conftest.py) starts
processes that are stopped and checked after the test, with their logs shown if it failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
import zmq
from zmq.utils.monitor import recv_monitor_message

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVED_MODEL = "tiny-llama"
LOG_TAIL_CHARS = 4000
T = TypeVar("T")


# Ports handed to test processes come from below the kernel's ephemeral range (32768-60999
# here), which supplies every port bound to 0 and the source port of every outgoing connection:
# a port the OS picked for us could be taken by one of those before our process binds it (a CI
# run lost a KV endpoint that way). Above Ray's worker ports (10002-19999). Each xdist worker
# draws from its own slice, so two workers never hand out the same port.
_TEST_PORTS = range(20000, 32000)


def free_port() -> int:
    """A TCP port on 127.0.0.1, free a moment ago, outside the range the OS hands out and
    within this pytest worker's own slice of `_TEST_PORTS`."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker) if worker.isdigit() else 0
    size = len(_TEST_PORTS) // max(count, 1)
    first = _TEST_PORTS.start + (index % max(count, 1)) * size
    for _ in range(200):
        port = random.randrange(first, first + size)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{first}, {first + size})")


# ---- waiting on a condition -------------------------------------------------------------------
def wait_for(predicate: Callable[[], T], timeout_s: float, what: str,
             detail: Callable[[], str] | None = None, interval_s: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy, and return that. AssertionError
    naming `what` (plus `detail()`, e.g. a log tail) if it has not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(what, timeout_s, detail))
        time.sleep(interval_s)


async def async_wait_for(predicate: Callable[[], T | Awaitable[T]], timeout_s: float,
                         what: str, detail: Callable[[], str] | None = None,
                         interval_s: float = 0.05) -> T:
    """`wait_for` inside an event loop (the loop runs between polls); `predicate` may be a
    coroutine function."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_timed_out(what, timeout_s, detail))
        await asyncio.sleep(interval_s)


def _timed_out(what: str, timeout_s: float, detail: Callable[[], str] | None) -> str:
    message = f"timed out after {timeout_s:g} s waiting for {what}"
    return message if detail is None else f"{message}\n{detail()}"


# ---- process groups ---------------------------------------------------------------------------
def group_members(pgid: int, zombies: bool = True) -> list[int]:
    """Processes whose process group is `pgid` (zombies too, unless `zombies` is False)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
                if int(fields[2]) == pgid and (zombies or fields[0] != "Z"):
                    members.append(int(entry))
    return members


def group_gone(pgid: int, timeout_s: float = 10.0, zombies: bool = False) -> bool:
    """True once no process of group `pgid` is left (SIGKILLed processes die asynchronously:
    waits up to `timeout_s`). Zombies count as gone unless `zombies`."""
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not group_members(pgid, zombies), timeout_s, f"process group {pgid}")
        return True
    return False


def pid_gone(pid: int, timeout_s: float = 15.0) -> bool:
    """True once `pid` has exited (a zombie counts as gone), waiting up to `timeout_s`."""
    def gone() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    with contextlib.suppress(AssertionError):
        wait_for(gone, timeout_s, f"process {pid} to exit")
        return True
    return False


def spawned_children(pid: int) -> list[int]:
    """The multiprocessing-spawned children of `pid` (a server's engine-core processes)."""
    pids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                with contextlib.suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as cmd:
                    if b"spawn_main" in cmd.read():
                        pids.append(int(child))
    return pids


# ---- processes --------------------------------------------------------------------------------
class CliProcess:
    """`python -m engine_core ARGS` in its own process group (so that everything it starts can
    be stopped with it), stdout and stderr in `log_path`."""

    def __init__(self, args: list[str], log_path: str) -> None:
        self.args = args
        self.log_path = log_path
        self.killed = False  # by the test, on purpose
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "engine_core", *args],
                                         cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, full: bool = False) -> str:
        """The log so far: its last LOG_TAIL_CHARS characters unless `full`."""
        with open(self.log_path, errors="replace") as f:
            text = f.read()
        return text if full else text[-LOG_TAIL_CHARS:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash: no clean shutdown)."""
        self.killed = True
        self._kill_group()

    def stop(self) -> None:
        """SIGTERM (the command stops what it started), then SIGKILL whatever is left of the
        group. Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        self._kill_group()

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def assert_nothing_left(self, timeout_s: float = 10.0) -> None:
        """The process has exited and no process of its group remains, zombies included
        (init reaps those of a dead parent: allowed `timeout_s`)."""
        assert self.proc.poll() is not None, f"{self.log_path}: still running"
        wait_for(lambda: not group_members(self.pid), timeout_s,
                 f"the processes of {self.log_path} to exit",
                 lambda: f"left behind: {group_members(self.pid)}\n{self.log()}")

    def stop_and_check(self) -> None:
        """Stop it with SIGTERM alone and check that nothing of it remains; whatever is left
        is killed all the same, so a failure leaks nothing."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        try:
            self.assert_nothing_left()
        finally:
            self.stop()


class ServerProcess(CliProcess):
    """`pp-engine serve MODEL --port PORT --dtype float32 --served-model-name tiny-llama ARGS`;
    the constructor returns once /health answers 200 (the process is stopped if it does not
    within `startup_s`, or exits). With `tls_ca` (a CA file that the certificate in ARGS'
    --ssl-certfile chains to) the server is reached over https, checked against it."""

    def __init__(self, model_dir: str, log_path: str, *args: str, startup_s: float = 120.0,
                 served_model_name: str = SERVED_MODEL, tls_ca: str | None = None) -> None:
        self.port = free_port()
        self.verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=tls_ca) if tls_ca is not None else True)
        self.url = f"{'https' if tls_ca else 'http'}://127.0.0.1:{self.port}"
        super().__init__(["serve", model_dir, "--port", str(self.port), "--dtype", "float32",
                          "--served-model-name", served_model_name, *args], log_path)
        try:
            self.wait_healthy(startup_s)
        except BaseException:
            self.stop()
            raise

    def healthy(self) -> bool:
        """/health answers 200 now. RuntimeError (with the log) if the server has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log()}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(self.url + "/health", timeout=2,
                             verify=self.verify).status_code == 200
        return False

    def wait_healthy(self, timeout_s: float) -> None:
        wait_for(self.healthy, timeout_s, f"{self.url}/health to answer 200", self.log,
                 interval_s=0.25)

    def engine_pid(self) -> int:
        """The engine-core process: the server's multiprocessing-spawned child."""
        children = spawned_children(self.pid)
        if not children:
            raise RuntimeError("no engine-core child process found")
        return children[0]


def stop_processes(procs: list[CliProcess]) -> None:
    """Stop every process, the last started first, and assert that none is left behind."""
    for proc in reversed(procs):
        proc.stop()
    left = {p.log_path: group_members(p.pid, zombies=False) for p in procs
            if not group_gone(p.pid)}
    assert not left, f"processes left behind: {left}"


def metric_sum(text: str, name: str) -> float:
    """The sum of a metric's samples in a Prometheus text page (0 if absent). `name` may
    carry labels to match exactly: 'ppengine:proxy_instances{role="kv_consumer"}'."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Processes:
    """The processes one test (or module) started, each logging to `log_dir/NAME.log`;
    `stop()` stops them all and asserts none is left (the `cli_processes` fixture calls it)."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.procs: list[CliProcess] = []

    def start(self, args: list[str], name: str) -> CliProcess:
        """`python -m engine_core ARGS`, not waited for."""
        proc = CliProcess(args, os.path.join(self.log_dir, f"{name}.log"))
        self.procs.append(proc)
        return proc

    def server(self, model_dir: str, *args: str, name: str = "server",
               **kwargs) -> ServerProcess:
        """A `ServerProcess`, healthy."""
        server = ServerProcess(model_dir, os.path.join(self.log_dir, f"{name}.log"), *args,
                               **kwargs)
        self.procs.append(server)
        return server

    def logs(self) -> str:
        return "\n".join(f"==== {p.log_path}\n{p.log()}" for p in self.procs)

    def stop(self) -> None:
        stop_processes(self.procs)


def connect_and_handshake(sock: zmq.Socket, address: str, timeout_s: float = 10.0) -> bool:
    """Connect `sock` to `address` and wait for the ZMTP handshake: True once it succeeded,
    False if the peer refused it (a CURVE key or mechanism mismatch); AssertionError if neither
    happened within `timeout_s`. Tells that a peer is attached (or shut out) before a test
    checks that it got nothing."""
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED)
    try:
        sock.connect(address)
        if not monitor.poll(int(timeout_s * 1000)):
            raise AssertionError(f"no ZMQ handshake with {address} within {timeout_s:g} s")
        return recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
