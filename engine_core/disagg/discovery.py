"""The proxy's registry of prefill and decode instances.

Instances register (role, request address, KV endpoint, KV layout fields) and heartbeat; the proxy
picks the least loaded instance of a role. An instance whose KV layout differs from the
instances already registered is refused with a message naming the difference, so no P/D pair
can ever exchange incompatible KV. The registry is pure bookkeeping (no sockets, injectable
clock); the proxy's discovery socket feeds it the messages below.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import msgspec

from engine_core.disagg.compat import kv_compat_mismatch

__all__ = ["DiscoveryMessage", "Heartbeat", "HeartbeatReply", "InstanceInfo", "NoInstanceError",
           "Register", "RegisterReply", "Registry"]

PRODUCER_ROLES = ("kv_producer", "kv_both")
CONSUMER_ROLES = ("kv_consumer", "kv_both")


class Register(msgspec.Struct, tag=True):
    """Instance -> proxy: join (and re-join after a proxy restart)."""

    instance_id: str
    role: str  # a KVTransferConfig.kv_role
    request_address: str  # where the proxy sends it requests (ZMQ, `wire.py`)
    kv_endpoint: str
    compat_fields: dict[str, str]
    send_type: str = "PUT"  # how a producer hands KV over (KVTransferConfig.send_type)
    model_name: str = ""  # the served model name clients use
    max_model_len: int = 0


class Heartbeat(msgspec.Struct, tag=True):
    instance_id: str
    num_running: int = 0
    num_waiting: int = 0


class RegisterReply(msgspec.Struct, tag=True):
    error: str | None = None  # why the instance was refused


class HeartbeatReply(msgspec.Struct, tag=True):
    known: bool  # False: the proxy does not know this instance (restarted): register again


DiscoveryMessage = Register | Heartbeat


@dataclass
class InstanceInfo:
    register: Register
    last_seen: float
    load: int = 0  # running + waiting, from its last heartbeat
    in_flight: int = 0  # requests the proxy has sent it and not seen finish
    num_picked: int = 0  # requests routed to it so far


class NoInstanceError(RuntimeError):
    """No live instance of the role: the proxy answers 503 with this message."""


class Registry:
    def __init__(self, heartbeat_timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.clock = clock
        self.instances: dict[str, InstanceInfo] = {}

    def register(self, message: Register) -> RegisterReply:
        """Admit an instance, or refuse it (the reply's error says why)."""
        self.expire()
        if message.role not in PRODUCER_ROLES + CONSUMER_ROLES:
            return RegisterReply(f"unknown role {message.role!r}")
        for other in self.instances.values():
            if other.register.instance_id == message.instance_id:
                continue
            theirs, ours = other.register.model_name, message.model_name
            if theirs and ours and theirs != ours:
                return RegisterReply(f"refused: this instance serves model {ours!r} but instance "
                                     f"{other.register.instance_id} serves {theirs!r}")
            mismatch = kv_compat_mismatch(other.register.compat_fields, message.compat_fields)
            if mismatch is not None:
                return RegisterReply(f"refused: {mismatch} (instance "
                                     f"{other.register.instance_id})")
        self.instances[message.instance_id] = InstanceInfo(message, self.clock())
        return RegisterReply()

    def heartbeat(self, message: Heartbeat) -> bool:
        """False for an unknown instance (it should register again)."""
        info = self.instances.get(message.instance_id)
        if info is None:
            return False
        info.last_seen = self.clock()
        info.load = message.num_running + message.num_waiting
        return True

    def expire(self) -> list[str]:
        """Forget instances silent for longer than the heartbeat timeout; their ids."""
        now = self.clock()
        gone = [i for i, info in self.instances.items()
                if now - info.last_seen > self.heartbeat_timeout_s]
        for instance_id in gone:
            del self.instances[instance_id]
        return gone

    def pick(self, producer: bool, exclude: Collection[str] = ()) -> InstanceInfo:
        """The least loaded live instance able to prefill (`producer`) or decode, other than the
        ids in `exclude` (among equally loaded ones, the least picked so far); NoInstanceError
        naming the missing role."""
        self.expire()
        roles = PRODUCER_ROLES if producer else CONSUMER_ROLES
        candidates = [info for info in self.instances.values()
                      if info.register.role in roles and info.register.instance_id not in exclude]
        if not candidates:
            role = "prefill (kv_producer)" if producer else "decode (kv_consumer)"
            raise NoInstanceError(f"no {role} instance is registered with the proxy")
        # ties (idle instances) go to the one picked least so far: round robin
        chosen = min(candidates, key=lambda info: (info.load + info.in_flight, info.num_picked,
                                                   info.register.instance_id))
        chosen.num_picked += 1
        return chosen

    def pick_pair(self) -> tuple[InstanceInfo, InstanceInfo]:
        return self.pick(producer=True), self.pick(producer=False)
