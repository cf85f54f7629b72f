"""paged_attention against a dense reference, and RoPE against transformers."""

from __future__ import annotations

import pytest
import torch
from engine_core.models.attention import AttentionMetadata, paged_attention
from engine_core.models.rope import RotaryEmbedding, apply_rotary

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 6, 2, 8, 4, 64


def _reference(q, k, v, scale):
    """Dense causal attention of the last q.shape[0] positions over k/v [ctx, Hkv, D]."""
    n, ctx = q.shape[0], k.shape[0]
    group = NUM_HEADS // NUM_KV_HEADS
    k = k.repeat_interleave(group, dim=1)  # [ctx, H, D]
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [H, n, ctx]
    allowed = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, -1)


def test_metadata_layout():
    meta = AttentionMetadata.build([3, 1, 2], [0, 5, 4], [[7], [2, 9], [4, 5]], 4, "cpu")
    assert meta.query_start_loc == [0, 3, 4, 6]
    assert meta.seq_lens == [3, 6, 6]
    assert meta.positions.tolist() == [0, 1, 2, 5, 4, 5]
    assert meta.slot_mapping.tolist() == [28, 29, 30, 37, 20, 21]
    assert meta.block_tables.tolist() == [[7, 0], [2, 9], [4, 5]]
    assert meta.decode is not None and meta.decode.token_index == slice(3, 4)
    assert [(p.start, p.end, p.context is None) for p in meta.prefills] == [
        (0, 3, True),
        (4, 6, False),
    ]


def test_metadata_rejects_bad_input():
    with pytest.raises(ValueError, match="one entry per sequence"):
        AttentionMetadata.build([1, 1], [0], [[1], [2]], 4, "cpu")
    with pytest.raises(ValueError, match="block table holds only 1 blocks"):
        AttentionMetadata.build([5], [0], [[1]], 4, "cpu")
    with pytest.raises(ValueError, match="at least one new token"):
        AttentionMetadata.build([0], [0], [[1]], 4, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_matches_dense_reference(dtype):
    torch.manual_seed(0)
    # Two steps over five sequences: (cached tokens, new tokens) per step, mixing plain
    # prefill, decode, chunked prefill and decode rows that are not contiguous.
    steps = [
        [(0, 7), (0, 1), (0, 12), (0, 3), (0, 2)],
        [(7, 1), (1, 5), (12, 1), (3, 1), (2, 9)],
    ]
    k_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(NUM_BLOCKS - 1).add(1).tolist()
    tables: list[list[int]] = [[] for _ in steps[0]]
    history = [([], [], []) for _ in steps[0]]  # per sequence: all q, k, v rows so far
    scale = HEAD_DIM**-0.5
    for step in steps:
        for (done, new), table in zip(step, tables):
            while len(table) * BLOCK_SIZE < done + new:
                table.append(free.pop())
        num_tokens = sum(new for _, new in step)
        q = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, dtype=dtype)
        k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, dtype=dtype)
        v = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, dtype=dtype)
        meta = AttentionMetadata.build(
            [new for _, new in step], [done for done, _ in step], tables, BLOCK_SIZE, "cpu"
        )
        out = paged_attention(q, k, v, k_cache, v_cache, meta, scale)
        assert out.shape == (num_tokens, NUM_HEADS * HEAD_DIM)
        for i, start in enumerate(meta.query_start_loc[:-1]):
            rows = slice(start, meta.query_start_loc[i + 1])
            for store, new_rows in zip(history[i], (q[rows], k[rows], v[rows])):
                store.append(new_rows)
            ks, vs = torch.cat(history[i][1]), torch.cat(history[i][2])
            expected = _reference(q[rows].float(), ks.float(), vs.float(), scale)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out[rows].float(), expected, atol=tol, rtol=tol)


def test_rope_matches_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, rotate_half

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    for rope_scaling in [None, {"rope_type": "linear", "factor": 2.0}, scaling]:
        config = LlamaConfig(
            hidden_size=256,
            num_attention_heads=4,
            max_position_embeddings=64,
            rope_theta=500000.0,
            rope_scaling=rope_scaling,
        )
        hf_rope = LlamaRotaryEmbedding(config)
        ours = RotaryEmbedding(64, 64, 500000.0, rope_scaling)
        torch.testing.assert_close(ours.inv_freq, hf_rope.inv_freq, atol=0, rtol=0)

        positions = torch.tensor([0, 1, 5, 63, 100, 1000])  # past the table: it grows
        x = torch.randn(len(positions), 3, 64)
        cos, sin = hf_rope(x, positions[None])  # [1, n, 64]
        expected = x * cos[0, :, None] + rotate_half(x) * sin[0, :, None]
        our_cos, our_sin = ours.cos_sin(positions, 1001, torch.float32)
        torch.testing.assert_close(apply_rotary(x, our_cos, our_sin), expected)
