"""A decode instance's pushed-KV bookkeeping (`disagg/receive_buffer.py`): pure Python, a fake
clock, no sockets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from engine_core.executors.kv_endpoint import KVLayer, KVLayerHeader

from engine_core.kv_transfer.receive_buffer import ReceiveBuffer, TransferState

BLOCK_BYTES = 2 * 4 * 2 * 8 * 4  # K and V of one layer's block: 4 tokens, 2 heads of 8, fp32


@dataclass
class Stats:  # what the connector's KVTransferStats holds of it
    transfers_held: int = 0
    overflow_transfers: int = 0
    pushes_expired: int = 0
    buffer_bytes: int = 0
    overflow_bytes: int = 0


def _layer(lease_id, num_blocks, layer=0):
    k = torch.zeros(num_blocks, 4, 2, 8)
    return KVLayer(KVLayerHeader(lease_id, "h", layer, 2, 4 * num_blocks, "float32",
                                 list(k.shape)), k, k)


def _buffer(buffer_blocks, overflow_blocks, now):
    stats = Stats()
    return ReceiveBuffer(2 * buffer_blocks * BLOCK_BYTES, 2 * overflow_blocks * BLOCK_BYTES,
                         ttl_s=10.0, stats=stats, clock=lambda: now[0]), stats


def test_offers_fill_the_buffer_then_the_overflow_pool_then_hold():
    now = [0.0]
    buf, stats = _buffer(buffer_blocks=3, overflow_blocks=2, now=now)
    size = 2 * BLOCK_BYTES  # per block over both layers
    assert buf.offer("a", 2, 2 * size) == (True, None)  # buffer: 2 of 3 blocks' bytes
    assert buf.offer("b", 2, 2 * size) == (True, None)  # no room left there: overflow
    accepted, reason = buf.offer("c", 1, size)  # 1 more fits the buffer
    assert accepted and reason is None
    accepted, reason = buf.offer("d", 1, size)  # neither has room: hold
    assert not accepted and reason.startswith("hold")
    assert (stats.buffer_bytes, stats.overflow_bytes) == (3 * size, 2 * size)
    assert (stats.overflow_transfers, stats.transfers_held) == (1, 1)
    assert buf.state("d") is TransferState.HELD and buf.state("zz") is TransferState.UNKNOWN
    assert not buf.offer("a", 2, 2 * size)[0]  # offered twice


def test_the_free_block_hint_sends_pushes_to_the_overflow_pool():
    now = [0.0]
    buf, stats = _buffer(buffer_blocks=100, overflow_blocks=100, now=now)
    size = 2 * BLOCK_BYTES
    buf.set_free_blocks(5)
    assert buf.offer("a", 3, 3 * size)[0] and stats.overflow_transfers == 0
    assert buf.offer("b", 3, 3 * size)[0] and stats.overflow_transfers == 1  # 5 - 3 < 3
    assert buf.offer("c", 2, 2 * size)[0] and stats.overflow_transfers == 1  # 5 - 3 >= 2


def test_layers_complete_a_transfer_which_is_taken_once():
    now = [0.0]
    buf, stats = _buffer(buffer_blocks=10, overflow_blocks=0, now=now)
    assert buf.add_layer(_layer("a", 1)) == "no accepted offer for this transfer"
    assert buf.offer("a", 1, 2 * BLOCK_BYTES)[0]
    assert buf.add_layer(_layer("a", 1, 0)) is None
    assert buf.state("a") is TransferState.ARRIVING and buf.take("a") is None
    assert buf.add_layer(_layer("a", 1, 1)) is None
    version = buf.version
    assert buf.done("a") and buf.version != version  # a waiter wakes up
    assert buf.state("a") is TransferState.COMPLETE
    layers = buf.take("a")
    assert [la.header.layer for la in layers] == [0, 1]
    assert stats.buffer_bytes == 0 and buf.state("a") is TransferState.GONE
    assert buf.add_layer(_layer("a", 1)) == "the transfer is already finished here"
    assert not buf.offer("a", 1, 2 * BLOCK_BYTES)[0]  # a late offer too


def test_more_bytes_than_offered_drop_the_transfer():
    now = [0.0]
    buf, stats = _buffer(buffer_blocks=10, overflow_blocks=0, now=now)
    assert buf.offer("a", 1, BLOCK_BYTES)[0]  # one layer's worth
    assert buf.add_layer(_layer("a", 1, 0)) is None
    assert "more than" in buf.add_layer(_layer("a", 1, 1))
    assert buf.state("a") is TransferState.GONE and stats.buffer_bytes == 0


def test_unclaimed_transfers_expire_and_records_are_forgotten():
    now = [0.0]
    buf, stats = _buffer(buffer_blocks=1, overflow_blocks=1, now=now)
    size = 2 * BLOCK_BYTES
    assert buf.offer("a", 1, size)[0]
    now[0] = 4.0
    assert buf.offer("b", 1, size)[0]
    assert not buf.offer("c", 1, size)[0]  # held
    now[0] = 10.0
    assert buf.expire() == ["a"] and stats.pushes_expired == 1
    assert stats.buffer_bytes == 0 and stats.overflow_bytes == size
    assert buf.state("c") is TransferState.HELD  # held at 4.0: kept until 14.0
    now[0] = 14.0
    assert buf.expire() == ["b"] and stats.pushes_expired == 2
    assert buf.state("c") is TransferState.UNKNOWN  # forgotten
    assert buf.state("a") is TransferState.GONE  # late layers for it are still dropped...
    assert stats.overflow_bytes == 0
    now[0] = 20.0
    buf.expire()
    assert buf.state("a") is TransferState.UNKNOWN  # ...for one TTL


def test_drop_forgets_a_transfer_or_a_held_one():
    now = [0.0]
    buf, stats = _buffer(buffer_blocks=1, overflow_blocks=0, now=now)
    assert buf.offer("a", 1, 2 * BLOCK_BYTES)[0]
    assert not buf.offer("b", 1, 2 * BLOCK_BYTES)[0]
    assert buf.drop("a") is TransferState.ARRIVING and stats.buffer_bytes == 0
    assert buf.drop("b") is TransferState.HELD
    assert buf.drop("never") is TransferState.UNKNOWN
    assert all(buf.state(x) is TransferState.GONE for x in ("a", "b", "never"))
    assert stats.pushes_expired == 0
