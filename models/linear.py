"""Dense layers with the fastest matmul path of the device.

On CPU, float32 `F.linear` goes through a BLAS that reaches ~150 GFLOP/s on our machines, while
oneDNN's linear primitive reaches ~300 (2-2.7x, measured on the benchmark model's shapes; see
bench/RESULTS.md). It takes the same dense weights, so nothing is repacked. Other dtypes and
devices keep `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """`x @ weight.T + bias`; x [num_tokens, in], weight [out, in] -> [num_tokens, out]."""
    if _HAS_ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` that runs through `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
