"""`InputProcessor`: what a front-end (`LLM`, `AsyncLLM`, the OpenAI server) does with a request
before the engine core sees it, in one place.

    prompt (text | token ids | {"prompt"} | {"prompt_token_ids"})
        -> process_prompt  -> ProcessedPrompt   (tokenized, fits the context, in the vocabulary)
    SamplingParams         -> check_sampling_params (fit this model: vocabulary, n, stop strings)
    priority               -> check_priority        (an int64 the scheduling policy takes)
    ProcessedRequest       -> make_requests -> the EngineCoreRequests of its n sequences

Every check raises `ValueError` whose message names the field at fault; a front-end runs each
check once per request and reports it its own way (`LLM` prefixes "prompt i: ", the server
answers a 400 naming the param). The engine core checks what it decodes again
(`validation.validate_core_request`), so a request that bypassed a front-end cannot hurt it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from engine_core.config import EngineConfig
from engine_core.generation_config import read_generation_defaults
from engine_core.grammars import Vocabulary, check_structured_outputs
from engine_core.messages import EngineCoreRequest
from engine_core.models import Tokenizer
from engine_core.models.tokenizer import PROMPT_CHARS_SAFETY_FACTOR
from engine_core.sampling_params import WIRE_INT_MAX, WIRE_INT_MIN, SamplingParams
from engine_core.transfer_params import KVTransferParams
from engine_core.validation import validate_priority, validate_prompt, validate_sampling_params

__all__ = ["InputProcessor", "ProcessedPrompt", "ProcessedRequest", "PromptType"]

# A prompt: its text, its token ids, or vLLM's dicts {"prompt": text} / {"prompt_token_ids":
# ids} (a dict may also carry "add_special_tokens", and "prompt" beside the ids as their text).
PromptType = str | list[int] | dict[str, Any]


@dataclass(frozen=True)
class ProcessedPrompt:
    """A prompt checked against the engine's config: `token_ids` is non-empty, fits
    max_model_len and holds vocabulary ids only; `text` is the prompt's text, when known."""

    text: str | None
    token_ids: list[int]


@dataclass(frozen=True)
class ProcessedRequest:
    """One user request whose every part has been checked: made by `InputProcessor.process`,
    or by a front-end that ran each of the processor's checks on its parts itself. A front-end
    hands it on (`AsyncLLM.generate_processed`) without checking it again."""

    prompt: ProcessedPrompt
    params: SamplingParams
    priority: int = 0


class InputProcessor:
    """Turns prompts and their parameters into engine-core requests for one engine config.

    `eos_token_ids` (the model's end-of-sequence ids: its config's and the tokenizer's) is
    computed once here and carried by every engine-core request. `default_sampling` holds the
    sampling defaults of the engine's `generation_config` (SamplingParams field -> value,
    `max_tokens` among them), for the fields a request leaves out."""

    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        # what a structured-output constraint is checked against: the engine's vocabulary
        self.vocabulary: Vocabulary = (config.tokenizer_path, config.model.vocab_size)
        eos = set(config.model.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids: list[int] = sorted(eos)
        self.default_sampling: dict[str, Any] = read_generation_defaults(
            config.generation_config)
        max_model_len = config.scheduler.max_model_len
        per_token = tokenizer.max_chars_per_token if tokenizer is not None else None
        # A text longer than this many characters cannot fit max_model_len tokens (None: the
        # tokenizer gives no bound, and only tokenizing tells).
        self.max_prompt_chars: int | None = (
            max_model_len * per_token * PROMPT_CHARS_SAFETY_FACTOR
            if per_token is not None else None)

    # ---- checks -------------------------------------------------------------------------------
    def check_prompt_chars(self, num_chars: int, what: str = "the prompt has") -> None:
        """ValueError for a text that is provably too long for the context, so it need not be
        tokenized to be refused. `what` begins the message ("the messages have")."""
        if self.max_prompt_chars is not None and num_chars > self.max_prompt_chars:
            raise ValueError(
                f"{what} {num_chars} characters, more than the "
                f"{self.config.scheduler.max_model_len} tokens of this model's context can hold "
                f"(at most {self.max_prompt_chars} characters); shorten it")

    def check_sampling_params(self, params: SamplingParams, *,
                              constraint_checked: bool = False) -> None:
        """ValueError unless `params` fit this model (`validation.validate_sampling_params`)
        and this front-end can apply them (stop strings and structured outputs need a
        tokenizer; a constraint must compile: `grammars.check_structured_outputs`, bounded in
        time, may take seconds the first time, when it loads xgrammar). `constraint_checked`:
        the caller has run that check already (a server does, in a worker thread)."""
        validate_sampling_params(params, self.config)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model directory has no "
                             "tokenizer.json; use stop_token_ids instead")
        if params.structured_outputs is not None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs need a tokenizer, and this model "
                                 "directory has no tokenizer.json")
            if not constraint_checked:
                check_structured_outputs(params.structured_outputs,
                                         vocabulary=self.vocabulary)

    def check_priority(self, priority: object) -> None:
        """ValueError unless `priority` is an int64 the engine's scheduling policy takes."""
        validate_priority(priority, self.config.scheduler.policy)

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the generation config's defaults (vLLM's
        `get_default_sampling_params`): what a request without its own gets."""
        return SamplingParams(**self.default_sampling)

    # ---- prompts ------------------------------------------------------------------------------
    def process_prompt(self, prompt: PromptType, add_special_tokens: bool = True
                       ) -> ProcessedPrompt:
        """Tokenize (a text) and check one prompt. A dict's own "add_special_tokens" wins over
        the argument. ValueError for a prompt that is malformed, empty, too long for
        max_model_len or holds ids outside the vocabulary."""
        text: str | None
        if isinstance(prompt, str):
            text, token_ids = prompt, None
        elif isinstance(prompt, list):
            text, token_ids = None, prompt
        elif isinstance(prompt, dict):
            add_special_tokens = prompt.get("add_special_tokens", add_special_tokens)
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)):
                    raise ValueError("prompt_token_ids must be a list of ints")
                text, token_ids = prompt.get("prompt"), list(ids)
            elif "prompt" in prompt:
                text, token_ids = prompt["prompt"], None
                if not isinstance(text, str):
                    raise ValueError(f"prompt must be a str, got {type(text).__name__}")
            else:
                raise ValueError("a prompt dict needs 'prompt_token_ids' or 'prompt'")
        else:
            raise ValueError(f"a prompt must be a str, a list of token ids or a dict with "
                             f"'prompt_token_ids' or 'prompt', got {type(prompt).__name__}")
        if token_ids is None:
            assert text is not None
            token_ids = self._encode(text, add_special_tokens)
        validate_prompt(token_ids, self.config)
        return ProcessedPrompt(text, token_ids)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if not text:
            raise ValueError("the prompt is empty; give at least one character")
        if self.tokenizer is None:
            raise ValueError("this model directory has no tokenizer.json; pass the prompt as "
                             "token ids ({'prompt_token_ids': [...]})")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    # ---- whole requests -----------------------------------------------------------------------
    def process(self, prompt: PromptType, params: SamplingParams, priority: int = 0,
                add_special_tokens: bool = True) -> ProcessedRequest:
        """Check the parameters, then tokenize and check the prompt: one user request, ready
        for `make_requests`."""
        self.check_sampling_params(params)
        self.check_priority(priority)
        return ProcessedRequest(self.process_prompt(prompt, add_special_tokens), params,
                                priority)

    def params_per_prompt(self, sampling_params: SamplingParams | Sequence[SamplingParams] | None,
                          num_prompts: int) -> list[SamplingParams]:
        """The batch form (`LLM.generate`): one SamplingParams for all prompts (None:
        `default_sampling_params()`) or one per prompt, each checked once."""
        if sampling_params is None:
            sampling_params = self.default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            self.check_sampling_params(sampling_params)
            return [sampling_params] * num_prompts
        params_list = list(sampling_params)
        if len(params_list) != num_prompts:
            raise ValueError(f"sampling_params has {len(params_list)} entries for {num_prompts} "
                             f"prompts; pass one SamplingParams or one per prompt")
        for i, params in enumerate(params_list):
            try:
                self.check_sampling_params(params)
            except ValueError as exc:
                raise ValueError(f"sampling_params[{i}]: {exc}") from None
        return params_list

    def priorities_per_prompt(self, priority: Sequence[int] | None, num_prompts: int
                              ) -> list[int]:
        """The batch form (`LLM.generate`): None (all 0) or one priority per prompt."""
        if priority is None:
            return [0] * num_prompts
        if isinstance(priority, (int, str, bytes)) or not isinstance(priority, Sequence):
            raise ValueError(f"priority must be a list of ints, one per prompt, got "
                             f"{type(priority).__name__}")
        if len(priority) != num_prompts:
            raise ValueError(f"priority has {len(priority)} entries for {num_prompts} prompts; "
                             f"pass one per prompt")
        for i, value in enumerate(priority):
            try:
                self.check_priority(value)
            except ValueError as exc:
                raise ValueError(f"{exc} (priority[{i}])") from None
        return list(priority)

    def make_requests(self, request_id: str, request: ProcessedRequest, *,
                      arrival_time: float, owner_id: str = "", do_remote_decode: bool = False,
                      kv_transfer_params: KVTransferParams | None = None
                      ) -> list[EngineCoreRequest]:
        """The engine-core requests of one user request: one per sequence, id `request_id`
        when n is 1, else `f"{index}_{request_id}"`, each with n=1 and (with a seed) seed +
        index. They carry `owner_id` (the user request they belong to, for fair share;
        default: `request_id`), the priority and the EOS ids. Disaggregated prefill/decode:
        `do_remote_decode` goes to every sequence, `kv_transfer_params` to the first (the
        others compute the prompt). Checks nothing: `request` has been checked."""
        params = request.params
        requests = []
        for index in range(params.n):
            core_id = request_id if params.n == 1 else f"{index}_{request_id}"
            requests.append(EngineCoreRequest(
                core_id, list(request.prompt.token_ids), _child_params(params, index),
                list(self.eos_token_ids), arrival_time, owner_id=owner_id or request_id,
                priority=request.priority, do_remote_decode=do_remote_decode))
        requests[0].kv_transfer_params = kv_transfer_params
        return requests


def _child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sequence `index` of an n-way request: n=1, and a distinct seed when one is set."""
    if params.n == 1:
        return params
    seed = None if params.seed is None else _wrap_seed(params.seed + index)
    return msgspec.structs.replace(params, n=1, seed=seed)


def _wrap_seed(value: int) -> int:
    """`value`, wrapped around into the wire's int range when `seed + index` overflows it."""
    return value if value <= WIRE_INT_MAX else value - WIRE_INT_MAX - 1 + WIRE_INT_MIN
