"""Paged attention in Triton: one kernel for decode, prefill and chunked prefill over a cached
prefix, reading K/V straight from the cache blocks named by each sequence's block table.

The kernel (`_paged_attention_kernel`). A program owns one sequence, one KV head and a tile of
BLOCK_Q of the sequence's new tokens; the tile's rows are those tokens times the GROUP query heads
that share the KV head (row m: token m // GROUP, head m % GROUP), padded to BLOCK_M (a power of
two, at least 16 for `tl.dot`). It walks the keys its last token may see in tiles of BLOCK_N
positions, looks each key's physical block up in the block table (so any block size works,
independent of BLOCK_N), and keeps an online softmax in float32. The grid is
(num_seqs, cdiv(max_query_len, BLOCK_Q), num_kv_heads): a function of the batch size and the
longest query alone, never of the context lengths (read from `seq_lens` inside the kernel), so a
decode step can be captured in a CUDA graph. Programs past a sequence's query length return at
once. Each sequence's new tokens are the last query_len positions of its context (causal).

Launch configurations (`kernel_configs`): a decode-only step (max_query_len == 1) launches with
BLOCK_Q = 1 (the rows are one token's query heads); any other step with a prefill tile of about
128 rows (16-bit) or 32 rows (float32). float32 dots run with input_precision="ieee" (no TF32:
float32 greedy output matches transformers); float16/bfloat16 dots are native with float32
accumulation, the probabilities cast to V's dtype before P @ V (transformers' eager numerics).
Split-KV decode ("flash-decoding"): when a decode step has too few (sequence, KV head) pairs
to fill the GPU, each pair's keys are cut into num_splits contiguous ranges, one program each
(the same kernel with SPLIT_KV, grid (num_seqs, num_splits, num_kv_heads)); each writes its
normalised partial output and log-sum-exp in float32, and `_combine_splits_kernel` merges them.
num_splits comes from the batch size and the SM count alone (`decode_splits`), never from the
context lengths, so a graph captured at a batch size holds it too.

The launcher uses exactly the configurations `kernel_configs` lists, so a test that compiles
them for a GPU target compiles everything the engine can launch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

# Shared memory a K (or V) tile may take in one pipeline stage: K + V over 3 stages stay within
# ~96 KiB, under the per-block limit of both an A100 (163 KiB) and an H100 (227 KiB).
_KV_TILE_BYTES = 16 * 1024
# The most key ranges a split-KV decode cuts a context into (a power of two: the combine
# kernel's tile).
MAX_SPLITS = 32


@dataclass(frozen=True)
class KernelConfig:
    """One compiled variant of `_paged_attention_kernel`: its constexpr arguments and launch
    options. `kind` is "decode" (launched when max_query_len == 1), "decode_split" (the same
    with its keys cut into ranges, when the batch is small) or "prefill" (otherwise)."""

    kernel = "_paged_attention_kernel"
    kind: str
    split_kv: bool  # one program per range of keys, partial results for `CombineConfig`
    head_dim: int  # D of the model
    block_d: int  # D padded to a power of two >= 16
    group: int  # query heads per KV head
    block_size: int  # tokens per cache block
    block_q: int  # query tokens per program
    block_m: int  # rows of a program's tile: block_q * group padded to a power of two >= 16
    block_n: int  # keys per inner iteration
    dot_precision: str  # "ieee" for float32 inputs (no TF32); unused by 16-bit dots
    num_warps: int
    num_stages: int

    def constexprs(self) -> dict[str, int | str]:
        """The kernel's constexpr arguments, by name."""
        return {"HEAD_DIM": self.head_dim, "BLOCK_D": self.block_d, "GROUP": self.group,
                "BLOCK_SIZE": self.block_size, "BLOCK_Q": self.block_q,
                "BLOCK_M": self.block_m, "BLOCK_N": self.block_n,
                "DOT_PRECISION": self.dot_precision, "SPLIT_KV": self.split_kv}


@dataclass(frozen=True)
class CombineConfig:
    """The compiled variant of `_combine_splits_kernel` that merges a split-KV decode's
    partial results (kind "combine")."""

    kernel = "_combine_splits_kernel"
    kind: str
    head_dim: int
    block_d: int
    block_s: int  # MAX_SPLITS: the splits one program merges
    num_warps: int
    num_stages: int

    def constexprs(self) -> dict[str, int | str]:
        """The kernel's constexpr arguments, by name."""
        return {"HEAD_DIM": self.head_dim, "BLOCK_D": self.block_d, "BLOCK_S": self.block_s}


def kernel_configs(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                   dtype: torch.dtype) -> tuple[KernelConfig | CombineConfig, ...]:
    """Every configuration `triton_paged_attention` can launch for a model of this shape, by
    kind: "decode", "decode_split", "combine" (after a split decode), "prefill"."""
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads "
                         f"({num_kv_heads})")
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    fp32 = dtype == torch.float32
    element_size = 4 if fp32 else 2
    # Keys per iteration: a K tile of at most _KV_TILE_BYTES, 16..64 keys.
    block_n = max(16, min(64, _KV_TILE_BYTES // (block_d * element_size)))
    precision = "ieee" if fp32 else "tf32"

    def config(kind: str, block_q: int, num_warps: int, num_stages: int) -> KernelConfig:
        return KernelConfig(kind=kind, split_kv=kind == "decode_split", head_dim=head_dim,
                            block_d=block_d, group=group,
                            block_size=block_size, block_q=block_q,
                            block_m=max(16, triton.next_power_of_2(block_q * group)),
                            block_n=block_n, dot_precision=precision, num_warps=num_warps,
                            num_stages=num_stages)

    # Decode: one token's query heads are the rows; memory-bound, so 4 warps and a 3-deep
    # pipeline of K/V loads.
    decode = config("decode", 1, num_warps=4, num_stages=3)
    decode_split = config("decode_split", 1, num_warps=4, num_stages=3)
    combine = CombineConfig(kind="combine", head_dim=head_dim, block_d=block_d,
                            block_s=MAX_SPLITS, num_warps=4, num_stages=1)
    # Prefill: about 128 rows a tile in 16-bit (tensor cores), 64 for head dims above 128
    # (registers); 32 in float32, whose "ieee" dot runs on FMA units (8 warps: 4 spill on sm90).
    if fp32:
        target_rows, warps, stages = 32, 8, 2
    elif block_d > 128:
        target_rows, warps, stages = 64, 8, 2
    else:
        target_rows, warps, stages = 128, 8, 3
    prefill = config("prefill", max(1, target_rows // group), num_warps=warps,
                     num_stages=stages)
    return (decode, decode_split, combine, prefill)


@functools.lru_cache(maxsize=64)
def _launch_configs(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                    dtype: torch.dtype) -> dict[str, KernelConfig | CombineConfig]:
    return {c.kind: c for c in kernel_configs(num_heads, num_kv_heads, head_dim, block_size,
                                               dtype)}


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """Key ranges per (sequence, KV head) of a decode step: 1 when the batch has about a wave
    of programs already, else the power of two (at most MAX_SPLITS) that brings it near one
    program per SM. A function of host-known values alone, so a captured graph holds it."""
    programs = num_seqs * num_kv_heads
    if programs * 2 > num_sms:
        return 1
    return min(MAX_SPLITS, 1 << ((num_sms // programs).bit_length() - 1))


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch: its configuration (whose `kernel` names the Triton function), grid,
    and positional (non-constexpr) arguments in the kernel's order."""

    config: KernelConfig | CombineConfig
    grid: tuple[int, ...]
    args: tuple[Any, ...]


def kernel_launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor,
                  query_start_loc: torch.Tensor, max_query_len: int, scale: float,
                  out: torch.Tensor, num_splits: int | None = None) -> tuple[KernelLaunch, ...]:
    """Check `triton_paged_attention`'s arguments and plan its launches (one, or a split decode
    and its combine, with their float32 scratch buffers). The ahead-of-time compile test builds
    its signatures from this."""
    if q.dim() != 3 or q.stride(2) != 1:
        raise ValueError(f"q must be [num_tokens, H, D] with stride(2) == 1, got shape "
                         f"{tuple(q.shape)} strides {q.stride()}")
    num_tokens, num_heads, head_dim = q.shape
    if k_cache.dim() != 4 or not k_cache.is_contiguous() or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache must be contiguous [num_blocks, block_size, Hkv, {head_dim}], "
                         f"got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or not v_cache.is_contiguous():
        raise ValueError(f"v_cache must be contiguous like k_cache {tuple(k_cache.shape)}, got "
                         f"{tuple(v_cache.shape)}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype == out.dtype):
        raise ValueError(f"q, k_cache, v_cache and out must share a dtype, got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}, {out.dtype}")
    if out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with stride(2) == 1, got shape "
                         f"{tuple(out.shape)} strides {out.stride()}")
    num_seqs = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [num_seqs={num_seqs}, max_blocks], got "
                         f"{tuple(block_tables.shape)}")
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"query_start_loc must be [num_seqs + 1 = {num_seqs + 1}], got "
                         f"{tuple(query_start_loc.shape)}")
    for name, index in (("block_tables", block_tables), ("seq_lens", seq_lens),
                        ("query_start_loc", query_start_loc)):
        if index.dtype != torch.int64:
            raise ValueError(f"{name} must be int64, got {index.dtype}")
    if max_query_len < 1:
        raise ValueError(f"max_query_len must be >= 1, got {max_query_len}")
    _, block_size, num_kv_heads, _ = k_cache.shape
    configs = _launch_configs(num_heads, num_kv_heads, head_dim, block_size, q.dtype)
    if max_query_len > 1:
        splits = 1
    elif num_splits is not None:
        splits = num_splits
    elif q.device.type == "cuda":
        splits = decode_splits(num_seqs, num_kv_heads, _sm_count(q.device))
    else:
        splits = 1
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {splits}")
    common = (k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
              q.stride(0), q.stride(1), out.stride(0), out.stride(1),
              k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0))
    if splits == 1:
        config = configs["decode" if max_query_len == 1 else "prefill"]
        assert isinstance(config, KernelConfig)
        grid = (num_seqs, triton.cdiv(max_query_len, config.block_q), num_kv_heads)
        # out stands in for the unused partial buffers
        return (KernelLaunch(config, grid, (out, q, out, out, *common)),)
    split, combine = configs["decode_split"], configs["combine"]
    assert isinstance(split, KernelConfig) and isinstance(combine, CombineConfig)
    rows = num_tokens * splits * num_heads
    partial_out = torch.empty(rows * split.block_d, dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(rows, dtype=torch.float32, device=q.device)
    return (
        KernelLaunch(split, (num_seqs, splits, num_kv_heads),
                     (out, q, partial_out, partial_lse, *common)),
        KernelLaunch(combine, (num_tokens, num_heads),
                     (out, partial_out, partial_lse, splits, out.stride(0), out.stride(1))),
    )


def triton_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           query_start_loc: torch.Tensor, max_query_len: int, scale: float,
                           out: torch.Tensor, *, num_splits: int | None = None) -> None:
    """Write into `out` [num_tokens, H, D] the causal attention of each sequence's new tokens
    over its context in the paged cache (the new tokens' K/V already stored).

    q: [num_tokens, H, D], any strides with stride(2) == 1 (a view of a fused projection is
    fine); k_cache, v_cache: [num_blocks, block_size, Hkv, D] contiguous, q's dtype;
    block_tables: [num_seqs, max_blocks] int64 (entries past a context are never read);
    seq_lens: [num_seqs] int64 context length after this step; query_start_loc: [num_seqs + 1]
    int64 token offsets (sequence i's new tokens are q[query_start_loc[i]:query_start_loc[i+1]],
    the last of its seq_lens[i] positions; a sequence with none is skipped); max_query_len: a
    host int >= every query length (1 launches a decode configuration). out: [num_tokens, H,
    D] with stride(2) == 1. num_splits (decode only): key ranges per sequence and KV head;
    default: `decode_splits` of the batch on CUDA, 1 elsewhere. Nothing is read back to the
    host, and the grids depend on num_seqs, max_query_len and num_splits alone (a decode step
    can be captured in a CUDA graph)."""
    launches = kernel_launch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                             max_query_len, scale, out, num_splits)
    if q.shape[0] == 0 or seq_lens.shape[0] == 0:
        return
    for launch in launches:
        kernel = (_paged_attention_kernel if launch.config.kernel == "_paged_attention_kernel"
                  else _combine_splits_kernel)
        kernel[launch.grid](*launch.args, **launch.config.constexprs(),
                            num_warps=launch.config.num_warps,
                            num_stages=launch.config.num_stages)


# The index arrays are views at any offset of one step buffer (executors/step_inputs.py) and the
# block table's width changes with the batch: not specialised on, so their alignment or a width
# of 1 never compiles another variant.
@triton.jit(do_not_specialize=["block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr",
                               "stride_table_seq"])
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, H, D]
    q_ptr,  # [num_tokens, H, D], stride(2) == 1
    partial_out_ptr,  # SPLIT_KV: [num_tokens, num_splits, H, BLOCK_D] float32
    partial_lse_ptr,  # SPLIT_KV: [num_tokens, num_splits, H] float32 log2-sum-exp2
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
    v_cache_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D]
    block_tables_ptr,  # [num_seqs, max_blocks] int64
    seq_lens_ptr,  # [num_seqs] int64
    query_start_loc_ptr,  # [num_seqs + 1] int64
    scale,  # float32 softmax scale
    stride_q_token, stride_q_head,
    stride_out_token, stride_out_head,
    stride_cache_block, stride_cache_token, stride_cache_head,
    stride_table_seq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_KV: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(2)
    if SPLIT_KV:  # decode (BLOCK_Q == 1): axis 1 is the range of keys
        q_tile = 0
        split = tl.program_id(1)
        num_splits = tl.num_programs(1)
    else:  # axis 1 is the tile of query tokens
        q_tile = tl.program_id(1)

    q_start = tl.load(query_start_loc_ptr + seq)  # int64 first token of the sequence
    q_len = (tl.load(query_start_loc_ptr + seq + 1) - q_start).to(tl.int32)
    first_q = q_tile * BLOCK_Q  # the tile's first token within the sequence's new tokens
    if first_q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    tl.device_assert(q_len <= seq_len, "a sequence has more new tokens than its seq_len")
    context_len = seq_len - q_len  # positions cached before this step

    offs_m = tl.arange(0, BLOCK_M)
    q_idx = first_q + offs_m // GROUP  # [BLOCK_M] token of each row within the new tokens
    head = kv_head * GROUP + offs_m % GROUP  # [BLOCK_M] query head of each row
    row_valid = (offs_m < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = context_len + q_idx  # [BLOCK_M] absolute position of each row's token
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM

    q_ptrs = (q_ptr + (q_start + q_idx)[:, None] * stride_q_token
              + head[:, None] * stride_q_head + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)  # [M, D]

    # The keys the tile's last token may see: positions [kv_start, kv_end).
    kv_start = 0
    kv_end = tl.minimum(context_len + first_q + BLOCK_Q, seq_len)
    if SPLIT_KV:  # this program's range: whole key tiles, the last ranges possibly empty
        chunk = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
        kv_start = split * chunk
        kv_end = tl.minimum(kv_start + chunk, kv_end)
    qk_scale = scale * 1.4426950408889634  # softmax in base 2
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    head_offset = kv_head * stride_cache_head
    for start in range(kv_start, kv_end, BLOCK_N):
        key = start + offs_n  # [N] key positions
        key_valid = key < kv_end
        block = tl.load(table_row + key // BLOCK_SIZE, mask=key_valid, other=0)  # [N] int64
        slot = block * stride_cache_block + (key % BLOCK_SIZE) * stride_cache_token + head_offset
        kv_offsets = slot[:, None] + offs_d[None, :]  # [N, D]
        kv_mask = key_valid[:, None] & d_valid[None, :]
        k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)  # [N, D]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [M, N] float32
        # Causal (and past-the-context) mask. A split's range is whole tiles, so no key of a
        # tile lies past it but those past the context.
        visible = key[None, :] <= q_pos[:, None]
        qk = tl.where(visible, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # [M]
        # A row that has seen no key yet keeps -inf; subtract 0 there so nothing is NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])  # [M, N]
        alpha = tl.exp2(m_i - m_safe)  # [M] rescales what was summed before
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # [M, D]; a row with no key: zeros
    if SPLIT_KV:
        # row (token, split, head) of the partial buffers; an empty range leaves lse = -inf
        partial_row = ((q_start + q_idx) * num_splits + split) * (GROUP * tl.num_programs(2)) \
            + head  # [M] int64
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(partial_lse_ptr + partial_row, lse, mask=row_valid)
        tl.store(partial_out_ptr + partial_row[:, None] * BLOCK_D + offs_d[None, :], out,
                 mask=row_valid[:, None] & d_valid[None, :])
    else:
        out_ptrs = (out_ptr + (q_start + q_idx)[:, None] * stride_out_token
                    + head[:, None] * stride_out_head + offs_d[None, :])
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty),
                 mask=row_valid[:, None] & d_valid[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _combine_splits_kernel(
    out_ptr,  # [num_tokens, H, D]
    partial_out_ptr,  # [num_tokens, num_splits, H, BLOCK_D] float32
    partial_lse_ptr,  # [num_tokens, num_splits, H] float32
    num_splits,
    stride_out_token, stride_out_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One (token, head): the splits' partial outputs weighted by their share of the softmax."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_valid = offs_s < num_splits
    row = (token * num_splits + offs_s) * tl.num_programs(1) + head  # [S]
    lse = tl.load(partial_lse_ptr + row, mask=s_valid, other=float("-inf"))  # [S]
    lse_max = tl.max(lse, 0)
    weight = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))  # [S], 0 if empty
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    partial = tl.load(partial_out_ptr + row[:, None] * BLOCK_D + offs_d[None, :],
                      mask=s_valid[:, None] & d_valid[None, :], other=0.0)  # [S, D]
    total = tl.sum(weight, 0)
    out = tl.sum(partial * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)  # [D]
    tl.store(out_ptr + token * stride_out_token + head * stride_out_head + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=d_valid)
