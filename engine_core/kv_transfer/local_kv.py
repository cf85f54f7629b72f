"""This instance's side of every KV transfer: its KV blocks (through its pipeline stages), the
layout a peer's KV must match, and the leases of blocks lent to decoders."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import torch

from engine_core.config import EngineConfig
from engine_core.executor import KVStage
from engine_core.executors.kv_endpoint import KVLayer, KVLayerHeader, encode_layer
from engine_core.kv_compat import kv_compat_fields, kv_compat_hash
from engine_core.kv_transfer.leases import Lease, LeaseTable

__all__ = ["LayerKV", "LocalKV"]

logger = logging.getLogger(__name__)

LayerKV = tuple[int, torch.Tensor, torch.Tensor]  # (global layer, K, V) of some blocks


class LocalKV:
    """Shared by the connector's threads. `stages` are the executor's `kv_stages()`: KV is read
    and written only through them, by global layer index, so the two ends of a transfer may
    split the model differently. One lock guards the lease table and every read of leased
    blocks, so an expiring lease never frees blocks while they are read."""

    def __init__(self, config: EngineConfig, stages: list[KVStage], lease_ttl_s: float) -> None:
        self.config = config
        self.stages = stages
        self.compat_hash = kv_compat_hash(kv_compat_fields(config))
        self.num_layers = config.model.num_layers
        m = config.model
        itemsize = torch.empty((), dtype=getattr(torch, config.dtype)).element_size()
        self.block_bytes = (2 * m.num_layers * config.cache.block_size * m.num_kv_heads
                            * m.head_dim * itemsize)  # K and V of one block, every layer
        self.leases = LeaseTable(lease_ttl_s)
        self.lock = threading.Lock()

    def grant(self, request_id: str, block_ids: list[int], num_tokens: int,
              lease_id: str | None) -> Lease:
        """Lease blocks under `lease_id` (the proxy's transfer id), or under an id of our own
        if that one is taken (then the transfer is not pushed: its decoder pulls it)."""
        with self.lock:
            try:
                return self.leases.grant(request_id, block_ids, num_tokens, lease_id)
            except ValueError:
                logger.warning("transfer id %r of request %s is already leased; lent under "
                               "another id (not pushed)", lease_id, request_id)
                return self.leases.grant(request_id, block_ids, num_tokens)

    def release(self, lease_id: str) -> Lease | None:
        with self.lock:
            return self.leases.release(lease_id)

    def expire(self) -> list[Lease]:
        """End the leases past their TTL; the caller frees their blocks."""
        with self.lock:
            return self.leases.expire()

    def leased_request_ids(self) -> set[str]:
        with self.lock:
            return self.leases.request_ids()

    def get_lease(self, lease_id: str) -> Lease | None:
        with self.lock:
            return self.leases.get(lease_id)

    def read_lease(self, lease_id: str) -> tuple[Lease, list[LayerKV]] | None:
        """A live lease and copies of its blocks' KV, every layer; None if it ended.
        RuntimeError if a stage died or did not answer."""
        with self.lock:
            lease = self.leases.get(lease_id)
            if lease is None:
                return None
            return lease, self.read(list(lease.block_ids))

    def read(self, block_ids: list[int]) -> list[LayerKV]:
        """KV of `block_ids` from every stage (RuntimeError if one failed)."""
        layers = []
        for stage in self.stages:
            layers.extend(stage.read_kv_blocks(block_ids))
        return layers

    def write(self, block_ids: list[int], layers: list[KVLayer]) -> set[int]:
        """Write received layers into `block_ids`, one call per stage; the layers written
        (a layer whose blocks do not match `block_ids` is not)."""
        written: set[int] = set()
        for stage in self.stages:
            mine = [(la.header.layer, la.k, la.v) for la in layers
                    if la.header.shape[0] == len(block_ids) and stage.holds_layer(la.header.layer)]
            if mine:
                stage.write_kv_layers(block_ids, mine)
                written.update(layer for layer, _, _ in mine)
        return written

    def write_layer(self, block_ids: list[int], layer: KVLayer) -> bool:
        """Write one received layer into `block_ids`; False if no stage holds it."""
        for stage in self.stages:
            if stage.holds_layer(layer.header.layer):
                stage.write_kv_blocks(block_ids, layer.header.layer, layer.k, layer.v)
                return True
        return False

    def is_whole(self, written: set[int]) -> bool:
        return written == set(range(self.num_layers))

    def encode(self, lease_id: str, num_tokens: int, layers: list[LayerKV]
               ) -> Iterator[list]:
        """The wire messages of a transfer: one per layer (`executors/kv_endpoint.py`)."""
        for layer, k, v in layers:
            header = KVLayerHeader(lease_id, self.compat_hash, layer, self.num_layers,
                                   num_tokens, self.config.dtype, list(k.shape))
            yield encode_layer(header, k, v)
