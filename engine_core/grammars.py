"""Structured outputs on xgrammar: compiling constraints off the engine loop, and each request's
matcher.

    StructuredOutputsParams --check_structured_outputs--> ok | ValueError   (front-end, no vocab)
    StructuredOutputsParams --GrammarCompiler.compile--> Future[CompiledGrammar] (worker thread,
                                                         cached by (kind, text), bounded)
    CompiledGrammar --GrammarCompiler.matcher--> RequestGrammar (per sequence: accept tokens,
                                                 fill the next token's bitmask, roll back)

A bitmask row is `bitmask_words(vocab_size)` little-endian int32 words, bit `t % 32` of word
`t // 32` set when token t is allowed; `StepBatch` carries a request's rows as bytes and the last
stage applies them to the logits before sampling (`executors/token_bitmask.py`).

xgrammar (and the transformers tokenizer wrapper it reads the vocabulary from) is imported on
first use, in the compiler's worker thread: an engine that never sees a constraint never loads
it. Its errors come back as ValueError with the C++ source prefix stripped.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import re
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from engine_core.messages import StructuredOutputStats
from engine_core.structured_outputs import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar

__all__ = [
    "COMPILE_TIMEOUT_S",
    "ChecksBusy",
    "ConstraintChecker",
    "GrammarCompiler",
    "RequestGrammar",
    "Vocabulary",
    "bitmask_words",
    "check_structured_outputs",
]

COMPILE_TIMEOUT_S = 60.0  # a request whose grammar is not compiled by then fails (the engine)
CHECK_TIMEOUT_S = 10.0  # a front-end check that takes longer is refused
MAX_RUNNING_CHECKS = 4  # a server's front-end checks compiling at once (ConstraintChecker)
CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped)
COMPILE_WORKERS = 2  # an engine's grammars compiling at once
_XGRAMMAR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+: (Check failed: \(.*?\) is false: )?")
_JSON_SCHEMA_OPTIONS: dict[str, Any] = {"any_whitespace": False, "strict_mode": True}
# EBNF character classes of JSON string characters as xgrammar (0.2.9) writes them: a
# length-bounded string's, and any other's; and as JSON text allows them (no control
# characters, no UTF-16 surrogates, which are not characters of UTF-8 text)
_XGRAMMAR_STRING_CHARS = (r'[^\"\\\r\n]', r'[^\0-\x1f\"\\\r\n]')
_JSON_STRING_CHARS = r'[^\0-\x1f\"\\\r\n\uD800-\uDFFF]'


def bitmask_words(vocab_size: int) -> int:
    """int32 words in one bitmask row of a `vocab_size` vocabulary."""
    return (vocab_size + 31) // 32


def _message(exc: BaseException) -> str:
    """An xgrammar error as a user can read it: the first line, no C++ file prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _XGRAMMAR_PREFIX.sub("", text)


def _choice_ebnf(choices: Sequence[str]) -> str:
    """An EBNF grammar matching exactly one of `choices` (JSON string escapes are EBNF's)."""
    import json

    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _grammar_of(params: StructuredOutputsParams) -> xgrammar.Grammar:
    """The constraint as an xgrammar Grammar (parsing only: no vocabulary). ValueError naming
    the field if it is not a valid schema, regex or grammar, or uses what xgrammar lacks."""
    import xgrammar as xgr

    kind = params.kind
    try:
        if kind in ("json", "json_object"):
            schema = params.json if kind == "json" else '{"type": "object"}'
            assert isinstance(schema, str)  # a dict became its text in __post_init__
            return _valid_json_strings(xgr.Grammar.from_json_schema(schema,
                                                                    **_JSON_SCHEMA_OPTIONS))
        if kind == "regex":
            assert params.regex is not None
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            assert params.choice is not None
            return xgr.Grammar.from_ebnf(_choice_ebnf(params.choice))
        assert params.grammar is not None
        return xgr.Grammar.from_ebnf(params.grammar)
    except Exception as exc:  # xgrammar raises RuntimeError (and others) for a bad input
        what = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regex",
                "choice": "choice", "grammar": "grammar"}[kind]
        raise ValueError(f"structured_outputs.{kind} is not a valid {what}: "
                         f"{_message(exc)}") from None


def _valid_json_strings(grammar: xgrammar.Grammar) -> xgrammar.Grammar:
    """`grammar` with JSON's rule for the characters of a string everywhere. xgrammar lets a
    length-bounded string (`maxLength`) hold control characters, and any string hold UTF-16
    surrogates (3 bytes each, decoded as 3 replacement characters): either breaks the JSON or
    its length. Its printed EBNF is parsed back with both excluded."""
    import xgrammar as xgr

    text = original = str(grammar)
    for loose in _XGRAMMAR_STRING_CHARS:
        text = text.replace(loose, _JSON_STRING_CHARS)
    return grammar if text == original else xgr.Grammar.from_ebnf(text)


# A vocabulary to check constraints against: (directory with tokenizer.json, model vocab size)
Vocabulary = tuple[str, int]


def _tokenizer_info(vocabulary: Vocabulary) -> Any:
    """xgrammar's view of the tokenizer in `vocabulary`'s directory."""
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    tokenizer_dir, vocab_size = vocabulary
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise ValueError(f"structured outputs need a tokenizer, and {tokenizer_dir} has no "
                         f"tokenizer.json")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=path)
    with warnings.catch_warnings():  # no stop ids here: every matcher is given its own
        warnings.simplefilter("ignore")
        return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)


@functools.cache
def _check_compiler(vocabulary: Vocabulary | None) -> Any:
    """The compiler a check uses: over the model's vocabulary, or without one over the 256
    single bytes and a stop token (id 256), of which every text is a token sequence."""
    import xgrammar as xgr

    if vocabulary is None:
        info = xgr.TokenizerInfo([bytes([b]) for b in range(256)] + [b"</s>"],
                                 stop_token_ids=[256])
    else:
        info = _tokenizer_info(vocabulary)
    return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)


def _check_compiles(params: StructuredOutputsParams, grammar: xgrammar.Grammar,
                    vocabulary: Vocabulary | None) -> None:
    """ValueError unless `grammar` compiles over the vocabulary and some token can begin it
    (not so: it matches no text at all, e.g. `root ::= root`, or none this model can write)."""
    import xgrammar as xgr

    compiler = _check_compiler(vocabulary)
    try:
        matcher = xgr.GrammarMatcher(compiler.compile_grammar(grammar))
    except Exception as exc:
        raise ValueError(f"structured_outputs.{params.kind} cannot be compiled: "
                         f"{_message(exc)}") from None
    bitmask = xgr.allocate_token_bitmask(1, 257 if vocabulary is None else vocabulary[1])
    matcher.fill_next_token_bitmask(bitmask)
    if not bool(bitmask.any()):
        what = "no text at all" if vocabulary is None else "no text this model can write"
        raise ValueError(f"structured_outputs.{params.kind} matches {what}")


@functools.lru_cache(maxsize=CACHE_SIZE)
def _problem(key: tuple[str, str], vocabulary: Vocabulary | None) -> str | None:
    """What is wrong with the constraint of this `StructuredOutputsParams.key` (a ValueError's
    message), or None; remembered for the last `CACHE_SIZE` constraints, so a schema sent with
    every request is checked once."""
    params = StructuredOutputsParams.from_key(key)
    try:
        _check_compiles(params, _grammar_of(params), vocabulary)
    except ValueError as exc:
        return str(exc)
    return None


def check_structured_outputs(params: StructuredOutputsParams,
                             timeout_s: float = CHECK_TIMEOUT_S,
                             done: Callable[[], None] | None = None,
                             vocabulary: Vocabulary | None = None) -> None:
    """Raise ValueError (naming the field) if the constraint cannot be compiled: not a valid
    schema, regex or grammar, a schema feature xgrammar does not support, or one no text
    satisfies. With the model's `vocabulary` it is compiled as the engine will compile it, so
    a constraint whose compile would take the engine longer than `timeout_s` (compile time
    grows with the vocabulary) is refused here; without, over a byte vocabulary (quick: a
    parse and emptiness check). A check that takes longer than `timeout_s` is refused (the work
    is left to finish in a daemon thread, which calls `done` when it has, if given); the
    vocabulary's one-time set-up is not counted. For front-ends, before a request is queued; a
    server runs them through a `ConstraintChecker`."""
    try:
        _check_compiler(vocabulary)  # set up once (reads the tokenizer), not timed
    except ValueError:
        if done is not None:
            done()
        raise
    result: list[str | None] = []

    def run() -> None:
        try:
            result.append(_problem(params.key, vocabulary))
        finally:
            if done is not None:
                done()

    worker = threading.Thread(target=run, name="grammar-check", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not result:
        raise ValueError(f"structured_outputs.{params.kind} took longer than {timeout_s:g} s "
                         f"to compile; simplify it")
    if result[0] is not None:
        raise ValueError(result[0])


class ChecksBusy(Exception):
    """No `ConstraintChecker` slot came free in time: checks that ran past their timeout are
    still compiling (xgrammar cannot stop one)."""


class ConstraintChecker:
    """`check_structured_outputs` for a server: at most `max_running` checks compile at once,
    counting those still running after their timeout refused them, so that hostile constraints
    cannot pile up threads that burn the CPU. A check waits up to its timeout for a slot, then
    is refused with ChecksBusy. Thread-safe."""

    def __init__(self, max_running: int = MAX_RUNNING_CHECKS,
                 timeout_s: float = CHECK_TIMEOUT_S,
                 vocabulary: Vocabulary | None = None) -> None:
        self.timeout_s = timeout_s
        self.vocabulary = vocabulary
        self._slots = threading.BoundedSemaphore(max_running)

    def check(self, params: StructuredOutputsParams) -> None:
        """ValueError as `check_structured_outputs`; ChecksBusy if no slot came free."""
        if not self._slots.acquire(timeout=self.timeout_s):
            raise ChecksBusy(f"too many structured_outputs checks are running (slow ones from "
                             f"earlier requests); retry in {self.timeout_s:g} s")
        check_structured_outputs(params, self.timeout_s, done=self._slots.release,
                                 vocabulary=self.vocabulary)


class RequestGrammar:
    """One sequence's position in its grammar. The scheduler advances it with every token the
    request keeps (`accept`), fills the bitmask of its next step's rows (`bitmask_rows`, which
    leaves it where it was) and trims drafts to what the grammar allows (`valid_prefix`)."""

    def __init__(self, matcher: xgrammar.GrammarMatcher, vocab_size: int) -> None:
        import torch

        self._matcher = matcher
        self._vocab_size = vocab_size
        self._torch = torch

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted (or it needs none)."""
        return bool(self._matcher.is_terminated())

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token. False (nothing changes) if the grammar forbids it."""
        if self._matcher.is_terminated():
            return False
        return bool(self._matcher.accept_token(token_id))

    def valid_prefix(self, draft_token_ids: Sequence[int]) -> int:
        """How many leading drafts the grammar allows (the state is left unchanged)."""
        accepted = 0
        for token_id in draft_token_ids:
            if not self.accept(token_id):
                break
            accepted += 1
        if accepted:
            self._matcher.rollback(accepted)
        return accepted

    def bitmask_rows(self, draft_token_ids: Sequence[int]) -> bytes:
        """The allowed tokens of `1 + len(draft_token_ids)` sampler rows: the next token's, then
        after each draft (all must be allowed: `valid_prefix`), as little-endian int32 rows."""
        rows = 1 + len(draft_token_ids)
        bitmask = self._torch.zeros(rows, bitmask_words(self._vocab_size),
                                    dtype=self._torch.int32)
        accepted = 0
        for row in range(rows):
            if self._matcher.is_terminated():
                break  # a draft was a stop token: what follows it is never sampled
            self._matcher.fill_next_token_bitmask(bitmask, row)
            if row < len(draft_token_ids):
                if not self._matcher.accept_token(draft_token_ids[row]):
                    raise ValueError(f"draft token {draft_token_ids[row]} breaks the grammar")
                accepted += 1
        if accepted:
            self._matcher.rollback(accepted)
        return bitmask.numpy().astype("<i4", copy=False).tobytes()


class GrammarCompiler:
    """Compiles constraints for one tokenizer in a worker thread, caching the results by their
    (kind, text) key, least recently used dropped beyond `cache_size`.

    `compile` returns at once with a future; the engine polls it (`done()`), so a slow compile
    never stalls the loop, and `COMPILE_WORKERS` compile at once, so one slow compile does not
    hold up every other. Every sequence gets its own matcher (`matcher`) over a shared compiled
    grammar."""

    def __init__(self, tokenizer_dir: str, vocab_size: int, *, cache_size: int = CACHE_SIZE,
                 max_threads: int | None = None) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.stats = StructuredOutputStats()
        self._threads = max_threads or max(1, min(4, (os.cpu_count() or 1) // 2))
        self._pool = concurrent.futures.ThreadPoolExecutor(COMPILE_WORKERS,
                                                           thread_name_prefix="grammar")
        self._lock = threading.Lock()  # the workers' set-up and their stats
        self._cache: OrderedDict[tuple[str, str], concurrent.futures.Future] = OrderedDict()
        self._compiler: Any = None  # xgrammar.GrammarCompiler, made in the worker on first use

    def compile(self, params: StructuredOutputsParams) -> concurrent.futures.Future:
        """A future of the compiled grammar (`xgrammar.CompiledGrammar`), or of the ValueError
        that says why it cannot be compiled. A key seen before shares its future."""
        key = params.key
        self.stats.num_requests += 1
        future = self._cache.get(key)
        if future is not None:
            self._cache.move_to_end(key)
            self.stats.num_cache_hits += 1
            return future
        future = self._pool.submit(self._compile, params)
        self._cache[key] = future
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return future

    def forget(self, params: StructuredOutputsParams) -> None:
        """Drop a key from the cache (a compile that timed out is retried next time)."""
        self._cache.pop(params.key, None)

    def _compile(self, params: StructuredOutputsParams) -> Any:
        compiler = self._get_compiler()
        start = time.perf_counter()
        grammar = _grammar_of(params)  # ValueError naming the field
        try:
            compiled = compiler.compile_grammar(grammar)
        except Exception as exc:
            raise ValueError(f"structured_outputs.{params.kind} cannot be compiled: "
                             f"{_message(exc)}") from None
        elapsed = time.perf_counter() - start
        with self._lock:
            self.stats.compile_seconds += elapsed
            self.stats.num_compiles += 1
        return compiled

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                self._compiler = xgr.GrammarCompiler(
                    _tokenizer_info((self.tokenizer_dir, self.vocab_size)),
                    max_threads=self._threads, cache_enabled=False)
            return self._compiler

    def matcher(self, compiled: Any, stop_token_ids: Sequence[int],
                max_rollback_tokens: int = 0) -> RequestGrammar:
        """A fresh matcher over `compiled` that ends on any of `stop_token_ids` (none: it ends
        with the grammar). `max_rollback_tokens`: the most drafts it may check at once."""
        import xgrammar as xgr

        stop = sorted(set(stop_token_ids))
        matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop or None,
                                     terminate_without_stop_token=not stop,
                                     max_rollback_tokens=max_rollback_tokens)
        return RequestGrammar(matcher, self.vocab_size)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
