"""A stage's KV endpoint: a request's KV blocks, layer by layer, as raw zero-copy frames.

Wire format of one layer (one multipart message):

    [ header (msgpack `KVLayerHeader`), K bytes, V bytes ]

K and V are the layer's blocks `[num_blocks, block_size, num_kv_heads, head_dim]` in the header's
dtype, contiguous, never pickled. Layers are named by their *global* index, so the sending and
receiving instances may split the model over different pipeline sizes: each stage sends the layers
it holds and receives those it holds. On an accelerator the tensors are staged through host memory.

`KVTransport` is the one class that moves frames (ZMQ today); an NCCL or RDMA transport can take
its place behind the same `send_layers`/`recv_layer` contract.
"""

from __future__ import annotations

import logging

import msgspec
import torch
import zmq

__all__ = ["KVFrameError", "KVLayer", "KVLayerHeader", "KVTransport", "decode_layer",
           "encode_layer"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KVLayerHeader(msgspec.Struct, array_like=True, frozen=True):
    lease_id: str
    compat_hash: str
    layer: int  # global layer index
    num_layers: int  # how many layer messages this transfer holds in all
    num_tokens: int  # tokens whose KV the blocks hold (whole blocks)
    dtype: str
    shape: list[int]  # of K and of V: [num_blocks, block_size, num_kv_heads, head_dim]


class KVLayer(msgspec.Struct, frozen=True):
    """One decoded layer: K and V of the transferred blocks, on the host."""

    header: KVLayerHeader
    k: torch.Tensor
    v: torch.Tensor


class KVFrameError(ValueError):
    """A KV message that is malformed or truncated: dropped by the receiver."""


_header_decoder = msgspec.msgpack.Decoder(KVLayerHeader)


def encode_layer(header: KVLayerHeader, k: torch.Tensor, v: torch.Tensor) -> list:
    """The frames of one layer: the header, then K and V as raw host buffers (no copy when the
    tensors are already contiguous on the host)."""
    k, v = k.detach().contiguous().cpu(), v.detach().contiguous().cpu()
    return [msgspec.msgpack.encode(header), _raw(k), _raw(v)]


def decode_layer(frames: list) -> KVLayer:
    """Parse one layer message; `KVFrameError` if it is malformed or truncated."""
    if len(frames) != 3:
        raise KVFrameError(f"a KV layer message has 3 frames, got {len(frames)}")
    try:
        header = _header_decoder.decode(bytes(frames[0]))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise KVFrameError(f"bad KV header: {exc}") from None
    dtype = _DTYPES.get(header.dtype)
    if dtype is None or len(header.shape) != 4 or any(d < 0 for d in header.shape):
        raise KVFrameError(f"bad KV header: dtype {header.dtype!r}, shape {header.shape}")
    count = 1
    for dim in header.shape:
        count *= dim
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    tensors = []
    for name, frame in (("K", frames[1]), ("V", frames[2])):
        buf = memoryview(frame.buffer if isinstance(frame, zmq.Frame) else frame)
        if buf.nbytes != nbytes:
            raise KVFrameError(f"truncated KV {name} of layer {header.layer}: {buf.nbytes} "
                               f"bytes, the header says {nbytes}")
        flat = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if nbytes else \
            torch.empty(0, dtype=torch.uint8)
        tensors.append(flat.view(dtype).view(header.shape))
    return KVLayer(header, tensors[0], tensors[1])


def _raw(t: torch.Tensor) -> memoryview:
    return t.view(torch.uint8).numpy().data if t.numel() else memoryview(b"")


class KVTransport:
    """Moves KV layer messages over one ZMQ socket (the caller's: PUSH/PULL, DEALER...); never
    shared across threads. `send_layers` sends zero-copy; `recv_layer` returns a decoded layer,
    or None for a malformed message, which it logs and drops."""

    def __init__(self, socket: zmq.Socket) -> None:
        self.socket = socket
        self.bytes_sent = 0
        self.bytes_received = 0

    def send_layers(self, messages: list[list]) -> None:
        for frames in messages:
            self.socket.send_multipart(frames, copy=False)
            self.bytes_sent += sum(memoryview(f).nbytes for f in frames)

    def recv_layer(self, timeout_ms: int) -> KVLayer | None:
        """Next layer within `timeout_ms`; TimeoutError if none came, None if it was bad."""
        if not self.socket.poll(timeout_ms):
            raise TimeoutError(f"no KV message within {timeout_ms} ms")
        frames = self.socket.recv_multipart(copy=False)
        self.bytes_received += sum(f.buffer.nbytes for f in frames)
        try:
            return decode_layer(frames)
        except KVFrameError as exc:
            logger.warning("dropped a KV message: %s", exc)
            return None
