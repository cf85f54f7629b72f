"""The Triton paged-attention kernel against the torch backend (`paged_attention`) and the
float32 oracle (`reference_paged_attention`).

Without a GPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before triton loads) with the debug option, bounds checks and a correct bf16
`tl.dot` (tests/models/triton_interpreter.py), on tiny shapes. With a GPU the same cases run
compiled on CUDA. Every cache slot outside the contexts, the fused tensor q is a view of, and
`out` start as NaN: a read of the wrong slot or a row left unwritten shows as NaN.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from engine_core.models.attention import AttentionMetadata, paged_attention
from engine_core.models.triton_attention import TritonAttentionMetadata, reference_paged_attention
from engine_core.models.triton_paged_attention import (
    MAX_SPLITS,
    KernelConfig,
    decode_splits,
    kernel_configs,
    kernel_launch,
    triton_paged_attention,
)

from tests.models.triton_interpreter import interpreter_checks

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and Triton's interpreter is off", allow_module_level=True)

# Tolerances against the float32 oracle, by dtype (the kernel rounds P to the input dtype
# before P @ V, as transformers' eager attention does).
TOLERANCE = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _strict_interpreter() -> Iterator[None]:
    if ON_GPU:
        yield
    else:
        with interpreter_checks():
            yield


@dataclass
class Case:
    """One step's attention inputs: caches holding each context's cached prefix and the new
    tokens' K/V (the kernel's precondition), the rest NaN."""

    q: torch.Tensor  # [num_tokens, H, D], a view of a fused [num_tokens, H + Hkv, D] tensor
    k: torch.Tensor  # [num_tokens, Hkv, D] the new tokens' keys
    v: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    tables: list[list[int]]
    query_lens: list[int]
    computed: list[int]
    meta: TritonAttentionMetadata
    block_size: int


def make_case(steps: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
              block_size: int, dtype: torch.dtype, *, seed: int = 0,
              fused_q: bool = True) -> Case:
    """steps: (cached tokens, new tokens) per sequence. Blocks are drawn shuffled from 1..;
    block 0 (the table's padding) and every slot outside a context hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    computed = [c for c, _ in steps]
    query_lens = [n for _, n in steps]
    needed = [-(-(c + n) // block_size) for c, n in steps]
    num_blocks = sum(needed) + 3
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = [[free.pop() for _ in range(n)] for n in needed]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    meta = TritonAttentionMetadata.build(query_lens, computed, tables, block_size, "cpu")
    num_tokens = sum(query_lens)
    fused = torch.randn(num_tokens, num_heads + num_kv_heads, head_dim, generator=gen)
    fused[:, num_heads:] = float("nan")  # never read through the q view
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    for i, (cached, _) in enumerate(steps):  # the cached prefix
        positions = torch.arange(cached)
        slots = torch.tensor(tables[i])[positions // block_size] * block_size + (
            positions % block_size)
        flat_k = k_cache.view(-1, num_kv_heads, head_dim)
        flat_v = v_cache.view(-1, num_kv_heads, head_dim)
        flat_k[slots] = torch.randn(cached, num_kv_heads, head_dim, generator=gen).to(dtype)
        flat_v[slots] = torch.randn(cached, num_kv_heads, head_dim, generator=gen).to(dtype)
    # The new tokens' K/V, stored as `attend` stores them before the kernel runs.
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    device = torch.device(DEVICE)
    q = fused.to(dtype).to(device)[:, :num_heads]  # [num_tokens, H, D] strided view
    meta = TritonAttentionMetadata.build(query_lens, computed, tables, block_size, device)
    return Case(q=q if fused_q else q.contiguous(),
                k=k.to(device), v=v.to(device), k_cache=k_cache.to(device),
                v_cache=v_cache.to(device), tables=tables, query_lens=query_lens,
                computed=computed, meta=meta, block_size=block_size)


def run_kernel(case: Case, scale: float, max_query_len: int | None = None,
               num_splits: int | None = 1) -> torch.Tensor:
    out = torch.full(case.q.shape, float("nan"), dtype=case.q.dtype, device=case.q.device)
    m = case.meta
    triton_paged_attention(case.q, case.k_cache, case.v_cache, m.block_tables, m.seq_lens,
                           m.query_start_loc, max_query_len or m.max_query_len, scale, out,
                           num_splits=num_splits)
    return out  # [num_tokens, H, D]


def check_against_oracles(case: Case, out: torch.Tensor, scale: float) -> None:
    m = case.meta
    dtype = case.q.dtype
    tol = TOLERANCE[dtype]
    assert not out.isnan().any(), "a row was not written, or read a slot outside its context"
    reference = reference_paged_attention(case.q, case.k_cache, case.v_cache, m.block_tables,
                                          m.seq_lens, m.query_start_loc, scale)
    torch.testing.assert_close(out.float(), reference.float(), atol=tol, rtol=tol)
    # The torch backend reads padding slots and masks them, so it needs zeros there.
    k_cache = case.k_cache.nan_to_num(0.0)
    v_cache = case.v_cache.nan_to_num(0.0)
    torch_meta = AttentionMetadata.build(case.query_lens, case.computed, case.tables,
                                         case.block_size, case.q.device)
    expected = paged_attention(case.q, case.k, case.v, k_cache, v_cache, torch_meta, scale)
    torch.testing.assert_close(out.reshape(expected.shape).float(), expected.float(),
                               atol=2 * tol, rtol=2 * tol)


# (num_heads, num_kv_heads, head_dim, block_size, dtype): every GQA ratio (1, 2, 4, 7), block
# size (1, 3, 5, 16, 32), head dim (8 and 80 padded, 16) and dtype appears, fp32 most.
SHAPES = [
    (2, 2, 16, 16, torch.float32),
    (4, 2, 8, 1, torch.float32),
    (4, 1, 80, 5, torch.float32),
    (14, 2, 8, 3, torch.float32),
    (7, 1, 16, 32, torch.float16),
    (8, 2, 16, 16, torch.bfloat16),
    (4, 2, 80, 3, torch.bfloat16),
    (2, 2, 8, 5, torch.float16),
]
SHAPE_IDS = [f"H{h}-Hkv{kv}-D{d}-bs{bs}-{str(dt).removeprefix('torch.')}"
             for h, kv, d, bs, dt in SHAPES]

# Decode-only: contexts of 1 (the new token alone), partial last blocks, and over two and three
# key tiles (BLOCK_N is 16..64).
DECODE_STEPS = [(0, 1), (4, 1), (16, 1), (70, 1), (139, 1)]
# Mixed: a plain prefill spanning several query tiles, decodes, chunked prefills over a cached
# prefix (one ending mid-block, one longer than a key tile).
MIXED_STEPS = [(0, 37), (9, 1), (21, 6), (0, 1), (66, 19), (5, 2)]


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim", "block_size", "dtype"),
                         SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize(("steps", "num_splits"),
                         [(DECODE_STEPS, 1), (DECODE_STEPS, 4), (MIXED_STEPS, 1)],
                         ids=["decode", "decode_split", "mixed"])
def test_kernel_matches_torch_backend(steps, num_splits, num_heads, num_kv_heads, head_dim,
                                      block_size, dtype):
    case = make_case(steps, num_heads, num_kv_heads, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    launches = kernel_launch(case.q, case.k_cache, case.v_cache, case.meta.block_tables,
                             case.meta.seq_lens, case.meta.query_start_loc,
                             case.meta.max_query_len, scale, case.q, num_splits)
    kinds = [launch.config.kind for launch in launches]
    if num_splits > 1:
        # 4 ranges of whole key tiles: the 139-token context fills 3 (BLOCK_N 64) or 4, the
        # others leave some empty
        assert kinds == ["decode_split", "combine"]
        assert launches[0].grid == (len(steps), num_splits, num_kv_heads)
    else:
        assert kinds == ["decode" if steps is DECODE_STEPS else "prefill"]
        # The 37-token prefill spans several query tiles in all but the 16-bit G <= 2 shapes.
        config = launches[0].config
        assert isinstance(config, KernelConfig)
        assert launches[0].grid[1] == -(-case.meta.max_query_len // config.block_q)
    check_against_oracles(case, run_kernel(case, scale, num_splits=num_splits), scale)


def test_split_decode_over_any_number_of_ranges():
    # 1 range, more ranges than key tiles, a count that is no power of two, the most allowed:
    # the same rows up to float32 rounding.
    case = make_case([(139, 1), (4, 1), (60, 1)], 3, 1, 16, 5, torch.float32, seed=4)
    whole = run_kernel(case, 0.3)
    check_against_oracles(case, whole, 0.3)
    for num_splits in (3, MAX_SPLITS):
        torch.testing.assert_close(run_kernel(case, 0.3, num_splits=num_splits), whole,
                                   atol=2e-6, rtol=2e-6)


def test_decode_splits_depend_on_the_batch_alone():
    # An H100 has 132 SMs: one sequence of 4 KV heads gets 32 ranges, a batch that fills half
    # the SMs or more gets none; never more than MAX_SPLITS, nor more programs than ~an SM each.
    assert decode_splits(1, 4, 132) == 32
    assert decode_splits(8, 4, 132) == 4
    assert decode_splits(17, 4, 132) == 1
    assert decode_splits(256, 4, 132) == 1
    for num_seqs in range(1, 80):
        for num_kv_heads in (1, 2, 8):
            splits = decode_splits(num_seqs, num_kv_heads, 132)
            assert 1 <= splits <= MAX_SPLITS and splits & (splits - 1) == 0
            assert splits == 1 or num_seqs * num_kv_heads * splits <= 132


def test_contiguous_q_and_prefill_config_for_a_decode_batch():
    # max_query_len is an upper bound: a decode batch launched with the prefill tile (programs
    # past each sequence's one token return at once) gives the same rows.
    case = make_case(DECODE_STEPS, 8, 2, 16, 16, torch.float32, seed=3, fused_q=False)
    assert case.q.is_contiguous()
    decode = run_kernel(case, 0.25)
    check_against_oracles(case, decode, 0.25)
    torch.testing.assert_close(run_kernel(case, 0.25, max_query_len=5), decode, atol=1e-6,
                               rtol=1e-6)


def test_attend_stores_then_attends_like_the_torch_backend():
    # Two steps through the AttentionBatch interface: a prefill and a chunked prefill, then
    # decodes; the Triton metadata writes the new K/V into the cache itself.
    num_heads, num_kv_heads, head_dim, block_size = 6, 2, 16, 4
    torch.manual_seed(1)
    shape = (16, block_size, num_kv_heads, head_dim)
    caches = {name: (torch.zeros(shape, device=DEVICE), torch.zeros(shape, device=DEVICE))
              for name in ("triton", "torch")}
    tables = [[3, 7, 1], [5, 2, 9, 11]]
    scale = head_dim**-0.5
    for query_lens, computed in (([5, 9], [0, 0]), ([1, 1], [5, 9])):
        num_tokens = sum(query_lens)
        q = torch.randn(num_tokens, num_heads, head_dim, device=DEVICE)
        k = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE)
        v = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE)
        got = TritonAttentionMetadata.build(query_lens, computed, tables, block_size,
                                            DEVICE).attend(q, k, v, *caches["triton"], scale)
        want = AttentionMetadata.build(query_lens, computed, tables, block_size,
                                       DEVICE).attend(q, k, v, *caches["torch"], scale)
        assert got.shape == (num_tokens, num_heads * head_dim)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(caches["triton"][0], caches["torch"][0], atol=0, rtol=0)


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim", "block_size"),
                         [(32, 4, 64, 16), (14, 2, 64, 1), (28, 4, 128, 32), (32, 32, 80, 16),
                          (16, 2, 256, 16), (4, 4, 8, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_configs_fit_their_shape(num_heads, num_kv_heads, head_dim, block_size, dtype):
    configs = kernel_configs(num_heads, num_kv_heads, head_dim, block_size, dtype)
    assert [c.kind for c in configs] == ["decode", "decode_split", "combine", "prefill"]
    group = num_heads // num_kv_heads
    attention = [c for c in configs if isinstance(c, KernelConfig)]
    assert len(attention) == 3
    for c in attention:
        assert c.group == group and c.block_size == block_size and c.head_dim == head_dim
        # tl.dot needs every dimension a power of two and >= 16 (K, the reduced one, strictly)
        for size in (c.block_m, c.block_n, c.block_d):
            assert size >= 16 and size & (size - 1) == 0
        assert c.block_d >= head_dim and c.block_m >= c.block_q * group
        assert c.dot_precision == ("ieee" if dtype == torch.float32 else "tf32")
        assert c.split_kv == (c.kind == "decode_split")
    decode, split, combine, prefill = configs
    assert decode.block_q == 1 and split.block_q == 1 and prefill.block_q >= 1
    assert combine.block_d == decode.block_d and combine.block_s == MAX_SPLITS


def test_bad_arguments_are_rejected():
    case = make_case([(3, 2)], 4, 2, 16, 4, torch.float32)
    m = case.meta
    args = (case.k_cache, case.v_cache, m.block_tables, m.seq_lens, m.query_start_loc, 2, 0.25)
    with pytest.raises(ValueError, match="num_splits"):
        triton_paged_attention(case.q, case.k_cache, case.v_cache, m.block_tables, m.seq_lens,
                               m.query_start_loc, 1, 0.25, torch.empty_like(case.q),
                               num_splits=MAX_SPLITS + 1)
    with pytest.raises(ValueError, match="stride"):
        triton_paged_attention(case.q.transpose(1, 2), *args, torch.empty_like(case.q))
    with pytest.raises(ValueError, match="share a dtype"):
        triton_paged_attention(case.q, *args, torch.empty_like(case.q, dtype=torch.float16))
    with pytest.raises(ValueError, match="seq_lens must be int64"):
        triton_paged_attention(case.q, case.k_cache, case.v_cache, m.block_tables,
                               m.seq_lens.int(), m.query_start_loc, 2, 0.25,
                               torch.empty_like(case.q))
    with pytest.raises(ValueError, match="num_kv_heads"):
        kernel_configs(6, 4, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="block_size"):
        kernel_configs(4, 2, 16, 0, torch.float32)


@pytest.mark.skipif(ON_GPU, reason="checks the interpreter's harness")
def test_interpreter_harness_catches_out_of_range_reads_and_asserts():
    # The harness must be able to fail: a block id past the cache, and a sequence with more
    # new tokens than its context (the kernel's device_assert).
    case = make_case([(5, 1), (2, 1)], 4, 2, 16, 4, torch.float32)
    m = case.meta
    bad_tables = m.block_tables.clone()
    bad_tables[1, 0] = case.k_cache.shape[0] + 4
    out = torch.empty_like(case.q)
    with pytest.raises(Exception, match="outside every tensor argument"):
        triton_paged_attention(case.q, case.k_cache, case.v_cache, bad_tables, m.seq_lens,
                               m.query_start_loc, 1, 0.25, out)
    bad_lens = torch.tensor([6, 0])
    with pytest.raises(Exception, match="more new tokens than its seq_len"):
        triton_paged_attention(case.q, case.k_cache, case.v_cache, m.block_tables, bad_lens,
                               m.query_start_loc, 1, 0.25, out)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_sized_batch_on_cuda(dtype):
    # A 1.1B-Llama-shaped layer (32 heads, 4 KV heads, head_dim 64, blocks of 16): decodes over
    # long contexts and a mixed batch, compiled for the GPU at hand.
    decodes = [(c, 1) for c in (1, 100, 511, 1000, 2047, 300, 64, 17)]
    for steps, num_splits in ((decodes, 1), (decodes, None), (decodes, 16),
                              ([(0, 300), (200, 1), (700, 130), (0, 1), (1500, 64)], None)):
        case = make_case(steps, 32, 4, 64, 16, dtype, seed=7)
        check_against_oracles(case, run_kernel(case, 0.125, num_splits=num_splits), 0.125)
