"""Tokenizer from a checkpoint's tokenizer.json, chat templates and streaming detokenization."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from datetime import datetime
from typing import Any

import tokenizers
from jinja2 import TemplateError, TemplateSyntaxError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers.decoders import DecodeStream

# Prompt tokens a detokenizer starts from: enough for the first output token's spacing, few
# enough that a long prompt does not slow every step down.
_PROMPT_CONTEXT_TOKENS = 8

# Texts longer than this are encoded with `encode_batch`, which releases the GIL while the Rust
# side works (`encode` holds it), so a thread tokenizing a long prompt does not stall the others.
_RELEASE_GIL_CHARS = 4096

# How much a safe normalizer can shrink text: Unicode composition (NFC/NFKC) merges at most three
# code points into one (Hangul L+V+T jamo, a letter with two combining marks); 4 leaves slack.
# A prompt longer than max_model_len * max_chars_per_token * PROMPT_CHARS_SAFETY_FACTOR
# characters cannot fit max_model_len tokens.
PROMPT_CHARS_SAFETY_FACTOR = 4

# Pipeline pieces that never drop input characters (they map, split, or add).
_SAFE_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend"})
_SAFE_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Digits", "Punctuation",
                                  "UnicodeScripts"})
_BYTE_FALLBACK_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _token_content(token: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


class Tokenizer:
    """A `tokenizers.Tokenizer` with the checkpoint's special-token settings and chat template
    (from tokenizer_config.json, or chat_template.jinja next to it)."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        tokenizer_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        config = tokenizer_config or {}
        self.backend = tokenizer
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.bos_token_id = self._id_of(self.bos_token)
        self._eos_token_id = self._id_of(self.eos_token)
        # None: trust tokenizer.json's post-processor; True/False: enforce it.
        self.add_bos_token: bool | None = config.get("add_bos_token")
        self.add_eos_token: bool | None = config.get("add_eos_token")
        self.chat_template = chat_template or _default_template(config.get("chat_template"))
        self._compiled_template: Any = None

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_chars_per_token(self) -> int | None:
        """An upper bound on the input characters one token can cover, or None when the
        tokenizer has no such bound.

        It is the longest vocabulary or added-token string, counted in the characters it
        stands for: a byte-level BPE string has one character per byte (an input character is
        at least one byte), a sentencepiece `▁` stands for one space, a byte-fallback token
        `<0xNN>` for at most one character. None when a piece of the pipeline can drop input
        characters, so that no per-token bound exists: normalizers that strip or replace text
        (Strip, StripAccents, BertNormalizer, Precompiled, a shrinking Replace), pre-tokenizers
        that drop whitespace (Whitespace, BertPreTokenizer, a removing Split), WordPiece or
        WordLevel models (a whole unknown word is one [UNK]), fused unknown tokens without
        byte fallback, and added tokens that swallow the whitespace around them. Composing
        normalizers (NFC, NFKC) can shrink text a little: callers multiply by
        PROMPT_CHARS_SAFETY_FACTOR."""
        spec = json.loads(self.backend.to_str())
        if not (_safe_normalizer(spec.get("normalizer"))
                and _safe_pre_tokenizer(spec.get("pre_tokenizer"))
                and _model_has_bound(spec.get("model") or {})):
            return None
        for added in spec.get("added_tokens") or []:
            if added.get("lstrip") or added.get("rstrip"):
                return None
        vocab = self.backend.get_vocab(with_added_tokens=True)
        if not vocab:
            return None
        return max(1 if _BYTE_FALLBACK_TOKEN.match(token) else max(len(token), 1)
                   for token in vocab)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with special tokens, BOS/EOS as the checkpoint configures.
        A long text is encoded with the GIL released, so it may run in a worker thread."""
        ids = self._encode(text, add_special_tokens)
        if not add_special_tokens:
            return ids
        bos, eos = self.bos_token_id, self._eos_token_id
        if bos is not None:
            has_bos = bool(ids) and ids[0] == bos
            if self.add_bos_token and not has_bos:
                ids = [bos, *ids]
            elif self.add_bos_token is False and has_bos:
                plain = self._encode(text, False)
                if plain[:1] != [bos]:  # the BOS came from the post-processor
                    ids = ids[1:]
        if eos is not None and self.add_eos_token and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        return ids

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) > _RELEASE_GIL_CHARS:
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def with_chat_template(self, chat_template: str) -> Tokenizer:
        """A tokenizer that shares this one's vocabulary and special tokens but renders chats
        with `chat_template` (a Jinja template, compiled here: ValueError if it does not
        parse)."""
        compiled = compile_chat_template(chat_template)
        other = copy.copy(self)
        other.chat_template = chat_template
        other._compiled_template = compiled
        return other

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}], with "tool_calls" and
        "tool_call_id" where a conversation has them) with the checkpoint's chat template.
        `tools` ([{"type": "function", "function": {"name", "description", "parameters"}}])
        reaches the template as `tools`, None when there are none, as in HF's
        apply_chat_template. Extra keyword arguments (e.g. `enable_thinking`) reach the
        template too. Raises ValueError when there is no template or the template rejects the
        messages."""
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (none in tokenizer_config.json or "
                "chat_template.jinja); use plain prompts or add a template to the checkpoint"
            )
        if self._compiled_template is None:
            self._compiled_template = compile_chat_template(self.chat_template)
        try:
            return self._compiled_template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **template_kwargs,
            )
        except TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e


def _safe_normalizer(spec: dict[str, Any] | None) -> bool:
    """Whether a tokenizer.json normalizer keeps every input character (up to composition)."""
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_safe_normalizer(n) for n in spec.get("normalizers") or [])
    if kind == "Replace":  # safe when it maps one literal string to one at least as long
        pattern = (spec.get("pattern") or {}).get("String")
        return pattern is not None and len(spec.get("content") or "") >= len(pattern)
    return kind in _SAFE_NORMALIZERS


def _safe_pre_tokenizer(spec: dict[str, Any] | None) -> bool:
    """Whether a tokenizer.json pre-tokenizer keeps every character of its input."""
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_safe_pre_tokenizer(p) for p in spec.get("pretokenizers") or [])
    if kind == "Split":
        return spec.get("behavior") != "Removed"
    return kind in _SAFE_PRE_TOKENIZERS


def _model_has_bound(spec: dict[str, Any]) -> bool:
    """Whether each token of the model covers at most its own string's characters."""
    kind = spec.get("type")
    if kind == "BPE":
        return bool(spec.get("byte_fallback")) or not spec.get("fuse_unk")
    if kind == "Unigram":  # unknown characters are fused into one token unless they fall back
        return bool(spec.get("byte_fallback")) or spec.get("unk_id") is None
    return False


def _default_template(template: Any) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template if isinstance(template, str) else None


def compile_chat_template(chat_template: str) -> Any:
    """`chat_template` compiled in the sandbox chat templates render in; ValueError (with the
    line) when it is not valid Jinja."""
    try:
        return _jinja_environment().from_string(chat_template)
    except TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not parse (line {e.lineno}): {e.message}") \
            from None


def _jinja_environment() -> ImmutableSandboxedEnvironment:
    """A sandbox with the helpers transformers gives chat templates."""

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


class IncrementalDetokenizer:
    """Turns one sequence's generated ids into text as they arrive.

    `step` returns only text that is final: a character split over several tokens is held
    back until complete. The stream starts from the prompt's last ids, so the first output
    token is spaced as it is in context (a sentencepiece-style "▁Hi" after a prompt gives
    " Hi", where decoding the output ids alone would strip the space).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._backend = tokenizer.backend
        self._stream = DecodeStream(
            ids=list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]),
            skip_special_tokens=skip_special_tokens,
        )
        self._chunks: list[str] = []

    def step(self, new_token_ids: list[int]) -> str:
        """Feed newly generated ids; return the text they complete (may be "")."""
        new_text = []
        for token_id in new_token_ids:
            chunk = self._stream.step(self._backend, token_id)
            if chunk:
                new_text.append(chunk)
        text = "".join(new_text)
        if text:
            self._chunks.append(text)
        return text

    @property
    def text(self) -> str:
        """All output text so far."""
        return "".join(self._chunks)


def load_tokenizer(model_dir: str) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when `model_dir` has no tokenizer.json."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        backend = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on bad files
        raise ValueError(f"cannot load {path}: {e}") from e
    config: dict[str, Any] = {}
    config_path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot parse {config_path}: {e}") from e
    template = None
    template_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(template_path):
        with open(template_path, encoding="utf-8") as f:
            template = f.read()
    return Tokenizer(backend, config, chat_template=template)
