"""Token sampling on the last pipeline stage: one token per row of logits, vLLM V1 semantics.

Order of operations for each row:
1. logprobs, if asked for, from the raw logits (float32 log_softmax before anything below);
2. min_tokens: the row's stop ids are masked until it has `min_tokens` outputs;
3. repetition, frequency and presence penalties;
4. greedy rows (temperature < 1e-5) take the argmax;
5. random rows: divide by temperature, min_p, then top_k and top_p, then draw by inverse CDF:
   one uniform per row, from the row's own seed (seeded rows) or from the sampler's generator
   (the rest), located in the row's cumulative probabilities (float64).

Invariants, whatever the logits and parameters (NaN, infinities, denormal or huge values):
- every returned id is in [0, vocab), or the row carries an `error` (id -1) and only its
  request fails: a row with no logit above -inf (NaN or -inf everywhere) has nothing to pick;
- a row whose distribution is not finite (float32 overflowed, e.g. repetition_penalty 1e-300
  turns the seen tokens' positive logits into +inf) takes its argmax over the penalised logits,
  NaN ignored (among several +inf, the lowest id): greedy instead of a crash;
- min_p, top_k and top_p always keep the most likely token (top_p = 1e-320 is top-1);
- parameter tensors are float32, so values past its range are taken at its limits
  (temperature 1e308 samples as 3.4e38; repetition_penalty within [2**-126, 3.4e38]);
- logprobs are finite: -inf and NaN become -9999.0, vLLM's floor (JSON has no infinities).

Each step is skipped when no row needs it and the work is vectorised over rows; the only
per-row Python is building small index lists and re-seeding the generator of seeded rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine_core.messages import SampledToken, TokenLogprobs
from engine_core.sampling_params import SamplingParams

__all__ = [
    "LOGPROB_FLOOR",
    "SampledToken",
    "Sampler",
    "SamplingRow",
    "TokenLogprobs",
    "apply_min_p",
    "apply_penalties",
    "apply_top_k_top_p",
]

_MASK_64 = (1 << 64) - 1
_FLOAT32 = torch.finfo(torch.float32)
LOGPROB_FLOOR = -9999.0  # what -inf and NaN logprobs become (vLLM's value; JSON has no -inf)
_NO_FINITE_LOGIT = "sampling failed: the model's logits for this row are NaN or -inf everywhere"


@dataclass(slots=True)
class SamplingRow:
    """What the sampler needs to know about the sequence behind one row of logits."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # tokens generated so far for this sequence
    # EOS ids + params.stop_token_ids: masked while len(output_token_ids) < params.min_tokens
    stop_ids: tuple[int, ...]

    @property
    def masks_stop_ids(self) -> bool:
        return bool(self.stop_ids) and len(self.output_token_ids) < self.params.min_tokens

    @property
    def has_penalties(self) -> bool:
        p = self.params
        return (
            p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
        )


class Sampler:
    """Picks one token per row of logits; see the module docstring for the semantics.

    Seeded rows (`params.seed` set) draw their noise from a generator seeded with
    (seed, number of tokens generated so far), so the k-th token of a seeded request is the same
    whatever else is in the batch and however often the request is preempted and recomputed.
    Unseeded rows share one generator per device, seeded from `seed`.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._row_generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
        """Sample one token for each row.

        logits: [num_rows, vocab], any float dtype and device; rows[i] describes row i. The caller's
        tensor is never modified. Returns one `SampledToken` per row, in row order, with
        `logprobs` set for the rows whose params ask for them.
        """
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [{len(rows)}, vocab], got {list(logits.shape)}")
        if not rows:
            return []
        masked = [i for i, row in enumerate(rows) if row.masks_stop_ids]
        penalised = any(row.has_penalties for row in rows)
        greedy = [row.params.greedy for row in rows]
        wants_logprobs = any(row.params.logprobs is not None for row in rows)

        if all(greedy) and not (masked or penalised or wants_logprobs):
            token_ids, ok = _argmax_finite(logits)
            return _sampled(token_ids, ok, [None] * len(rows))

        # Steps 2-3 edit in place, so they get their own copy of the logits.
        work = logits.to(torch.float32, copy=bool(masked) or penalised)  # [num_rows, vocab]
        if masked:
            _mask_stop_ids(work, rows, masked)
        if penalised:
            apply_penalties(work, rows)

        device = work.device
        if all(greedy):
            token_ids, ok = _argmax_finite(work)  # [num_rows] each
        elif not any(greedy):
            token_ids, ok = self._sample_random(work, rows)
        else:
            greedy_idx = [i for i, g in enumerate(greedy) if g]
            random_idx = [i for i, g in enumerate(greedy) if not g]
            greedy_t = torch.tensor(greedy_idx, device=device)
            random_t = torch.tensor(random_idx, device=device)
            token_ids = torch.empty(len(rows), dtype=torch.long, device=device)
            ok = torch.empty(len(rows), dtype=torch.bool, device=device)
            token_ids[greedy_t], ok[greedy_t] = _argmax_finite(work[greedy_t])
            token_ids[random_t], ok[random_t] = self._sample_random(
                work[random_t], [rows[i] for i in random_idx])

        logprobs = _logprobs(logits, token_ids, rows) if wants_logprobs else [None] * len(rows)
        return _sampled(token_ids, ok, logprobs)

    def _sample_random(self, logits: torch.Tensor,
                       rows: list[SamplingRow]) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one token per row from logits [num_rows, vocab] (float32, not modified).
        Returns (token ids [num_rows], ok [num_rows] bool); a row whose distribution is not
        finite takes its argmax instead, and is not ok only if it has no logit above -inf."""
        device, vocab = logits.device, logits.shape[1]
        params = [row.params for row in rows]
        temperature = torch.tensor([p.temperature for p in params], device=device)
        temperature.clamp_(max=_FLOAT32.max)  # 1e308 is inf in float32, and -inf / inf NaN
        penalised = logits
        logits = logits / temperature.unsqueeze(1)  # [num_rows, vocab], a fresh tensor

        if any(p.min_p > 0 for p in params):
            apply_min_p(logits, torch.tensor([p.min_p for p in params], device=device))
        use_top_k = any(0 < p.top_k < vocab for p in params)
        use_top_p = any(p.top_p < 1 for p in params)
        if use_top_k or use_top_p:
            top_k = top_p = None
            if use_top_k:
                k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
                top_k = torch.tensor(k, device=device)
            if use_top_p:
                top_p = torch.tensor([p.top_p for p in params], device=device)
            apply_top_k_top_p(logits, top_k, top_p)

        # Inverse CDF: one uniform per row instead of a noise value per vocabulary entry (the
        # exponential race costs 15x more here: [64, 32000] noise vs 64 numbers).
        cdf = logits.softmax(dim=-1).to(torch.float64).cumsum_(dim=-1)  # [num_rows, vocab]
        total = cdf[:, -1:]  # [num_rows, 1], 1 up to rounding
        u = self._uniforms(rows, device).unsqueeze(1) * total  # [num_rows, 1] in [0, total)
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
        # right=True: the first token whose cumulative probability exceeds u, so a token of
        # probability 0 (an empty interval) is never drawn
        token_ids = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=vocab - 1)
        drawn = torch.isfinite(total).squeeze(1) & (total.squeeze(1) > 0)  # [num_rows]
        ok = torch.ones_like(drawn)
        if not bool(drawn.all()):  # NaN or overflow somewhere in the row: take its argmax
            failed = (~drawn).nonzero().squeeze(1)
            token_ids[failed], ok[failed] = _argmax_finite(penalised[failed])
        return token_ids, ok  # [num_rows] each

    def _uniforms(self, rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
        """Uniform [0, 1) float64, one per row: a seeded row's from its own seed and output
        position, the others from the sampler's generator. Returns [num_rows]."""
        seeds = [row.params.seed for row in rows]
        unseeded = [i for i, seed in enumerate(seeds) if seed is None]
        uniforms = torch.empty(len(rows), dtype=torch.float64, device=device)
        if len(unseeded) == len(rows):
            return uniforms.uniform_(generator=self._generator(device))
        if unseeded:
            drawn = torch.empty(len(unseeded), dtype=torch.float64, device=device)
            drawn.uniform_(generator=self._generator(device))
            uniforms[torch.tensor(unseeded, device=device)] = drawn
        row_generator = self._row_generator(device)
        for i, (seed, row) in enumerate(zip(seeds, rows)):
            if seed is not None:
                row_generator.manual_seed(_mix_seed(seed, len(row.output_token_ids)))
                uniforms[i : i + 1].uniform_(generator=row_generator)
        return uniforms

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(self.seed)
            self._generators[device] = generator
        return generator

    def _row_generator(self, device: torch.device) -> torch.Generator:
        """A scratch generator, re-seeded for every seeded row."""
        generator = self._row_generators.get(device)
        if generator is None:
            generator = self._row_generators[device] = torch.Generator(device=device)
        return generator


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Apply each row's repetition, frequency and presence penalties to `logits` in place.

    logits: [num_rows, vocab] float32, row i belonging to rows[i]; rows without penalties are left
    alone. As in vLLM and HF, the repetition penalty divides positive (multiplies negative) logits
    of every token seen in the prompt or the output; then `frequency_penalty * count` and
    `presence_penalty * (count > 0)` are subtracted, counting output tokens only. Returns `logits`.
    """
    idx = [i for i, row in enumerate(rows) if row.has_penalties]
    if not idx:
        return logits
    device, vocab = logits.device, logits.shape[1]
    penalised = [rows[i] for i in idx]
    idx_t = torch.tensor(idx, device=device)
    sub = logits[idx_t]  # [num_penalised, vocab]

    output_counts = _token_counts([row.output_token_ids for row in penalised], vocab, device)
    output_seen = output_counts > 0  # [num_penalised, vocab]

    repetition = [row.params.repetition_penalty for row in penalised]
    if any(r != 1.0 for r in repetition):
        # Prompt tokens matter to the repetition penalty only.
        prompts = [row.prompt_token_ids if r != 1 else () for row, r in zip(penalised, repetition)]
        seen = output_seen | (_token_counts(prompts, vocab, device) > 0)
        penalty = torch.tensor(repetition, device=device).unsqueeze(1)  # [num_penalised, 1]
        penalty.clamp_(_FLOAT32.tiny, _FLOAT32.max)  # float32 0 would divide, inf * 0 be NaN
        penalty = torch.where(seen, penalty, 1.0)  # [num_penalised, vocab]
        sub = torch.where(sub > 0, sub / penalty, sub * penalty)

    frequency = torch.tensor([row.params.frequency_penalty for row in penalised], device=device)
    presence = torch.tensor([row.params.presence_penalty for row in penalised], device=device)
    sub -= frequency.unsqueeze(1) * output_counts
    sub -= presence.unsqueeze(1) * output_seen
    logits[idx_t] = sub
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask, in place, tokens whose probability is below `min_p` times the row's top probability.

    logits: [num_rows, vocab] float32; min_p: [num_rows] (0 keeps everything). Returns `logits`.
    """
    probs = logits.softmax(dim=-1)  # [num_rows, vocab]
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [num_rows, 1]
    return logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask, in place, tokens outside each row's top-k, then outside its top-p nucleus.

    logits: [num_rows, vocab] float32. top_k: [num_rows] ints in [1, vocab] (vocab: off); tokens
    tied with the k-th logit are kept. top_p: [num_rows] floats in (0, 1] (1: off); keeps the
    smallest set of most likely tokens whose probability, renormalised after top-k, sums to at
    least top_p, and always the top token. Either may be None (off for every row).
    """
    neg_inf = float("-inf")
    if top_p is None:
        if top_k is None:
            return logits
        # Top-k alone needs only the k-th largest logit of each row, not a full sort.
        top_values = logits.topk(int(top_k.max()), dim=-1).values  # [num_rows, max_k]
        kth = top_values.gather(1, (top_k - 1).unsqueeze(1))  # [num_rows, 1]
        return logits.masked_fill_(logits < kth, neg_inf)

    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # [num_rows, vocab]
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))  # [num_rows, 1]
        sorted_logits.masked_fill_(sorted_logits < kth, neg_inf)
    probs = sorted_logits.softmax(dim=-1)  # [num_rows, vocab]
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
    # Rows with top_p = 1 keep everything, whatever rounding does to the cumulative sum.
    top_p = torch.where(top_p >= 1, float("inf"), top_p).unsqueeze(1)  # [num_rows, 1]
    outside = mass_before >= top_p  # [num_rows, vocab]
    outside[:, 0] = False  # the top token, even if top_p is 0 in float32 (a denormal)
    sorted_logits.masked_fill_(outside, neg_inf)
    return logits.scatter_(1, sorted_idx, sorted_logits)


def _mask_stop_ids(logits: torch.Tensor, rows: Sequence[SamplingRow], masked: list[int]) -> None:
    """Set logits[i, stop_ids of row i] to -inf for each row index i in `masked`, in place."""
    device = logits.device
    row_idx = torch.tensor([i for i in masked for _ in rows[i].stop_ids], device=device)
    token_idx = torch.tensor([t for i in masked for t in rows[i].stop_ids], device=device)
    logits[row_idx, token_idx] = float("-inf")


def _token_counts(
    sequences: Sequence[Sequence[int]], vocab: int, device: torch.device
) -> torch.Tensor:
    """How often each token id occurs in each sequence: [num_sequences, vocab] float32.

    The sequences are flattened into one tensor of `row * (vocab + 1) + token` keys and counted
    with one scatter_add: no padding, one host-to-device copy, no device sync. Ids >= vocab (no
    logit to penalise) land in a spare column that is dropped.
    """
    num_seqs, lengths = len(sequences), [len(s) for s in sequences]
    tokens = torch.tensor(
        list(itertools.chain.from_iterable(sequences)), dtype=torch.long, device=device
    )  # [total_tokens]
    rows = torch.repeat_interleave(
        torch.arange(num_seqs, device=device),
        torch.tensor(lengths, device=device),
        output_size=sum(lengths),
    )  # [total_tokens]
    keys = rows * (vocab + 1) + tokens.clamp_(max=vocab)  # [total_tokens]
    counts = torch.zeros(num_seqs * (vocab + 1), device=device)
    counts.scatter_add_(0, keys, torch.ones_like(keys, dtype=counts.dtype))
    return counts.view(num_seqs, vocab + 1)[:, :vocab]


def _logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow]
) -> list[TokenLogprobs | None]:
    """Logprobs of the sampled tokens and of each row's top-k, from the raw logits.

    logits: [num_rows, vocab], unmodified; token_ids: [num_rows], the sampled tokens. A row gets
    None unless params.logprobs is set; k = params.logprobs.
    """
    idx = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    idx_t = torch.tensor(idx, device=logits.device)
    logprobs = logits[idx_t].float().log_softmax(dim=-1)  # [num_logprob_rows, vocab]
    sampled = token_ids[idx_t].unsqueeze(1)  # [num_logprob_rows, 1]
    sampled_logprob = logprobs.gather(1, sampled)  # [num_logprob_rows, 1]
    sampled_rank = (logprobs > sampled_logprob).sum(dim=-1) + 1  # [num_logprob_rows]

    # A model with fewer tokens than asked for returns them all.
    max_k = min(max(rows[i].params.logprobs or 0 for i in idx), logprobs.shape[1])
    top_logprobs, top_ids = logprobs.topk(max_k, dim=-1)  # [num_logprob_rows, max_k]

    # Finite values only: a -inf logit (or a NaN row) would be -inf (NaN) here.
    for values in (sampled_logprob, top_logprobs):
        values.nan_to_num_(nan=LOGPROB_FLOOR, posinf=0.0, neginf=LOGPROB_FLOOR)
        values.clamp_(min=LOGPROB_FLOOR)
    # One device-to-host transfer per tensor, then plain lists.
    out: list[TokenLogprobs | None] = [None] * len(rows)
    columns = zip(
        idx,
        sampled.squeeze(1).tolist(),
        sampled_logprob.squeeze(1).tolist(),
        sampled_rank.tolist(),
        top_ids.tolist(),
        top_logprobs.tolist(),
    )
    for i, token_id, logprob, rank, ids, values in columns:
        k = min(rows[i].params.logprobs or 0, max_k)
        out[i] = TokenLogprobs(
            token_ids=[token_id, *ids[:k]],
            logprobs=[logprob, *values[:k]],
            ranks=[rank, *range(1, k + 1)],
        )
    return out


def _argmax_finite(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's argmax with NaN ignored (+inf wins). logits: [num_rows, vocab].

    Returns (token ids [num_rows], ok [num_rows] bool); ok is False for a row with no logit
    above -inf, whose id is then 0 (in range, but nothing to pick: the caller fails it)."""
    values, token_ids = logits.max(dim=-1)  # a NaN anywhere in a row makes its max NaN
    ok = values > float("-inf")  # False for NaN and for a row of -inf
    if not bool(ok.all()):
        bad = (~ok).nonzero().squeeze(1)
        bad_rows = logits[bad]  # [num_bad, vocab], a copy
        bad_values, bad_ids = bad_rows.masked_fill_(bad_rows.isnan(), float("-inf")).max(dim=-1)
        token_ids[bad] = torch.where(bad_values > float("-inf"), bad_ids, 0)
        ok[bad] = bad_values > float("-inf")
    return token_ids, ok


def _sampled(token_ids: torch.Tensor, ok: torch.Tensor,
             logprobs: Sequence[TokenLogprobs | None]) -> list[SampledToken]:
    """One SampledToken per row; a row that is not ok carries an error, for its request alone."""
    return [SampledToken(t, lp) if good else SampledToken(-1, error=_NO_FINITE_LOGIT)
            for t, good, lp in zip(token_ids.tolist(), ok.tolist(), logprobs)]


def _mix_seed(seed: int, step: int) -> int:
    """A 64-bit generator seed from a request seed and a token position (splitmix64)."""
    x = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK_64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return x ^ (x >> 31)
