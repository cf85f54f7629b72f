"""`models/linear.py`: oneDNN linears meet few distinct token counts (issue 18: every new shape
is a primitive kept in oneDNN's caches, and the server's RSS grew with each), and padding the
rows changes no result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_core.models import linear as linear_module
from engine_core.models.linear import EXACT_ROWS, Linear, linear, padded_rows

onednn = pytest.mark.skipif(not linear_module._HAS_ONEDNN_LINEAR, reason="no oneDNN linear")


def test_padded_rows_are_few_and_close():
    sizes = {padded_rows(n) for n in range(1, 8193)}
    assert len(sizes) <= EXACT_ROWS + 16 * 9
    for n in range(1, 8193):
        assert n <= padded_rows(n) <= n + n / 16
    assert [padded_rows(n) for n in range(1, EXACT_ROWS + 1)] == list(range(1, EXACT_ROWS + 1))


@onednn
def test_the_primitive_sees_only_padded_token_counts(monkeypatch):
    seen = set()

    def recording(x, weight, bias, *rest):
        seen.add(x.shape[0])
        return F.linear(x, weight, bias)

    monkeypatch.setattr(linear_module, "_linear_pointwise", recording)
    weight = torch.randn(8, 4)
    for n in range(1, 2049):
        assert linear(torch.randn(n, 4), weight).shape == (n, 8)
    assert len(seen) <= EXACT_ROWS + 16 * 7, len(seen)  # not one primitive per token count


@onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 16, 17, 100, 1000])
def test_padding_changes_no_result(dtype, n):
    torch.manual_seed(n)
    layer = Linear(64, 48, bias=True).to(dtype)
    x = torch.randn(n, 64, dtype=dtype)
    with torch.inference_mode():
        expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        layer.pack_weight()
        got = layer(x)
    assert got.shape == (n, 48)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


@onednn
def test_warm_up_runs_each_shape_once_per_padded_size():
    from torch import nn

    model = nn.Sequential(Linear(32, 64), Linear(32, 64), Linear(64, 32, bias=False))
    for layer in model:
        layer.pack_weight()
    head = model[2]
    calls = linear_module.warm_up_linears(model, 100, {head: 20})
    sizes_100 = len({padded_rows(n) for n in range(1, 101)})
    assert calls == sizes_100 + 20  # the two (32, 64) layers share their primitives
