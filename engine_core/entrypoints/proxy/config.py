"""How `pp-engine proxy` runs (its flags, checked once)."""

from __future__ import annotations

from dataclasses import dataclass

from engine_core.entrypoints.http.limits import DEFAULT_MAX_REQUEST_BYTES

__all__ = ["ProxyConfig"]


@dataclass(frozen=True)
class ProxyConfig:
    """How the proxy runs. `discovery_port` 0 binds a free port. `zmq_keys`: a directory made
    by `pp-engine keys` (CurveZMQ on the discovery socket and the instance connections)."""

    discovery_host: str = "127.0.0.1"
    discovery_port: int = 30001
    zmq_keys: str | None = None
    insecure_tcp: bool = False  # without keys, admit instances on other hosts all the same
    heartbeat_timeout_s: float = 3.0
    request_timeout_s: float = 600.0
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES

    def __post_init__(self) -> None:
        for name in ("heartbeat_timeout_s", "request_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if type(self.discovery_port) is not int or not 0 <= self.discovery_port < 65536:
            raise ValueError(f"discovery_port must be a port in 0..65535, "
                             f"got {self.discovery_port!r}")
        if type(self.max_request_bytes) is not int or self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes!r}")
