"""The draft-model proposer: a small model with the target's vocabulary proposes greedy drafts.

It runs in the engine core's process, on the target's device, dtype and attention backend, and
keeps its own KV cache: one (K, V) pair per draft layer, each `[num_blocks, block_size,
num_kv_heads, head_dim]` with as many blocks as the target's, indexed by the same block ids
(a request's block table from the one shared block manager). So the draft's KV of a request
lives in the blocks the scheduler gave that request, and is freed with them.

Per request it remembers the token ids whose draft KV it wrote (positions 0, 1, ...). At each
`propose` the request's tokens have grown by the accepted drafts and the target's token: the
draft KV is valid for the common prefix of what it wrote and the new tokens (rejected drafts
end it), and only the rest is computed. A request it does not know (new, or dropped at a
preemption) starts from position 0: a prefix-cache hit says nothing about the draft's KV.

One `propose` for a step's requests:
1. catch up: positions [valid, len(token_ids)) of every request in prefill-like forwards of at
   most `max_num_batched_tokens` tokens; the argmax after the last token is draft 1;
2. `max_drafts - 1` single-token forwards, each feeding the previous draft and taking the
   argmax (greedy: a point-mass proposal, which the target's verification accepts with the
   target's probability of it: exact for sampling too); a request leaves once it has its
   drafts.

Its writes stay inside the request's blocks: the scheduler allocated them for positions up to
`len(token_ids) - 1 + max_drafts`, and the draft writes up to `len(token_ids) + max_drafts - 2`
(the last draft is never fed back). Drafts are capped so that no position reaches the draft
model's `max_position_embeddings` (none at all once the tokens alone reach it).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass

import torch
from engine_core.executors.kv_memory import allocate_resident
from engine_core.executors.step_inputs import build_step_inputs
from engine_core.models import LlamaModel, load_model

from engine_core.config import EngineConfig, draft_model_config
from engine_core.proposer import DraftRequest, Proposer

__all__ = ["DraftModelProposer"]

logger = logging.getLogger(__name__)


@dataclass
class _Piece:
    """Tokens of one request to run through the draft model: `token_ids` at positions
    `start...`, their KV written into `block_ids`."""

    token_ids: list[int]
    start: int
    block_ids: list[int]


@dataclass
class _Written:
    """What the draft KV of one request holds: `token_ids` at positions 0.. (its tokens, then
    the drafts fed back), of which the first `num_known` were the request's own at the last
    `propose`."""

    token_ids: list[int]
    num_known: int


class DraftModelProposer(Proposer):
    """`Proposer` for `speculative_config.method == "draft_model"` (see the module docstring).
    `num_blocks`: the target's KV blocks (`Executor.num_kv_blocks`), the null block included.
    ValueError if the draft model cannot serve the target (missing, another vocabulary) or its
    KV cache does not fit."""

    needs_blocks = True

    def __init__(self, config: EngineConfig, num_blocks: int) -> None:
        spec = config.speculative
        if spec is None or spec.method != "draft_model" or spec.model is None:
            raise ValueError("DraftModelProposer needs speculative_config method 'draft_model' "
                             "with a model")
        draft = draft_model_config(spec, config.model)
        self.block_size = config.cache.block_size
        self.backend = config.execution.attention_backend
        self.max_tokens_per_forward = config.scheduler.max_num_batched_tokens
        self.max_position = draft.max_position_embeddings
        self.device = torch.device(config.device)
        dtype = getattr(torch, config.dtype)
        self.model: LlamaModel | None = load_model(spec.model, draft, (0, draft.num_layers),
                                                   dtype, self.device)
        shape = (num_blocks, self.block_size, draft.num_kv_heads, draft.head_dim)
        setting = (f"the draft model's KV cache ({num_blocks} blocks of {self.block_size} "
                   f"tokens, as many as the target's)")
        tensors = allocate_resident([shape] * (2 * draft.num_layers), dtype, self.device, setting)
        # per draft layer: (K, V), each [num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_caches = [(tensors[2 * i], tensors[2 * i + 1]) for i in range(draft.num_layers)]
        self.num_blocks = num_blocks
        self._written: dict[str, _Written] = {}  # request id -> what its draft KV holds
        logger.info("draft model %s: %d layers, KV cache of %d blocks", spec.model,
                    draft.num_layers, num_blocks)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[list[int]]:
        if self.model is None:
            raise RuntimeError("the draft model proposer is shut down")
        drafts: list[list[int]] = [[] for _ in requests]
        wanted: list[int] = []  # per request: drafts to propose (0: none)
        catch_up: list[tuple[int, _Piece]] = []  # (request index, its catch-up)
        for index, request in enumerate(requests):
            num_tokens = len(request.token_ids)
            capacity = len(request.block_ids) * self.block_size  # positions its blocks hold
            # the last draft's input sits at position num_tokens + n - 2
            limit = min(self.max_position, capacity) - num_tokens + 1
            wanted.append(max(0, min(request.max_drafts, limit)) if num_tokens else 0)
            if not wanted[-1]:
                continue
            # at least the last token is computed: its logits give draft 1
            valid = min(self._num_valid(request.request_id, request.token_ids), num_tokens - 1)
            written = self._written.setdefault(request.request_id, _Written([], 0))
            del written.token_ids[valid:]
            written.token_ids.extend(request.token_ids[valid:])
            written.num_known = num_tokens
            catch_up.append((index, _Piece(request.token_ids[valid:], valid,
                                           request.block_ids)))
        for (index, _), token_id in zip(catch_up, self._run([p for _, p in catch_up])):
            drafts[index].append(token_id)
        live = [index for index, _ in catch_up]
        while live := [i for i in live if len(drafts[i]) < wanted[i]]:
            pieces = []
            for index in live:
                request, fed = requests[index], drafts[index][-1]
                fed_into = self._written[request.request_id].token_ids
                pieces.append(_Piece([fed], len(fed_into), request.block_ids))
                fed_into.append(fed)
            for index, token_id in zip(live, self._run(pieces)):
                drafts[index].append(token_id)
        return drafts

    def _num_valid(self, request_id: str, token_ids: list[int]) -> int:
        """Leading positions of `token_ids` whose draft KV this proposer wrote for the request:
        the common prefix of what it wrote and `token_ids`. Only the tail after the request's
        tokens at the last call is compared (its drafts then): a request's tokens never change
        while it is known here."""
        written = self._written.get(request_id)
        if written is None:
            return 0
        end = min(len(written.token_ids), len(token_ids))
        for position in range(min(written.num_known, end), end):
            if written.token_ids[position] != token_ids[position]:
                return position
        return end

    def _run(self, pieces: list[_Piece]) -> list[int]:
        """Run every piece through the draft model, writing its KV, in forwards of at most
        `max_num_batched_tokens` tokens (a piece may span several); the greedy next token
        after each piece's last one."""
        assert self.model is not None
        next_ids = [-1] * len(pieces)
        done = [0] * len(pieces)  # tokens of each piece computed so far
        queue = deque(range(len(pieces)))
        while queue:
            rows: list[tuple[int, int, int]] = []  # (piece, begin, end) in this forward
            budget = self.max_tokens_per_forward
            while queue and budget > 0:
                index = queue[0]
                begin = done[index]
                end = min(len(pieces[index].token_ids), begin + budget)
                rows.append((index, begin, end))
                done[index], budget = end, budget - (end - begin)
                if end == len(pieces[index].token_ids):
                    queue.popleft()
            query_lens = [end - begin for _, begin, end in rows]
            ends = list(itertools.accumulate(query_lens))
            finishing = [k for k, (index, _, end) in enumerate(rows)
                         if end == len(pieces[index].token_ids)]
            inputs = build_step_inputs(
                self.backend,
                [t for index, begin, end in rows for t in pieces[index].token_ids[begin:end]],
                query_lens, [pieces[index].start + begin for index, begin, _ in rows],
                [pieces[index].block_ids for index, _, _ in rows], self.block_size,
                [ends[k] - 1 for k in finishing], self.device)
            hidden = self.model(inputs.input_ids, None, self.kv_caches,
                                inputs.attention)  # [num_tokens, hidden]
            if not finishing:
                continue
            logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [n, vocab]
            for k, token_id in zip(finishing, logits.argmax(dim=-1).tolist()):
                next_ids[rows[k][0]] = token_id
        return next_ids

    def drop(self, request_id: str) -> None:
        self._written.pop(request_id, None)

    def shutdown(self) -> None:
        self.model = None
        self.kv_caches = []
        self._written.clear()
