"""Rotary position embedding (neox style, as Hugging Face Llama's `rotate_half`)."""

from __future__ import annotations

import math
from typing import Any

import torch


def compute_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies `[head_dim // 2]` float32, as transformers computes them for the
    "default", "linear" and "llama3" rope types."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [head_dim // 2]
    if scaling is None:
        return inv_freq
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by `factor`, short ones kept,
    a smooth interpolation in between (transformers' `_compute_llama3_parameters`)."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = int(scaling["original_max_position_embeddings"])

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """Holds a float32 cos/sin table per position, built once on first use (on the device of
    the positions) and grown when a position exceeds it, unless `build_table` fixed it
    beforehand (what a CUDA graph needs: a table built or rebuilt inside a capture would be
    captured, or forbidden).

    Not an nn.Module on purpose: the table must stay float32 when the model is cast.
    """

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        theta: float,
        scaling: dict[str, Any] | None = None,
    ) -> None:
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embedding, got {head_dim}")
        self.head_dim = head_dim
        self.max_position = max_position
        with torch.device("cpu"):  # also when the model is built under a meta device context
            self.inv_freq = compute_inv_freq(head_dim, theta, scaling)  # [head_dim // 2]
        # (cos, signed sin), each [num_positions, head_dim] float32, built on first use.
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._fixed = False  # set by `build_table`: `cos_sin` never rebuilds the table then

    def build_table(self, num_positions: int, device: torch.device | str) -> None:
        """Build the table for positions [0, num_positions) on `device` now, once and for all:
        from then on `cos_sin` only reads it, and raises ValueError for positions beyond it or
        on another device instead of rebuilding it. Call it before capturing a CUDA graph."""
        if num_positions < 1:
            raise ValueError(f"num_positions must be >= 1, got {num_positions}")
        self._table = self._build(num_positions, torch.device(device))
        self._fixed = True

    def _build(self, num_positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.device("cpu"):  # computed on CPU so every device gets the same table
            t = torch.arange(num_positions, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq)  # [num_positions, head_dim // 2]
            cos, sin = freqs.cos(), freqs.sin()
            # [num_positions, head_dim]; the sign makes rotate_half a plain roll (see below)
            return torch.cat((cos, cos), -1).to(device), torch.cat((-sin, sin), -1).to(device)

    def cos_sin(
        self, positions: torch.Tensor, max_position: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin `[num_tokens, 1, head_dim]` in `dtype` for `positions
        [num_tokens]`, to pass to `apply_rotary`.

        `max_position` is an upper bound (exclusive) of the positions, given by the caller so
        that no device sync is needed to check it.
        """
        table = self._table
        if table is None or table[0].device != positions.device or len(table[0]) < max_position:
            if self._fixed and table is not None:
                raise ValueError(
                    f"max_position={max_position} on {positions.device} is outside the table "
                    f"fixed by build_table ({len(table[0])} positions on {table[0].device})")
            size = self.max_position
            if max_position > size:  # grow geometrically beyond the configured maximum
                size = 1 << (max_position - 1).bit_length()
            table = self._table = self._build(size, positions.device)
        cos, sin = table
        return cos[positions, None].to(dtype), sin[positions, None].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [num_tokens, num_heads, head_dim]` by the output of `cos_sin`.

    Same as Hugging Face's `x * cos + rotate_half(x) * sin` (first half / second half
    pairs), bit for bit: rotate_half(x) = cat(-x2, x1) = roll(x) * [-1 ... 1 ...], and the
    sign is folded into the sin table.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
