"""`--chat-template`: the chat template a server renders /v1/chat/completions with, instead of
the model's.

As in vLLM, the value is a file to read, or else the template itself: a value that names no
readable file is taken as an inline template when it holds a Jinja character (`{`, `}` or a
newline), and is otherwise refused as a file path that cannot be opened.
"""

from __future__ import annotations

from engine_core.models.tokenizer import compile_chat_template

__all__ = ["load_chat_template"]

_JINJA_CHARS = "{}\n"


def load_chat_template(value: str) -> str:
    """The template `value` gives (its file's text, or `value` itself), checked to compile.
    ValueError starting with "chat_template" for a path that cannot be read or a template
    that does not parse."""
    try:
        with open(value, encoding="utf-8") as f:
            template = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        if not any(c in value for c in _JINJA_CHARS):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ValueError(f"chat_template {value!r} looks like a file path, but it cannot "
                             f"be read ({reason}); give a template file or the template "
                             f"itself") from None
        template = value
    try:
        compile_chat_template(template)
    except ValueError as exc:
        raise ValueError(f"chat_template {str(exc).removeprefix('the chat template ')}") \
            from None
    return template
