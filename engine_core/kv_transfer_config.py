"""`--kv-transfer-config`: the JSON that makes an instance a prefill and/or decode instance."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["KV_ROLES", "SEND_TYPES", "KVTransferConfig"]

KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")
SEND_TYPES = ("PUT", "GET", "PUT_ASYNC")


@dataclass(frozen=True)
class KVTransferConfig:
    """How an instance takes part in prefill/decode disaggregation.

    `kv_role`: kv_producer (prefills and sends KV), kv_consumer (receives KV and decodes) or
    kv_both. `kv_port`: where this instance's KV endpoint listens, on `kv_ip` (the address
    peers reach it at; the proxy-facing request socket binds there too, on a free port).
    `proxy_address`: host:port of a proxy's discovery socket, or several, comma-separated: the
    instance registers and heartbeats with each, and answers each request to the proxy that
    sent it. `send_type`: PUT (P pushes
    after prefill), GET (D pulls), PUT_ASYNC (P pushes from a background sender).
    `kv_buffer_size`: bytes of pushed KV a consumer buffers at most until its requests
    arrive (on an accelerator: device memory, taken into KV blocks soon). `kv_overflow_size`:
    bytes of pushed KV a consumer keeps at most in its host overflow pool, used when the buffer
    is full or the instance has no free KV blocks for a transfer; when both are full the
    producer is told to hold (it keeps the lease, the consumer pulls it). `lease_ttl_s`: how
    long a producer holds a prompt's blocks for a decoder that has not fetched them (and a
    consumer keeps pushed KV whose request has not come).
    `zmq_keys`: the CurveZMQ key directory (`pp-engine keys`) that secures the KV
    sockets (None: unsecured; `serve` refuses that without `--insecure-tcp`).
    """

    kv_role: str
    kv_port: int
    proxy_address: str
    send_type: str = "PUT"
    kv_buffer_size: float = 1e9
    kv_overflow_size: float = 1e9
    kv_ip: str = "127.0.0.1"
    lease_ttl_s: float = 30.0
    zmq_keys: str | None = None  # CurveZMQ key directory; `serve` fills it from --zmq-keys

    def __post_init__(self) -> None:
        if self.kv_role not in KV_ROLES:
            raise ValueError(f"kv_role must be one of {', '.join(KV_ROLES)}, "
                             f"got {self.kv_role!r}")
        if self.send_type not in SEND_TYPES:
            raise ValueError(f"send_type must be one of {', '.join(SEND_TYPES)}, "
                             f"got {self.send_type!r}")
        if type(self.kv_port) is not int or not 0 < self.kv_port < 65536:
            raise ValueError(f"kv_port must be an integer port in 1..65535, got {self.kv_port!r}")
        if not isinstance(self.proxy_address, str):
            raise ValueError(f"proxy_address must be 'host:port[,host:port...]', "
                             f"got {self.proxy_address!r}")
        addresses = self.proxy_addresses
        for address in addresses:
            host, _, port = address.rpartition(":")
            if (not host or any(c in host for c in "/ *") or not port.isascii()
                    or not port.isdigit() or not 0 < int(port) < 65536):
                raise ValueError(f"proxy_address must be 'host:port[,host:port...]', "
                                 f"got {self.proxy_address!r}")
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"proxy_address must name each proxy once, "
                             f"got {self.proxy_address!r}")
        if not isinstance(self.kv_ip, str) or not self.kv_ip or any(
                c in self.kv_ip for c in "/ *"):
            raise ValueError(f"kv_ip must be a host address peers can reach, got {self.kv_ip!r}")
        if self.kv_ip in ("0.0.0.0", "::"):
            raise ValueError("kv_ip must be an address peers can reach (it is advertised to "
                             f"them), not the wildcard {self.kv_ip!r}")
        for name, unit in (("lease_ttl_s", "seconds"), ("kv_buffer_size", "bytes"),
                           ("kv_overflow_size", "bytes")):
            value = getattr(self, name)
            number = _finite_float(value)
            if number is None or number <= 0:
                raise ValueError(f"{name} must be a positive number of {unit}, got {value!r}")
            # stored as the float it is declared: an int from JSON and the float the engine
            # process decodes must agree (the config hash, and a P/D pair's checks)
            object.__setattr__(self, name, number)

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    @property
    def proxy_addresses(self) -> list[str]:
        """Each proxy's discovery address, 'host:port'."""
        return [a.strip() for a in self.proxy_address.split(",")]

    @classmethod
    def from_json(cls, text: str) -> KVTransferConfig:
        """Parse the JSON of `--kv-transfer-config`; ValueError naming the key at fault."""
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--kv-transfer-config is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("--kv-transfer-config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"--kv-transfer-config: unknown key {unknown[0]!r} "
                             f"(known: {', '.join(sorted(known))})")
        for key in ("kv_role", "kv_port", "proxy_address"):
            if key not in data:
                raise ValueError(f"--kv-transfer-config: missing key {key!r}")
        try:
            return cls(**data)
        except ValueError as exc:
            raise ValueError(f"--kv-transfer-config: {exc}") from None


def _finite_float(value: object) -> float | None:
    """`value` as a finite float, or None if it is no number (a bool is none) or not finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond a double
        return None
    return number if math.isfinite(number) else None
