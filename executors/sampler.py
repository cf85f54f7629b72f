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
per-row Python is building the host arrays below and re-seeding the generator of seeded rows.

Host traffic, so that a step never waits on the device before its end: every per-row input
(parameters, row indices, stop ids, token-count keys) is built on the host as one int64 and
one float32 array and moved with one pinned, non-blocking copy each (`step_inputs.to_device`);
the result comes back in ONE device-to-host read: the sampled ids (-1 for a row that needs a
second look) and, when asked for, the logprobs, packed in one tensor. Only a row whose plain
argmax is not valid (a NaN in its logits, or no logit above -inf) costs more reads, after that
one: its NaN-ignoring argmax, and its logprobs again.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from engine_core.executors.step_inputs import to_device

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
_NEG_INF = float("-inf")


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


@dataclass
class _HostArrays:
    """A step's per-row sampling inputs, built on the host: moved to the device with one copy
    for the int64 arrays and one for the float32 ones (`step_inputs.to_device`)."""

    ints: dict[str, torch.Tensor] = field(default_factory=dict)
    floats: dict[str, torch.Tensor] = field(default_factory=dict)

    def add_ints(self, name: str, values: Sequence[int] | torch.Tensor) -> None:
        self.ints[name] = torch.as_tensor(values, dtype=torch.int64)

    def add_floats(self, name: str, values: Sequence[float]) -> None:
        # float32, as the parameters have always been: values past its range become its limits
        # (or inf, clamped where that matters)
        self.floats[name] = torch.tensor(values, dtype=torch.float32)

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {**to_device(self.ints, device), **to_device(self.floats, device)}


@dataclass(frozen=True)
class _RandomFilters:
    """What the host knows about the random rows' filters (so the device is never asked)."""

    min_p: bool
    top_k: bool
    top_p: bool
    max_top_k: int  # the largest k among the rows (vocab for rows without top-k)
    partly_seeded: bool  # some rows seeded, some not: "unseeded_rows" indexes the latter


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
        num_rows, vocab = logits.shape
        device = logits.device
        masked = [i for i, row in enumerate(rows) if row.masks_stop_ids]
        penalised = [i for i, row in enumerate(rows) if row.has_penalties]
        random_idx = [i for i, row in enumerate(rows) if not row.params.greedy]
        logprob_idx = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        max_k = min(max((rows[i].params.logprobs or 0 for i in logprob_idx), default=0), vocab)

        # Every per-row input, on the host, then on the device in (at most) two copies.
        host = _HostArrays()
        if masked:
            host.add_ints("stop_rows", [i for i in masked for _ in rows[i].stop_ids])
            host.add_ints("stop_tokens", [t for i in masked for t in rows[i].stop_ids])
        if penalised:
            _penalty_arrays(host, penalised, rows, vocab)
        random_rows = [rows[i] for i in random_idx]
        filters = _random_arrays(host, random_rows, vocab) if random_idx else None
        if random_idx and len(random_idx) < num_rows:
            host.add_ints("random_rows", random_idx)
        if logprob_idx:
            host.add_ints("logprob_rows", logprob_idx)
        t = host.to(device)

        if not (masked or penalised or random_idx):  # all greedy, nothing to edit: no copy
            work = logits
            token_ids, ok = _argmax(logits)  # [num_rows] each
        else:
            # Steps 2-3 edit in place, so they get their own copy of the logits.
            work = logits.to(torch.float32, copy=bool(masked or penalised))  # [num_rows, vocab]
            if masked:
                work.index_put_((t["stop_rows"], t["stop_tokens"]),
                                torch.full((), _NEG_INF, device=device))
            if penalised:
                _apply_penalties(work, t, any(rows[i].params.repetition_penalty != 1.0
                                              for i in penalised))
            if not random_idx:
                token_ids, ok = _argmax(work)
            elif len(random_idx) == num_rows:
                assert filters is not None
                token_ids, ok = self._sample_random(work, random_rows, t, filters)
            else:
                assert filters is not None
                token_ids, ok = _argmax(work)  # every row; the random ones are replaced
                random_t = t["random_rows"]
                drawn, drawn_ok = self._sample_random(work.index_select(0, random_t),
                                                      random_rows, t, filters)
                token_ids.index_copy_(0, random_t, drawn)
                ok.index_copy_(0, random_t, drawn_ok)

        # The one device-to-host read: ids (-1: look again) and the logprobs asked for.
        packed = torch.where(ok, token_ids, -1)  # [num_rows]
        if logprob_idx:
            index = t["logprob_rows"]
            logprob_tensors = _logprob_tensors(logits.index_select(0, index),
                                               token_ids.index_select(0, index), max_k)
            packed = torch.cat([packed.double(), *(x.reshape(-1).double()
                                                  for x in logprob_tensors)])
        values = _read(packed)
        ids = [int(x) for x in values[:num_rows]]
        logprobs: dict[int, TokenLogprobs] = {}
        if logprob_idx:
            logprobs = _unpack_logprobs(values[num_rows:], logprob_idx, ids, rows, max_k)

        bad = [i for i, token_id in enumerate(ids) if token_id < 0]
        if bad:  # rare: NaN in the row, or nothing above -inf
            self._repair(bad, ids, logprobs, logits, work, rows, max_k)
        return [SampledToken(token_id, logprobs.get(i)) if token_id >= 0
                else SampledToken(-1, error=_NO_FINITE_LOGIT)
                for i, token_id in enumerate(ids)]

    def _repair(self, bad: list[int], ids: list[int], logprobs: dict[int, TokenLogprobs],
                logits: torch.Tensor, work: torch.Tensor, rows: list[SamplingRow],
                max_k: int) -> None:
        """Rows `bad` had no valid plain argmax (over `work`, the logits after steps 2-3, or as
        the fallback of a draw that failed): give them their argmax with NaN ignored, in
        `ids` (still -1 if nothing is above -inf), and their logprobs again. Reads the device
        once or twice more."""
        device = logits.device
        bad_t = torch.tensor(bad, dtype=torch.int64).to(device)
        fixed = _read(_argmax_ignoring_nan(work.index_select(0, bad_t)))
        for i, token_id in zip(bad, fixed):
            ids[i] = int(token_id)
        again = [i for i in bad if ids[i] >= 0 and rows[i].params.logprobs is not None]
        if not again:
            return
        again_t = torch.tensor(again, dtype=torch.int64).to(device)
        again_ids = torch.tensor([ids[i] for i in again], dtype=torch.int64).to(device)
        tensors = _logprob_tensors(logits.index_select(0, again_t), again_ids, max_k)
        values = _read(torch.cat([x.reshape(-1).double() for x in tensors]))
        logprobs.update(_unpack_logprobs(values, again, ids, rows, max_k))

    def _sample_random(self, logits: torch.Tensor, rows: list[SamplingRow],
                       t: dict[str, torch.Tensor],
                       filters: _RandomFilters) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one token per row from logits [num_rows, vocab] (float32, not modified); `t`
        holds the rows' parameters on the device (see `_random_arrays`). Returns (token ids
        [num_rows], ok [num_rows] bool): a row whose distribution is not finite is not ok (the
        caller gives it its argmax over `logits`)."""
        vocab = logits.shape[1]
        temperature = t["temperature"].clamp(max=_FLOAT32.max)  # 1e308 is inf in float32
        logits = logits / temperature.unsqueeze(1)  # [num_rows, vocab], a fresh tensor

        if filters.min_p:
            apply_min_p(logits, t["min_p"])
        if filters.top_k or filters.top_p:
            apply_top_k_top_p(logits, t["top_k"] if filters.top_k else None,
                              t["top_p"] if filters.top_p else None, filters.max_top_k)

        # Inverse CDF: one uniform per row instead of a noise value per vocabulary entry (the
        # exponential race costs 15x more here: [64, 32000] noise vs 64 numbers).
        cdf = logits.softmax(dim=-1).to(torch.float64).cumsum_(dim=-1)  # [num_rows, vocab]
        total = cdf[:, -1:]  # [num_rows, 1], 1 up to rounding
        uniforms = self._uniforms(rows, logits.device,
                                  t["unseeded_rows"] if filters.partly_seeded else None)
        u = uniforms.unsqueeze(1) * total  # [num_rows, 1] in [0, total)
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
        # right=True: the first token whose cumulative probability exceeds u, so a token of
        # probability 0 (an empty interval) is never drawn
        drawn_ids = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=vocab - 1)
        drawn = torch.isfinite(total).squeeze(1) & (total.squeeze(1) > 0)  # [num_rows]
        # A row with NaN or overflow somewhere is not ok: after the step's one read, the caller
        # gives it its argmax over the penalised logits (`_repair`), so the common case pays
        # for no second pass over the vocabulary.
        return drawn_ids, drawn

    def _uniforms(self, rows: list[SamplingRow], device: torch.device,
                  unseeded_t: torch.Tensor | None) -> torch.Tensor:
        """Uniform [0, 1) float64, one per row: a seeded row's from its own seed and output
        position, the others from the sampler's generator. `unseeded_t`: the unseeded rows'
        indices on the device when some rows are seeded and some not. Returns [num_rows]."""
        seeds = [row.params.seed for row in rows]
        num_unseeded = sum(seed is None for seed in seeds)
        uniforms = torch.empty(len(rows), dtype=torch.float64, device=device)
        if num_unseeded == len(rows):
            return uniforms.uniform_(generator=self._generator(device))
        if num_unseeded:
            if unseeded_t is None:
                raise ValueError("the unseeded rows' indices are missing")
            drawn = torch.empty(num_unseeded, dtype=torch.float64, device=device)
            drawn.uniform_(generator=self._generator(device))
            uniforms.index_copy_(0, unseeded_t, drawn)
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


def _random_arrays(host: _HostArrays, rows: Sequence[SamplingRow], vocab: int) -> _RandomFilters:
    """Add the random rows' parameters to `host`: "temperature", and where a row uses them
    "min_p", "top_k", "top_p" and "unseeded_rows" (indices among these rows)."""
    params = [row.params for row in rows]
    host.add_floats("temperature", [p.temperature for p in params])
    use_min_p = any(p.min_p > 0 for p in params)
    if use_min_p:
        host.add_floats("min_p", [p.min_p for p in params])
    use_top_k = any(0 < p.top_k < vocab for p in params)
    k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if use_top_k:
        host.add_ints("top_k", k)
    use_top_p = any(p.top_p < 1 for p in params)
    if use_top_p:
        host.add_floats("top_p", [p.top_p for p in params])
    unseeded = [i for i, p in enumerate(params) if p.seed is None]
    partly_seeded = 0 < len(unseeded) < len(params)
    if partly_seeded:
        host.add_ints("unseeded_rows", unseeded)
    return _RandomFilters(min_p=use_min_p, top_k=use_top_k, top_p=use_top_p,
                          max_top_k=max(k), partly_seeded=partly_seeded)


def _penalty_arrays(host: _HostArrays, idx: list[int], rows: Sequence[SamplingRow],
                    vocab: int) -> None:
    """Add to `host` what `_apply_penalties` needs for rows `idx` (those with penalties):
    "penalty_rows", the three penalties, and the token-count keys of their outputs and (for
    the repetition penalty) prompts."""
    penalised = [rows[i] for i in idx]
    host.add_ints("penalty_rows", idx)
    repetition = [row.params.repetition_penalty for row in penalised]
    host.add_floats("repetition", repetition)
    host.add_floats("frequency", [row.params.frequency_penalty for row in penalised])
    host.add_floats("presence", [row.params.presence_penalty for row in penalised])
    host.add_ints("output_keys", _count_keys([row.output_token_ids for row in penalised], vocab))
    if any(r != 1.0 for r in repetition):
        # Prompt tokens matter to the repetition penalty only.
        prompts = [row.prompt_token_ids if r != 1 else () for row, r in zip(penalised, repetition)]
        host.add_ints("prompt_keys", _count_keys(prompts, vocab))


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
    host = _HostArrays()
    _penalty_arrays(host, idx, rows, logits.shape[1])
    repetition = any(rows[i].params.repetition_penalty != 1.0 for i in idx)
    return _apply_penalties(logits, host.to(logits.device), repetition)


def _apply_penalties(logits: torch.Tensor, t: dict[str, torch.Tensor],
                     repetition: bool) -> torch.Tensor:
    """`apply_penalties` with its inputs on the device (`_penalty_arrays`); `repetition`: some
    row has a repetition penalty. Returns `logits`, edited in place."""
    vocab = logits.shape[1]
    idx_t = t["penalty_rows"]
    num_penalised = idx_t.shape[0]
    sub = logits.index_select(0, idx_t)  # [num_penalised, vocab]

    output_counts = _token_counts(t["output_keys"], num_penalised, vocab)
    output_seen = output_counts > 0  # [num_penalised, vocab]
    if repetition:
        seen = output_seen | (_token_counts(t["prompt_keys"], num_penalised, vocab) > 0)
        # float32 0 would divide, inf * 0 be NaN
        penalty = t["repetition"].clamp(_FLOAT32.tiny, _FLOAT32.max).unsqueeze(1)  # [P, 1]
        penalty = torch.where(seen, penalty, 1.0)  # [num_penalised, vocab]
        sub = torch.where(sub > 0, sub / penalty, sub * penalty)

    sub -= t["frequency"].unsqueeze(1) * output_counts
    sub -= t["presence"].unsqueeze(1) * output_seen
    return logits.index_copy_(0, idx_t, sub)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask, in place, tokens whose probability is below `min_p` times the row's top probability.

    logits: [num_rows, vocab] float32; min_p: [num_rows] (0 keeps everything). Returns `logits`.
    """
    probs = logits.softmax(dim=-1)  # [num_rows, vocab]
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [num_rows, 1]
    return logits.masked_fill_(probs < threshold, _NEG_INF)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
    max_top_k: int | None = None,
) -> torch.Tensor:
    """Mask, in place, tokens outside each row's top-k, then outside its top-p nucleus.

    logits: [num_rows, vocab] float32. top_k: [num_rows] ints in [1, vocab] (vocab: off); tokens
    tied with the k-th logit are kept. top_p: [num_rows] floats in (0, 1] (1: off); keeps the
    smallest set of most likely tokens whose probability, renormalised after top-k, sums to at
    least top_p, and always the top token. Either may be None (off for every row).
    `max_top_k`: the largest of top_k if the caller knows it (else it is read from the device).
    """
    if top_p is None:
        if top_k is None:
            return logits
        # Top-k alone needs only the k-th largest logit of each row, not a full sort.
        largest_k = int(top_k.max()) if max_top_k is None else max_top_k
        top_values = logits.topk(largest_k, dim=-1).values  # [num_rows, max_k]
        kth = top_values.gather(1, (top_k - 1).unsqueeze(1))  # [num_rows, 1]
        return logits.masked_fill_(logits < kth, _NEG_INF)

    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # [num_rows, vocab]
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))  # [num_rows, 1]
        sorted_logits.masked_fill_(sorted_logits < kth, _NEG_INF)
    probs = sorted_logits.softmax(dim=-1)  # [num_rows, vocab]
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
    # Rows with top_p = 1 keep everything, whatever rounding does to the cumulative sum.
    top_p = torch.where(top_p >= 1, float("inf"), top_p).unsqueeze(1)  # [num_rows, 1]
    outside = mass_before >= top_p  # [num_rows, vocab]
    outside[:, 0] = False  # the top token, even if top_p is 0 in float32 (a denormal)
    sorted_logits.masked_fill_(outside, _NEG_INF)
    return logits.scatter_(1, sorted_idx, sorted_logits)


def _count_keys(sequences: Sequence[Sequence[int]], vocab: int) -> torch.Tensor:
    """The host side of `_token_counts`: one `row * (vocab + 1) + token` key per token of each
    sequence, [total_tokens] int64 on the CPU. Ids >= vocab (no logit to penalise) map to a
    spare column."""
    lengths = [len(s) for s in sequences]
    tokens = torch.tensor(list(itertools.chain.from_iterable(sequences)),
                          dtype=torch.int64)  # [total_tokens]
    rows = torch.repeat_interleave(torch.arange(len(sequences)), torch.tensor(lengths),
                                   output_size=sum(lengths))  # [total_tokens]
    return rows * (vocab + 1) + tokens.clamp_(max=vocab)


def _token_counts(keys: torch.Tensor, num_seqs: int, vocab: int) -> torch.Tensor:
    """How often each token id occurs in each sequence, from `_count_keys`' keys on the device:
    [num_seqs, vocab] float32, counted with one scatter_add (no padding, no device sync)."""
    counts = torch.zeros(num_seqs * (vocab + 1), device=keys.device)
    counts.scatter_add_(0, keys, torch.ones_like(keys, dtype=counts.dtype))
    return counts.view(num_seqs, vocab + 1)[:, :vocab]


def _logprob_tensors(logits: torch.Tensor, token_ids: torch.Tensor,
                     max_k: int) -> list[torch.Tensor]:
    """Logprobs of the sampled tokens and of each row's top `max_k`, from the raw logits
    [num_logprob_rows, vocab] (not modified) and the sampled ids [num_logprob_rows]. Returns
    on the device: sampled logprob [n], its rank [n], top ids [n, max_k], top logprobs
    [n, max_k]; every logprob finite (see `_unpack_logprobs` for the layout read back)."""
    logprobs = logits.float().log_softmax(dim=-1)  # [num_logprob_rows, vocab]
    sampled = token_ids.unsqueeze(1)  # [num_logprob_rows, 1]
    sampled_logprob = logprobs.gather(1, sampled)  # [num_logprob_rows, 1]
    sampled_rank = (logprobs > sampled_logprob).sum(dim=-1) + 1  # [num_logprob_rows]
    top_logprobs, top_ids = logprobs.topk(max_k, dim=-1)  # [num_logprob_rows, max_k]
    # Finite values only: a -inf logit (or a NaN row) would be -inf (NaN) here.
    for values in (sampled_logprob, top_logprobs):
        values.nan_to_num_(nan=LOGPROB_FLOOR, posinf=0.0, neginf=LOGPROB_FLOOR)
        values.clamp_(min=LOGPROB_FLOOR)
    return [sampled_logprob.squeeze(1), sampled_rank, top_ids, top_logprobs]


def _unpack_logprobs(values: list, idx: list[int], ids: list[int], rows: Sequence[SamplingRow],
                     max_k: int) -> dict[int, TokenLogprobs]:
    """`_logprob_tensors` of rows `idx`, read back flat (sampled logprobs, ranks, top ids, top
    logprobs), as row index -> TokenLogprobs; `ids[i]`: row i's sampled id. A model with fewer
    tokens than asked for returns them all; k = params.logprobs."""
    n = len(idx)
    sampled_logprob = values[:n]
    ranks = values[n:2 * n]
    top_ids = values[2 * n:2 * n + n * max_k]
    top_logprobs = values[2 * n + n * max_k:2 * n + 2 * n * max_k]
    out = {}
    for j, i in enumerate(idx):
        k = min(rows[i].params.logprobs or 0, max_k)
        top = top_ids[j * max_k:j * max_k + k]
        out[i] = TokenLogprobs(
            token_ids=[ids[i], *(int(x) for x in top)],
            logprobs=[float(sampled_logprob[j]), *(float(x) for x in
                                                   top_logprobs[j * max_k:j * max_k + k])],
            ranks=[int(ranks[j]), *range(1, k + 1)],
        )
    return out


def _argmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's argmax, on the device. logits: [num_rows, vocab]. Returns (token ids
    [num_rows], ok [num_rows] bool); ok is False for a row with a NaN (its max is NaN) or no
    logit above -inf, whose id the caller must not take (`_argmax_ignoring_nan`)."""
    values, token_ids = logits.max(dim=-1)  # a NaN anywhere in a row makes its max NaN
    return token_ids, values > _NEG_INF


def _argmax_ignoring_nan(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax with NaN ignored (+inf wins; among several, the lowest id), -1 for a
    row with no logit above -inf. logits: [num_rows, vocab] -> [num_rows] int64."""
    values, token_ids = logits.masked_fill(logits.isnan(), _NEG_INF).max(dim=-1)
    return torch.where(values > _NEG_INF, token_ids, -1)


def _read(t: torch.Tensor) -> list:
    """Copy `t` to the host as a list: the one point where a step waits for the device."""
    return t.tolist()


def _mix_seed(seed: int, step: int) -> int:
    """A 64-bit generator seed from a request seed and a token position (splitmix64)."""
    x = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK_64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return x ^ (x >> 31)
