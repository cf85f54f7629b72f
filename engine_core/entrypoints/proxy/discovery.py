"""The proxy's registry of prefill and decode instances.

Instances register (role, request address, KV endpoint, KV layout fields) as their first beat,
then heartbeat about every second with their load (running and waiting requests, free KV blocks);
an instance silent for `heartbeat_timeout_s` (about three missed beats) is forgotten, and one that
beats again later simply registers anew. The proxy routes each request to the least loaded pair
(`Registry.pick_pair`). An instance whose KV layout differs from the instances already registered
is refused with a message naming the difference, so no P/D pair can ever exchange incompatible
KV. The registry is pure bookkeeping (no sockets, injectable
clock); the proxy's discovery socket feeds it the messages below.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from engine_core.entrypoints.http.discovery_wire import (
    CONSUMER_ROLES,
    PRODUCER_ROLES,
    Heartbeat,
    Load,
    Register,
    RegisterReply,
)
from engine_core.kv_compat import kv_compat_mismatch

__all__ = ["InstanceInfo", "NoInstanceError", "Registry"]

@dataclass
class InstanceInfo:
    register: Register
    last_seen: float
    load: Load = field(default_factory=Load)  # from its last beat
    in_flight: int = 0  # requests the proxy has sent it and not seen finish
    picked_since_beat: int = 0  # routed to it since its last beat (not in `load` yet)
    num_picked: int = 0  # requests routed to it so far

    @property
    def instance_id(self) -> str:
        return self.register.instance_id

    def routing_key(self) -> tuple[int, float, int, str]:
        """Lower is better: the load (what it reported plus what this proxy sent since, or this
        proxy's own open requests if more), then the fuller KV cache, then the least picked
        (round robin among equals)."""
        reported = self.load.num_running + self.load.num_waiting + self.picked_since_beat
        total = self.load.num_total_blocks
        free = self.load.num_free_blocks / total if total else 1.0
        return max(reported, self.in_flight), -free, self.num_picked, self.instance_id


class NoInstanceError(RuntimeError):
    """No live instance of the role: the proxy answers 503 with this message."""


class Registry:
    def __init__(self, heartbeat_timeout_s: float = 3.0,
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
            if other.instance_id == message.instance_id:
                continue
            theirs, ours = other.register.model_name, message.model_name
            if theirs and ours and theirs != ours:
                return RegisterReply(f"refused: this instance serves model {ours!r} but instance "
                                     f"{other.instance_id} serves {theirs!r}")
            mismatch = kv_compat_mismatch(other.register.compat_fields, message.compat_fields)
            if mismatch is not None:
                return RegisterReply(f"refused: {mismatch} (instance {other.instance_id})")
        old = self.instances.get(message.instance_id)
        info = InstanceInfo(message, self.clock(), message.load or Load())
        if old is not None:  # a re-registration keeps the proxy's own counts
            info.in_flight, info.num_picked = old.in_flight, old.num_picked
        self.instances[message.instance_id] = info
        return RegisterReply()

    def heartbeat(self, message: Heartbeat) -> bool:
        """False for an unknown instance (it should register again)."""
        info = self.instances.get(message.instance_id)
        if info is None:
            return False
        info.last_seen = self.clock()
        info.load = message.load
        info.picked_since_beat = 0
        return True

    def expire(self) -> list[str]:
        """Forget instances silent for longer than the heartbeat timeout; their ids."""
        now = self.clock()
        gone = [i for i, info in self.instances.items()
                if now - info.last_seen > self.heartbeat_timeout_s]
        for instance_id in gone:
            del self.instances[instance_id]
        return gone

    def _candidates(self, producer: bool, exclude: Collection[str]) -> list[InstanceInfo]:
        """The live instances able to prefill (`producer`) or decode, other than `exclude`;
        NoInstanceError naming the role if there is none."""
        roles = PRODUCER_ROLES if producer else CONSUMER_ROLES
        found = [info for info in self.instances.values()
                 if info.register.role in roles and info.instance_id not in exclude]
        if not found:
            role = "prefill (kv_producer)" if producer else "decode (kv_consumer)"
            raise NoInstanceError(f"no {role} instance is registered with the proxy")
        return found

    def pick(self, producer: bool, exclude: Collection[str] = ()) -> InstanceInfo:
        """The least loaded live instance able to prefill (`producer`) or decode, other than the
        ids in `exclude` (`InstanceInfo.routing_key`); NoInstanceError naming the missing role.
        Not counted as routed: see `pick_pair`."""
        self.expire()
        return min(self._candidates(producer, exclude), key=InstanceInfo.routing_key)

    def pick_pair(self, exclude: Collection[str] = ()) -> tuple[InstanceInfo, InstanceInfo]:
        """Prefill and decode instances for one request, counted as routed to them.

        D is the least loaded decoder (kv_consumer or kv_both). P is the least loaded of the
        pure kv_producers and, if D is kv_both, D itself: P is D when no producer is less
        loaded, and the request then runs on D alone with no KV transfer (colocated). With
        neither, the least loaded kv_both instance prefills for D."""
        self.expire()
        producers = self._candidates(True, exclude)
        decode = min(self._candidates(False, exclude), key=InstanceInfo.routing_key)
        options = [info for info in producers if info.register.role == "kv_producer"]
        if decode.register.role == "kv_both":
            options.append(decode)
        prefill = min(options or producers, key=InstanceInfo.routing_key)
        for info in {prefill.instance_id: prefill, decode.instance_id: decode}.values():
            info.num_picked += 1
            info.picked_since_beat += 1
        return prefill, decode
