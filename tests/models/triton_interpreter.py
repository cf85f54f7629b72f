"""Triton's interpreter made strict for tests (Triton 3.6): what a GPU would catch or compute,
checked on CPU.

`interpreter_checks()` patches, for the duration of a `with` block:
- the debug option (`InterpreterOptions.debug`, which nothing but the builder's options turns on
  in the interpreter): `tl.device_assert` fires, and int32 arithmetic is checked for overflow;
- bounds: every address a masked-in lane loads or stores must lie inside the extent of one of
  the launch's tensor arguments (the interpreter itself reads and writes raw memory unchecked);
- bfloat16 `tl.dot`, which the interpreter computes on the raw 16-bit patterns: the operands are
  converted to float32 first (what a GPU's bf16 MMA with float32 accumulation computes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import triton.language as tl
from triton.runtime import interpreter as _interp


class OutOfBounds(AssertionError):
    """A kernel touched memory outside every tensor argument of its launch."""


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) that the view `t` may address."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _check(ptrs, mask, extents: list[tuple[int, int]], what: str) -> None:
    addresses = np.broadcast_to(ptrs.data, np.broadcast_shapes(ptrs.data.shape,
                                                               mask.data.shape))
    addresses = addresses[np.broadcast_to(mask.data, addresses.shape)].astype(np.uint64)
    if addresses.size == 0:
        return
    itemsize = np.dtype(_interp._get_np_dtype(ptrs.get_element_ty())).itemsize
    inside = np.zeros(addresses.shape, dtype=bool)
    for lo, hi in extents:
        inside |= (addresses >= lo) & (addresses + itemsize <= hi)
    if not inside.all():
        bad = addresses[~inside]
        raise OutOfBounds(f"{what} of {bad.size} element(s) outside every tensor argument, "
                          f"first at {int(bad[0]):#x}; arguments span "
                          f"{[(hex(lo), hex(hi)) for lo, hi in extents]}")


@contextmanager
def interpreter_checks() -> Iterator[None]:
    """Debug option, bounds checks and a correct bfloat16 `tl.dot` in the interpreter."""
    extents: list[tuple[int, int]] = []
    builder_cls = _interp.InterpreterBuilder
    original_init_args = _interp.GridExecutor._init_args_hst
    original_load = builder_cls.create_masked_load
    original_store = builder_cls.create_masked_store
    original_dot = builder_cls.create_dot

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = original_init_args(self, args_dev, kwargs)
        extents.clear()
        extents.extend(_extent(a) for a in [*args_hst, *kwargs_hst.values()]
                       if isinstance(a, torch.Tensor))
        return args_hst, kwargs_hst

    def load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
        _check(ptrs, mask, extents, "a load")
        return original_load(self, ptrs, mask, other, cache_modifier, eviction_policy,
                             is_volatile)

    def store(self, ptrs, value, mask, cache_modifier, eviction_policy):
        _check(ptrs, mask, extents, "a store")
        return original_store(self, ptrs, value, mask, cache_modifier, eviction_policy)

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            def to_fp32(h):
                data = _interp._convert_float(h.data, tl.bfloat16, tl.float32, None)
                return _interp.TensorHandle(data.view(np.float32), tl.float32)

            a, b = to_fp32(a), to_fp32(b)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_interp.GridExecutor, "_init_args_hst", init_args)
        patch.setattr(builder_cls, "create_masked_load", load)
        patch.setattr(builder_cls, "create_masked_store", store)
        patch.setattr(builder_cls, "create_dot", dot)
        patch.setattr(_interp.interpreter_builder, "options",
                      _interp.InterpreterOptions(debug=True))
        yield
