"""Front-end side of the engine: turns engine-core outputs (token ids) into `RequestOutput`s.

It detokenizes incrementally, applies stop strings (the engine core never sees text: a stop string
match makes the front-end abort the request in the core), builds logprob dicts and joins the n
sequences of a request. An output of several tokens (speculative decoding's accepted drafts) is
taken token by token when stop strings are set, so a sequence ends exactly where it would have
without speculation. The engine core knows each sequence as its own request, with id
`"{index}_{request_id}"` when n > 1. A sequence whose processing raises (a detokenizer or
stop-string failure) finishes alone with finish_reason "error"; the others are unaffected.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine_core.messages import EngineCoreOutput, EngineCoreRequest, TokenLogprobs
from engine_core.models import IncrementalDetokenizer, Tokenizer
from engine_core.outputs import CompletionOutput, Logprob, RequestOutput
from engine_core.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Sequence:
    """One of the n sequences of a request."""

    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    output: CompletionOutput
    stop_token_ids: frozenset[int] = frozenset()  # EOS and stop_token_ids: not in the text
    stop_scan_from: int = 0  # text before this offset holds no stop string


@dataclass
class _RequestState:
    output: RequestOutput
    sequences: dict[str, _Sequence] = field(default_factory=dict)
    num_unfinished: int = 0


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _RequestState] = {}
        self._sequence_owner: dict[str, str] = {}  # core request id -> request id

    def add_request(self, request_id: str, prompt: str | None,
                    core_requests: Sequence[EngineCoreRequest]) -> None:
        """Track a user request whose sequences are `core_requests` (as `InputProcessor.
        make_requests` built them: sequence i is `core_requests[i]`), before they are sent to
        the engine core. ValueError if `request_id` is in use."""
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt_token_ids = list(core_requests[0].prompt_token_ids)
        state = _RequestState(RequestOutput(request_id, prompt, prompt_token_ids))
        for index, core_request in enumerate(core_requests):
            params = core_request.sampling_params
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                               skip_special_tokens=params.skip_special_tokens)
            completion = CompletionOutput(
                index=index, text="", token_ids=[],
                cumulative_logprob=0.0 if params.logprobs is not None else None,
                logprobs=[] if params.logprobs is not None else None)
            core_id = core_request.request_id
            stop_ids = frozenset(core_request.eos_token_ids) | frozenset(
                params.stop_token_ids or ())
            state.sequences[core_id] = _Sequence(index, params, detok, completion, stop_ids)
            state.output.outputs.append(completion)
            self._sequence_owner[core_id] = request_id
        state.num_unfinished = len(core_requests)
        self._requests[request_id] = state

    def core_request_ids(self, request_id: str) -> list[str]:
        state = self._requests.get(request_id)
        return list(state.sequences) if state else []

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Forget a request (after aborting it in the core); returns its final output."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        for core_id, seq in state.sequences.items():
            self._sequence_owner.pop(core_id, None)
            if seq.output.finish_reason is None:
                seq.output.finish_reason = "abort"
        state.output.finished = True
        return state.output

    def process(self, core_outputs: list[EngineCoreOutput]
                ) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's outputs. Returns (the requests that changed, in order of first
        change; finished ones are forgotten after this call) and the core request ids to abort
        because a stop string ended them."""
        changed: dict[str, RequestOutput] = {}
        to_abort: list[str] = []
        for out in core_outputs:
            request_id = self._sequence_owner.get(out.request_id)
            if request_id is None:
                continue  # aborted meanwhile
            state = self._requests[request_id]
            seq = state.sequences[out.request_id]
            if seq.output.finish_reason is not None:
                continue
            try:
                if self._apply(seq, out) and out.finish_reason is None:
                    to_abort.append(out.request_id)
            except Exception as exc:  # this sequence alone fails; the others go on
                logger.exception("processing the output of %s failed", out.request_id)
                seq.output.finish_reason = "error"
                seq.output.error = f"output processing failed: {type(exc).__name__}: {exc}"
                if out.finish_reason is None:
                    to_abort.append(out.request_id)  # still running in the core: stop it
            state.output.num_cached_tokens = max(state.output.num_cached_tokens,
                                                 out.num_cached_tokens)
            if out.kv_transfer_params is not None:
                state.output.kv_transfer_params = out.kv_transfer_params
            if seq.output.finish_reason is not None:
                state.num_unfinished -= 1
                self._sequence_owner.pop(out.request_id, None)
            changed[request_id] = state.output
        for request_id, output in changed.items():
            if self._requests[request_id].num_unfinished == 0:
                output.finished = True
                del self._requests[request_id]
        return list(changed.values()), to_abort

    def _apply(self, seq: _Sequence, out: EngineCoreOutput) -> bool:
        """Append one output of a sequence and apply its stop strings. True if a stop string
        ended it. An output of several tokens (accepted speculative drafts) is taken token by
        token when stop strings are set, as the tokens would have come without speculation: the
        sequence ends at the token that completed a stop string, the tokens (and logprobs)
        after it dropped, and the core's finish reason counts only if no stop string came
        first."""
        tokens = out.new_token_ids
        if len(tokens) <= 1 or not seq.params.stop:
            self._append(seq, out)
            return _stop_strings_apply(seq) and self._check_stop_strings(seq)
        logprobs = out.new_logprobs
        if logprobs is not None and len(logprobs) != len(tokens):
            raise ValueError(f"{len(logprobs)} logprobs for {len(tokens)} tokens")
        last = len(tokens) - 1
        for i, token in enumerate(tokens):
            one = EngineCoreOutput(out.request_id, [token],
                                   None if logprobs is None else logprobs[i:i + 1])
            if i == last:  # the core's verdict comes with its last token
                one.finish_reason, one.stop_reason, one.error = (out.finish_reason,
                                                                 out.stop_reason, out.error)
            self._append(seq, one)
            if _stop_strings_apply(seq) and self._check_stop_strings(seq):
                return True
        return False

    def _append(self, seq: _Sequence, out: EngineCoreOutput) -> None:
        completion = seq.output
        completion.token_ids.extend(out.new_token_ids)
        if seq.detokenizer is not None:
            text_ids = out.new_token_ids
            if (out.finish_reason == "stop" and text_ids and text_ids[-1] in seq.stop_token_ids
                    and not seq.params.include_stop_str_in_output):
                text_ids = text_ids[:-1]  # the stop token is not text (as in vLLM)
            seq.detokenizer.step(text_ids)
            completion.text = seq.detokenizer.text
        if out.new_logprobs is not None and completion.logprobs is not None:
            cumulative = completion.cumulative_logprob or 0.0  # 0.0 whenever logprobs are on
            for entry in out.new_logprobs:
                completion.logprobs.append(self._logprob_dict(entry))
                cumulative += entry.logprobs[0]
            completion.cumulative_logprob = cumulative
        if out.finish_reason is not None:
            completion.finish_reason = out.finish_reason
            completion.stop_reason = out.stop_reason
            completion.error = out.error

    def _check_stop_strings(self, seq: _Sequence) -> bool:
        """Truncate at the first stop string, if one has appeared. True if the sequence ended."""
        stops = seq.params.stop
        if not stops:
            return False
        text = seq.output.text
        longest = max(len(s) for s in stops)
        start = max(0, seq.stop_scan_from - longest + 1)
        hits = [(text.find(s, start), s) for s in stops]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        seq.stop_scan_from = len(text)
        if not hits:
            return False
        pos, stop = min(hits)
        end = pos + len(stop) if seq.params.include_stop_str_in_output else pos
        seq.output.text = text[:end]
        seq.output.finish_reason, seq.output.stop_reason = "stop", stop
        return True

    def _logprob_dict(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        result = {}
        for token_id, logprob, rank in zip(entry.token_ids, entry.logprobs, entry.ranks):
            if token_id not in result:
                decoded = self.tokenizer.decode([token_id], skip_special_tokens=False) \
                    if self.tokenizer is not None else None
                result[token_id] = Logprob(logprob, rank, decoded)
        return result



def _stop_strings_apply(seq: _Sequence) -> bool:
    """Whether the sequence's text may still end at a stop string: it runs, or its last token
    reached max_tokens (as in vLLM, a stop string that token completed wins: finish_reason
    "stop"); not after a stop token, an error or an abort."""
    return seq.output.finish_reason in (None, "length")
