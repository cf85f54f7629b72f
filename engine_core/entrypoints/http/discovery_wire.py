"""Instance -> proxy discovery messages (msgspec, never pickle), on the proxy's discovery
socket: an instance registers (role, request address, KV endpoint, KV layout fields) as its first
beat, then heartbeats about every second with its load. Both sides import this module: the
OpenAI server's instance bridge sends them, the proxy's registry (`proxy/discovery.py`) reads them.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = ["CONSUMER_ROLES", "PRODUCER_ROLES", "DiscoveryMessage", "Heartbeat", "HeartbeatReply",
           "Load", "Register", "RegisterReply"]

Count = Annotated[int, msgspec.Meta(ge=0, le=2**40)]  # a frame with another value is dropped
PRODUCER_ROLES = ("kv_producer", "kv_both")
CONSUMER_ROLES = ("kv_consumer", "kv_both")


class Load(msgspec.Struct, frozen=True, omit_defaults=True):
    """An instance's engine load: requests running and waiting, and its KV blocks."""

    num_running: Count = 0
    num_waiting: Count = 0
    num_free_blocks: Count = 0
    num_total_blocks: Count = 0


class Register(msgspec.Struct, tag=True):
    """Instance -> proxy: join, as the instance's first beat (and again after a proxy restart,
    which forgets it). Carries the load like a `Heartbeat`."""

    instance_id: str
    role: str  # a KVTransferConfig.kv_role
    request_address: str  # where the proxy sends it requests (ZMQ, `wire.py`)
    kv_endpoint: str
    compat_fields: dict[str, str]
    send_type: str = "PUT"  # how a producer hands KV over (KVTransferConfig.send_type)
    model_name: str = ""  # the served model name clients use
    max_model_len: int = 0
    load: Load | None = None


class Heartbeat(msgspec.Struct, tag=True):
    """Instance -> proxy, about every second: still alive, and its load now."""

    instance_id: str
    load: Load = Load()


class RegisterReply(msgspec.Struct, tag=True):
    error: str | None = None  # why the instance was refused
    proxy_id: str = ""  # the proxy's return address: requests it sends carry it as `reply_to`


class HeartbeatReply(msgspec.Struct, tag=True):
    known: bool  # False: the proxy does not know this instance (restarted): register again


DiscoveryMessage = Register | Heartbeat
