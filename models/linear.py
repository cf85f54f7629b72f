"""Dense layers with the fastest matmul path of the device.

On CPU, oneDNN's linear primitive beats the BLAS behind `F.linear` (float32: 2-2.7x on the
benchmark model's shapes), and beats it again when the weight is stored once in oneDNN's own
blocked layout instead of being re-read from the dense [out, in] layout on every call
(bfloat16: 2.3x at one token, 1.2x at 64 tokens, 1.07x at 2048; float32: 1.1-1.25x; measured
in bench/RESULTS.md). `pack_linear_weights` does that once after loading; the results are the
same as the unpacked primitive's. Other dtypes and devices keep `F.linear`.

oneDNN builds (JIT-compiles) a primitive for every input shape it meets and keeps it in two
LRU caches (oneDNN's own and ideep's, 1024 entries each); an entry of the benchmark shapes
holds ~0.2-0.4 MB. A step's token count takes any value up to max_num_batched_tokens, so a
serving process kept building primitives and its RSS kept rising by hundreds of MB until both
caches were full (issue 18). `padded_rows` rounds the token count up to one of ~16 sizes per
power of two (at most 1/16 more rows, none below 17), so the caches hold a few hundred entries
that fill early in a run and steps stop paying for building new ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise")


def can_pack(weight: torch.Tensor) -> bool:
    """True if `weight` can live in oneDNN's blocked layout: a CPU float32 weight, or bfloat16
    where the CPU has native bfloat16 dot products (AVX512-BF16/AMX)."""
    if not _HAS_ONEDNN_LINEAR or weight.device.type != "cpu":
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


EXACT_ROWS = 16  # token counts up to this are not padded


def padded_rows(num_rows: int) -> int:
    """`num_rows` rounded up to a multiple of 2**(bit_length - 5) (so by less than 1/16);
    unchanged up to EXACT_ROWS."""
    if num_rows <= EXACT_ROWS:
        return num_rows
    step = 1 << (num_rows.bit_length() - 5)
    return -(-num_rows // step) * step


def _linear_pointwise(*args):  # one place that calls the primitive (tests count its shapes)
    return torch.ops.mkldnn._linear_pointwise(*args)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                   ) -> torch.Tensor:
    """oneDNN's linear over `x` [n, in] padded with zero rows to `padded_rows(n)`, so it meets
    few distinct shapes -> [n, out]."""
    n = x.shape[0]
    rows = padded_rows(n) if x.dim() == 2 else n
    if rows != n:
        x = F.pad(x, (0, 0, 0, rows - n))  # [rows, in]
    out = _linear_pointwise(x, weight, bias, "none", [], "")  # [rows, out]
    return out[:n] if rows != n else out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """`x @ weight.T + bias` with a dense weight; x [num_tokens, in], weight [out, in]
    -> [num_tokens, out]."""
    if _HAS_ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2:
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` that runs through `linear` above, or through its packed weight once
    `pack_weight` has been called (then `weight` is None: the dense copy is freed)."""

    packed_weight: torch.Tensor | None = None  # opaque oneDNN tensor, [out, in] blocked

    def pack_weight(self) -> None:
        """Move the weight into oneDNN's blocked layout if `can_pack` allows; else a no-op."""
        if self.weight is None or not can_pack(self.weight):
            return
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        self.register_parameter("weight", None)  # the dense copy is freed: `weight` is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return _onednn_linear(x, self.packed_weight, self.bias)
        return linear(x, self.weight, self.bias)


def warm_up_linears(model: nn.Module, max_rows: int,
                    max_rows_of: dict[nn.Module, int] | None = None) -> int:
    """Run each distinct shape of packed `Linear` in `model` once at every padded row count up
    to `max_rows` (a module in `max_rows_of`: up to its own bound), on zeros, so that oneDNN's
    primitives for them are built, and their memory taken, before the first request instead of
    piecemeal under load. Returns the number of calls made."""
    max_rows_of = max_rows_of or {}
    bound: dict[tuple, int] = {}
    example: dict[tuple, Linear] = {}
    for module in model.modules():
        if isinstance(module, Linear) and module.packed_weight is not None:
            key = (module.in_features, module.out_features, module.bias is not None,
                   module.packed_weight.dtype)
            bound[key] = max(bound.get(key, 0), max_rows_of.get(module, max_rows))
            example.setdefault(key, module)
    calls = 0
    with torch.inference_mode():
        for key, rows in bound.items():
            module, dtype = example[key], key[3]
            for size in sorted({padded_rows(n) for n in range(1, rows + 1)}):
                module(torch.zeros(size, module.in_features, dtype=dtype))  # [size, in]
                calls += 1
    return calls


def pack_linear_weights(model: nn.Module) -> None:
    """Pack the weight of every `Linear` in `model` (see the module docstring)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.pack_weight()
