"""The OpenAI error body and the request error every HTTP front-end raises (the server and the
proxy answer the same bad request with the same 400)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from engine_core.sampling_params import SamplingParams

__all__ = ["RequestError", "error_body", "param_of", "validation_error"]


class RequestError(ValueError):
    """A request the server rejects: the HTTP status and the OpenAI error fields to send."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | int | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = (
            message, param, status, type, code)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Union members pydantic puts in an error's location; they are not field names.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def validation_error(exc: ValidationError) -> RequestError:
    """A 400 naming the first bad field, e.g. param "messages.0.role" (of the errors a union
    field gives, one per alternative, the one that got deepest into the value)."""
    errors = exc.errors(include_url=False)
    field = errors[0]["loc"][:1]
    first = max((e for e in errors if e["loc"][:1] == field), key=lambda e: len(e["loc"]))
    if first["type"] == "json_invalid":
        return RequestError(f"the request body is not valid JSON: {first['msg']}")
    parts = [str(p) for p in first["loc"]
             if isinstance(p, int) or ("[" not in p and p.lower() not in _TYPE_TAGS)]
    param = ".".join(parts) or None
    where = f"{param}: " if param else "the request body: "
    if first["type"] == "missing":
        return RequestError(f"{where}{first['msg']}", param=param)
    got = repr(first.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return RequestError(f"{where}{first['msg']} (got {got})", param=param)


_SAMPLING_FIELDS = frozenset(SamplingParams.__struct_fields__)
_FIELD_IN_MESSAGE = re.compile(r"^(?:prompt \d+: )?([a-z_]+) ")


def param_of(message: str) -> str | None:
    """The SamplingParams field a ValueError message starts with ("top_p must be ..."), if any."""
    match = _FIELD_IN_MESSAGE.match(message)
    return match.group(1) if match and match.group(1) in _SAMPLING_FIELDS else None
