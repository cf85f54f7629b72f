"""A prefill/decode deployment on this host for end-to-end tests: any number of `pp-engine proxy`
processes sharing any number of `pp-engine serve --kv-transfer-config` instances, which can be
added, killed (-9) and checked for leaked KV blocks while clients run.

Every process runs in its own process group on free loopback ports and is stopped by pid;
`stop()` asserts that none is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass

import httpx
import openai

from tests.servers import CliProcess, free_port, metric_sum, stop_processes, wait_for
from tests.test_disagg_e2e import MAX_MODEL_LEN, MODEL, wait_idle

BLOCK = 16
TIMEOUT = 60.0


@dataclass
class Instance:
    proc: CliProcess
    role: str
    url: str  # its own HTTP server
    kv_endpoint: str

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=5).text

    def metric(self, name: str) -> float:
        return metric_sum(self.metrics(), name)


@dataclass
class Proxy:
    proc: CliProcess
    url: str
    discovery: str  # host:port

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=5).text

    def metric(self, name: str) -> float:
        return metric_sum(self.metrics(), name)

    def client(self, timeout_s: float = TIMEOUT) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                             timeout=timeout_s)

    def async_client(self, timeout_s: float = TIMEOUT) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                                  timeout=timeout_s)

    def request_addresses(self) -> dict[str, str]:
        """instance id -> its proxy request address, as the proxy logged them."""
        return dict(re.findall(r"instance (\S+) registered: \S+, requests at (\S+),",
                               self.proc.log(full=True)))


class XPyDCluster:
    """Proxies first (`num_proxies`), then instances (`add`); `keys_dir` secures every socket
    with CurveZMQ, else all of them run on loopback without keys."""

    def __init__(self, model_dir: str, tmp: str, num_proxies: int = 1,
                 keys_dir: str | None = None, heartbeat_timeout_s: float = 3.0) -> None:
        self.model_dir, self.tmp = model_dir, tmp
        self.security = ["--zmq-keys", keys_dir] if keys_dir else []
        self.procs: list[CliProcess] = []
        self.proxies: list[Proxy] = []
        self.instances: list[Instance] = []
        for i in range(num_proxies):
            port, discovery = free_port(), free_port()
            proc = self._start(["proxy", "--port", str(port), "--discovery-port", str(discovery),
                                "--heartbeat-timeout-s", str(heartbeat_timeout_s),
                                "--request-timeout-s", "60", *self.security], f"proxy-{i}")
            self.proxies.append(Proxy(proc, f"http://127.0.0.1:{port}",
                                      f"127.0.0.1:{discovery}"))

    def _start(self, args: list[str], name: str) -> CliProcess:
        proc = CliProcess(args, os.path.join(self.tmp, f"{name}.log"))
        self.procs.append(proc)
        return proc

    def add(self, role: str, send_type: str = "PUT_ASYNC", **kv_config) -> Instance:
        """Start an instance of `role` registering with every proxy (it is not waited for)."""
        kv_port, http_port = free_port(), free_port()
        config = {"kv_role": role, "kv_port": kv_port, "send_type": send_type,
                  "proxy_address": ",".join(p.discovery for p in self.proxies), **kv_config}
        name = f"{role}-{len(self.instances)}"
        proc = self._start(
            ["serve", self.model_dir, "--port", str(http_port), "--dtype", "float32",
             "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
             "--block-size", str(BLOCK), "--kv-transfer-config", json.dumps(config),
             "--disable-uvicorn-access-log", *self.security], name)
        instance = Instance(proc, role, f"http://127.0.0.1:{http_port}",
                            f"tcp://127.0.0.1:{kv_port}")
        self.instances.append(instance)
        return instance

    def logs(self) -> str:
        return "\n".join(f"==== {p.log_path}\n{p.log()}" for p in self.procs)

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.alive() and not proc.killed:
                raise RuntimeError(f"{proc.log_path} exited:\n{self.logs()}")

    def wait_registered(self, timeout_s: float = 120.0) -> None:
        """Until every live proxy counts every live instance of each role."""
        def registered() -> bool:
            self.check_alive()
            want: dict[str, int] = {}
            for inst in self.live_instances():
                want[inst.role] = want.get(inst.role, 0) + 1
            with contextlib.suppress(httpx.HTTPError):
                return all(p.metric(f'ppengine:proxy_instances{{role="{role}"}}') == count
                           for p in self.live_proxies() for role, count in want.items())
            return False

        wait_for(registered, timeout_s, "the instances to register", self.logs, interval_s=0.25)

    def live_instances(self) -> list[Instance]:
        return [i for i in self.instances if i.proc.alive()]

    def live_proxies(self) -> list[Proxy]:
        return [p for p in self.proxies if p.proc.alive()]

    def wait_blocks_free(self, timeout_s: float = 20.0) -> None:
        """Every live instance idle with every KV block back in the pool (leases released or
        expired, buffered KV dropped)."""
        wait_idle([i.url for i in self.live_instances()], self.logs, timeout_s)

    def stop(self) -> None:
        stop_processes(self.procs)


@contextlib.contextmanager
def xpyd_cluster(model_dir: str, tmp: str, **kwargs):
    cluster = XPyDCluster(model_dir, tmp, **kwargs)
    try:
        yield cluster
    finally:
        cluster.stop()
