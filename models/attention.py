"""Paged attention in plain torch: K/V live in fixed-size blocks addressed by block tables.

A step's batch is laid out as the concatenation of each sequence's new tokens. The
sequences with one new token (decodes) are attended together in one batched call; the
others (prefills, chunked prefills, prefix-cache hits) one by one. Every index tensor that
this needs is built once per step by `AttentionMetadata.build` and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F


class ContextIndex:
    """Where a context's K/V live: the cache slot of each position, and (derived once per
    step, by the first layer that asks) the matching rows of the cache viewed as
    `[num_slots * num_kv_heads, head_dim]`, so one `index_select` gathers `[..., Hkv, L, D]`."""

    def __init__(self, slots: torch.Tensor) -> None:
        self.slots = slots  # [..., context_len] int64
        self._rows: dict[int, torch.Tensor] = {}

    def rows(self, num_kv_heads: int) -> torch.Tensor:
        """Flattened `[..., num_kv_heads, context_len]` row indices."""
        rows = self._rows.get(num_kv_heads)
        if rows is None:
            heads = torch.arange(num_kv_heads, device=self.slots.device)
            rows = (self.slots.unsqueeze(-2) * num_kv_heads + heads.unsqueeze(-1)).flatten()
            self._rows[num_kv_heads] = rows
        return rows

    def gather(self, cache: torch.Tensor, batch_shape: tuple[int, ...]) -> torch.Tensor:
        """cache: [num_blocks, block_size, Hkv, D] -> [*batch_shape, Hkv, context_len, D]."""
        num_kv_heads, head_dim = cache.shape[2], cache.shape[3]
        rows = cache.view(-1, head_dim).index_select(0, self.rows(num_kv_heads))
        return rows.view(*batch_shape, num_kv_heads, self.slots.shape[-1], head_dim)


@dataclass
class DecodeBatch:
    """The sequences of a step that have exactly one new token, attended in one call."""

    token_index: slice | torch.Tensor  # which of the step's tokens are theirs: [B]
    context: ContextIndex  # slots [B, max_len], padded past each sequence's length
    mask: torch.Tensor | None  # [B, 1, 1, max_len] bool, True = attend; None if no padding


@dataclass
class PrefillSeq:
    """One sequence of a step with several new tokens: the step's tokens [start, end)."""

    start: int
    end: int
    # None when nothing is cached before the new tokens (plain causal attention over them);
    # otherwise the slots of the whole context [context_len] and the causal mask
    # [num_new_tokens, context_len] offset by the cached prefix.
    context: ContextIndex | None
    mask: torch.Tensor | None


@dataclass
class AttentionMetadata:
    """Per-step batch layout, shared by all layers of a stage. Tokens of one sequence are
    contiguous. Build it with `AttentionMetadata.build`."""

    slot_mapping: torch.Tensor  # [num_tokens] int64 cache slot of each new token
    query_start_loc: list[int]  # [num_seqs + 1] token offset of each sequence
    query_lens: list[int]  # [num_seqs] new tokens per sequence
    seq_lens: list[int]  # [num_seqs] context length after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int64, padded with 0
    block_size: int
    positions: torch.Tensor  # [num_tokens] int64 absolute position of each new token
    max_seq_len: int  # max(seq_lens): positions are below it
    decode: DecodeBatch | None  # the one-new-token sequences, or None if there are none
    prefills: list[PrefillSeq]  # the others, in batch order

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """`paged_attention` over this step (the `AttentionBatch` interface)."""
        return paged_attention(q, k, v, k_cache, v_cache, self, scale)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        num_computed_tokens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
    ) -> AttentionMetadata:
        """Lay out one step: sequence i contributes `query_lens[i]` new tokens at positions
        `num_computed_tokens[i]...`, whose K/V go to the blocks `block_tables[i]` (which must
        cover the whole context)."""
        arrays = step_layout(query_lens, num_computed_tokens, block_tables, block_size)
        table, positions = arrays["block_tables"], arrays["positions"]
        slot_mapping = arrays["slot_mapping"]
        seq_lens = [c + q for c, q in zip(num_computed_tokens, query_lens)]
        query_start_loc = [0, *accumulate(query_lens)]

        decode_ids = [i for i, q in enumerate(query_lens) if q == 1]
        decode = (
            _build_decode(decode_ids, query_start_loc, seq_lens, table, block_size, device)
            if decode_ids
            else None
        )
        prefills = [
            _build_prefill(
                query_start_loc[i],
                query_lens[i],
                num_computed_tokens[i],
                table[i],
                block_size,
                device,
            )
            for i, q in enumerate(query_lens)
            if q > 1
        ]
        return cls(
            slot_mapping=slot_mapping.to(device),
            query_start_loc=query_start_loc,
            query_lens=list(query_lens),
            seq_lens=seq_lens,
            block_tables=table.to(device),
            block_size=block_size,
            positions=positions.to(device),
            max_seq_len=max(seq_lens),
            decode=decode,
            prefills=prefills,
        )


def step_layout(query_lens: list[int], num_computed_tokens: list[int],
                block_tables: list[list[int]], block_size: int,
                max_blocks: int | None = None) -> dict[str, torch.Tensor]:
    """One step's layout as CPU int64 tensors, shared by both backends: "positions" and
    "slot_mapping" [num_tokens], "seq_lens" [num_seqs], "query_start_loc" [num_seqs + 1] and
    "block_tables" [num_seqs, width] padded with the null block 0 (width: the longest table, or
    `max_blocks`). Sequence i contributes `query_lens[i]` new tokens at positions
    `num_computed_tokens[i]...` in the blocks `block_tables[i]`, which must cover its context;
    ValueError otherwise."""
    num_seqs = len(query_lens)
    if not (len(num_computed_tokens) == len(block_tables) == num_seqs):
        raise ValueError(
            "query_lens, num_computed_tokens and block_tables must have one entry per "
            f"sequence, got {num_seqs}, {len(num_computed_tokens)}, {len(block_tables)}")
    if num_seqs == 0 or min(query_lens) < 1:
        raise ValueError(f"every sequence needs at least one new token, got {query_lens}")
    seq_lens = [c + q for c, q in zip(num_computed_tokens, query_lens)]
    for i, (seq_len, seq_blocks) in enumerate(zip(seq_lens, block_tables)):
        if len(seq_blocks) * block_size < seq_len:
            raise ValueError(f"sequence {i} has {seq_len} tokens but its block table holds only "
                             f"{len(seq_blocks)} blocks of {block_size}")
    width = max(len(t) for t in block_tables) if max_blocks is None else max_blocks
    table = torch.tensor([t + [0] * (width - len(t)) for t in block_tables],
                         dtype=torch.int64)  # [num_seqs, width]
    query_start_loc = [0, *accumulate(query_lens)]
    q_lens = torch.tensor(query_lens)
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), q_lens)  # [num_tokens]
    first_position = torch.tensor(num_computed_tokens) - torch.tensor(query_start_loc[:-1])
    positions = torch.arange(query_start_loc[-1]) + first_position.repeat_interleave(q_lens)
    blocks = table[seq_of_token, positions // block_size]  # [num_tokens]
    return {
        "positions": positions,
        "slot_mapping": blocks * block_size + positions % block_size,
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int64),
        "query_start_loc": torch.tensor(query_start_loc, dtype=torch.int64),
        "block_tables": table,
    }


def _build_decode(
    seq_ids: list[int],
    query_start_loc: list[int],
    seq_lens: list[int],
    table: torch.Tensor,
    block_size: int,
    device: torch.device | str,
) -> DecodeBatch:
    tokens = [query_start_loc[i] for i in seq_ids]
    contiguous = tokens == list(range(tokens[0], tokens[0] + len(tokens)))
    token_index: slice | torch.Tensor = (
        slice(tokens[0], tokens[0] + len(tokens))
        if contiguous
        else torch.tensor(tokens, device=device)
    )
    lens = [seq_lens[i] for i in seq_ids]
    max_len = max(lens)
    context = torch.arange(max_len)  # [max_len]
    blocks = table[seq_ids][:, context // block_size]  # [B, max_len]
    slots = blocks * block_size + context % block_size
    mask = None
    if min(lens) != max_len:
        mask = (context < torch.tensor(lens).unsqueeze(1)).view(len(seq_ids), 1, 1, max_len)
        mask = mask.to(device)
    return DecodeBatch(token_index=token_index, context=ContextIndex(slots.to(device)), mask=mask)


def _build_prefill(
    start: int,
    num_new: int,
    num_computed: int,
    table_row: torch.Tensor,
    block_size: int,
    device: torch.device | str,
) -> PrefillSeq:
    end = start + num_new
    if num_computed == 0:
        return PrefillSeq(start=start, end=end, context=None, mask=None)
    context = torch.arange(num_computed + num_new)  # [context_len]
    slots = table_row[context // block_size] * block_size + context % block_size
    query_positions = torch.arange(num_computed, num_computed + num_new)  # [num_new]
    mask = context.unsqueeze(0) <= query_positions.unsqueeze(1)  # [num_new, context_len]
    return PrefillSeq(
        start=start, end=end, context=ContextIndex(slots.to(device)), mask=mask.to(device)
    )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Store the step's new K/V in the cache, then attend causally over each sequence's
    whole context (its cached prefix and its new tokens).

    q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous and
    zero-initialised (padding slots are read, then masked).
    Returns [num_tokens, num_heads * head_dim].
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)

    decode = meta.decode
    if decode is not None and not meta.prefills:  # the steady state: decodes only
        return _decode_attention(q, k_cache, v_cache, decode, scale).reshape(num_tokens, -1)

    out = q.new_empty(num_tokens, num_heads, head_dim)
    if decode is not None:
        out[decode.token_index] = _decode_attention(
            q[decode.token_index], k_cache, v_cache, decode, scale
        )
    for seq in meta.prefills:
        rows = slice(seq.start, seq.end)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], k_cache, v_cache, seq, scale)
    return out.view(num_tokens, num_heads * head_dim)


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: DecodeBatch,
    scale: float,
) -> torch.Tensor:
    """q: [B, num_heads, head_dim] -> [B, num_heads, head_dim]."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    k = batch.context.gather(k_cache, (num_seqs,))  # [B, Hkv, L, D]
    v = batch.context.gather(v_cache, (num_seqs,))
    # GQA without repeating K/V: the query heads sharing a KV head become its query rows
    # (a decode token attends its whole context, so the rows need no causal mask).
    q = q.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, Hkv, G, D]
    # SDPA in every dtype: with torch 2.13 its CPU kernel beats two bf16 batched matmuls at
    # every decode shape measured (bench/RESULTS.md, issue 21)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask, scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)


def _prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq: PrefillSeq,
    scale: float,
) -> torch.Tensor:
    """q: [n, H, D], k, v: [n, Hkv, D] -> [n, H, D]."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    q = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
    if seq.context is None:  # no cached prefix: the new tokens are the whole context
        k = k.transpose(0, 1).unsqueeze(0)  # [1, Hkv, n, D]
        v = v.transpose(0, 1).unsqueeze(0)
        mask, causal = None, True
    else:
        k = seq.context.gather(k_cache, (1,))  # [1, Hkv, context_len, D]
        v = seq.context.gather(v_cache, (1,))
        mask, causal = seq.mask, False
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )  # [1, H, n, D]
    return out[0].transpose(0, 1)
