"""A step's inputs on the stage's device, built on the host once per step.

With the Triton backend every integer input of a step (token ids, positions, cache slots,
context lengths, block tables, the rows to sample) is built as one int64 array on the host,
pinned, and moved with a single non-blocking copy; the device-side tensors are views of it. So
a step costs one host-to-device transfer and no synchronisation. The torch backend (the CPU path)
builds its `AttentionMetadata` as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from engine_core.models.attention import AttentionMetadata
from engine_core.models.attention_batch import AttentionBatch
from engine_core.models.triton_attention import TritonAttentionMetadata


@dataclass
class StepInputs:
    """What a stage's forward and its sampler take for one step."""

    input_ids: torch.Tensor | None  # [num_tokens] int64 on the first stage, else None
    attention: AttentionBatch
    logits_indices: torch.Tensor  # [num_sampled] int64: the token rows whose logits are sampled
    # For the CUDA graph runner: the device arrays the Triton metadata views (empty for torch).
    arrays: dict[str, torch.Tensor]
    num_seqs: int
    max_query_len: int


def build_step_inputs(backend: str, token_ids: list[int] | None, query_lens: list[int],
                      num_computed_tokens: list[int], block_tables: list[list[int]],
                      block_size: int, logits_indices: list[int],
                      device: torch.device) -> StepInputs:
    """Lay out one step of `len(query_lens)` sequences for `backend` ("torch" | "triton").
    `token_ids`: the step's new token ids in batch order (the first stage), else None."""
    max_query_len = max(query_lens)
    attention: AttentionBatch
    if backend == "torch":
        attention = AttentionMetadata.build(query_lens, num_computed_tokens, block_tables,
                                            block_size, device)
        input_ids = (None if token_ids is None
                     else torch.tensor(token_ids, dtype=torch.long, device=device))
        return StepInputs(input_ids, attention,
                          torch.tensor(logits_indices, dtype=torch.long, device=device), {},
                          len(query_lens), max_query_len)
    arrays = TritonAttentionMetadata.host_arrays(query_lens, num_computed_tokens, block_tables,
                                                 block_size)
    max_seq_len = max(c + q for c, q in zip(num_computed_tokens, query_lens))
    arrays["logits_indices"] = torch.tensor(logits_indices, dtype=torch.int64)
    if token_ids is not None:
        arrays["input_ids"] = torch.tensor(token_ids, dtype=torch.int64)
    on_device = to_device(arrays, device)
    attention = TritonAttentionMetadata.from_arrays(on_device, max_query_len, max_seq_len)
    return StepInputs(on_device.get("input_ids"), attention, on_device["logits_indices"],
                      on_device, len(query_lens), max_query_len)


def to_device(arrays: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move host `arrays`, all of one dtype (int64 inputs, float32 sampling parameters, ...), to
    `device` in one copy (pinned and non-blocking on CUDA): the result holds views of one device
    buffer, each of its array's shape. On the CPU the arrays themselves. ValueError if the
    dtypes differ."""
    if device.type == "cpu" or not arrays:
        return arrays
    dtypes = {a.dtype for a in arrays.values()}
    if len(dtypes) > 1:
        raise ValueError(f"to_device moves arrays of one dtype, got {sorted(map(str, dtypes))}")
    flat = torch.cat([a.reshape(-1) for a in arrays.values()])  # [total]
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    out, offset = {}, 0
    for name, array in arrays.items():
        out[name] = flat[offset:offset + array.numel()].view(array.shape)
        offset += array.numel()
    return out
