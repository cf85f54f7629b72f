"""The request fields that ask for structured outputs, as OpenAI and vLLM spell them, and the one
`StructuredOutputsParams` they come to (`output_constraint`). Both routes take all of them:

- `response_format` (OpenAI's): {"type": "text"} (no constraint), {"type": "json_object"} or
  {"type": "json_schema", "json_schema": {"name", "schema", "description", "strict"}};
- `structured_outputs` (vLLM's): exactly one of "json" (a schema, or its JSON text), "regex",
  "choice", "grammar" (xgrammar's EBNF, start rule `root`), "json_object": true. Of vLLM's
  options, `disable_any_whitespace`, `disable_additional_properties` and `disable_fallback` are
  accepted and change nothing (JSON output is always compact, properties a schema does not list
  are never generated, there is no other backend to fall back to); `whitespace_pattern` and
  `structural_tag` are refused, as this engine cannot do what they ask;
- vLLM's older extras: `guided_json` (a schema or its JSON text), `guided_regex`,
  `guided_choice`, `guided_grammar`; `guided_decoding_backend` may only name xgrammar ("xgrammar"
  or "auto", options after a ":" ignored); `guided_whitespace_pattern` is refused.

At most one field may constrain a request. Here only the shape is checked (no xgrammar: the
proxy validates bodies with this module too). Whether the schema, regex or grammar compiles is
the server's check (`grammars.check_structured_outputs`, in a worker thread); its ValueError
becomes a 400 naming the field the client used through `OutputConstraint.error`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine_core.entrypoints.http.errors import RequestError
from engine_core.structured_outputs import StructuredOutputsParams

if TYPE_CHECKING:
    from engine_core.entrypoints.http.protocol import _SamplingRequest

__all__ = [
    "GUIDED_FIELDS",
    "JsonSchemaFormat",
    "OutputConstraint",
    "ResponseFormat",
    "StructuredOutputsField",
    "output_constraint",
]

MAX_ERROR_CHARS = 500  # an error message quoting a client's (huge) schema is cut here
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}  # vLLM's older extras and their kinds
BACKENDS = ("xgrammar", "auto")  # what guided_decoding_backend may name


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class JsonSchemaFormat(_Strict):
    """response_format.json_schema. `strict` and `description` change nothing: the schema is
    always enforced."""

    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(_Strict):
    """vLLM's `structured_outputs` field (its StructuredOutputsParams)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM's options: these three are what this engine always does
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    disable_fallback: bool = False
    # ... and these two it cannot do (refused when set)
    whitespace_pattern: str | None = None
    structural_tag: str | dict[str, Any] | None = None


@dataclass(frozen=True)
class OutputConstraint:
    """A request's constraint, and where the client put it: `field` (the request field, an
    error's `param`) and `path` (where its text is, as error messages name it)."""

    params: StructuredOutputsParams
    field: str
    path: str

    def error(self, exc: ValueError) -> RequestError:
        """The 400 for a ValueError about `params` ("structured_outputs.<kind> ..."): the
        message speaks of `path`, cut to MAX_ERROR_CHARS, and `param` is `field`."""
        return _error(str(exc), self.field, self.path, self.params.kind)


def _error(message: str, field: str, path: str, kind: str | None) -> RequestError:
    prefix = f"structured_outputs.{kind}" if kind else "structured_outputs"
    if message.startswith(prefix):
        message = path + message[len(prefix):]
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS - 3] + "..."
    return RequestError(message, param=field)


def _refused(field: str, why: str) -> RequestError:
    return RequestError(f"{field} is not supported: {why}", param=field)


def _params(field: str, path: str, kind: str | None, **given: Any) -> OutputConstraint:
    try:
        return OutputConstraint(StructuredOutputsParams(**given), field, path)
    except ValueError as exc:
        raise _error(str(exc), field, path, kind) from None


def _from_response_format(fmt: ResponseFormat) -> OutputConstraint | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return _params("response_format", "response_format", "json_object", json_object=True)
    if fmt.json_schema is None:
        raise RequestError('response_format of type "json_schema" needs a "json_schema" '
                           'object: {"name": ..., "schema": {...}}', param="response_format")
    return _params("response_format", "response_format.json_schema.schema", "json",
                   json=fmt.json_schema.schema_)


def _from_structured_outputs(field: StructuredOutputsField) -> OutputConstraint:
    if field.whitespace_pattern is not None:
        raise _refused("structured_outputs.whitespace_pattern",
                       "JSON output is always compact (disable_any_whitespace)")
    if field.structural_tag is not None:
        raise _refused("structured_outputs.structural_tag", "use json, regex, choice or grammar")
    given = {"json": field.json_, "regex": field.regex, "choice": field.choice,
             "grammar": field.grammar, "json_object": field.json_object}
    kinds = [kind for kind, value in given.items() if value is not None]
    kind = kinds[0] if len(kinds) == 1 else None
    path = f"structured_outputs.{kind}" if kind else "structured_outputs"
    return _params("structured_outputs", path, kind, **given)


def output_constraint(request: _SamplingRequest) -> OutputConstraint | None:
    """The request's constraint, None if it asks for none. RequestError (400 naming the field)
    if two fields ask for one, or one is malformed (an empty choice list, a schema that is not
    JSON, two kinds in `structured_outputs`, an option this engine cannot honour)."""
    backend = request.guided_decoding_backend
    if backend is not None and backend.split(":", 1)[0].strip().lower() not in BACKENDS:
        raise RequestError(f"guided_decoding_backend {backend!r} is not available; this "
                           f"server uses xgrammar (give \"xgrammar\" or \"auto\", or leave it "
                           f"out)", param="guided_decoding_backend")
    if request.guided_whitespace_pattern is not None:
        raise _refused("guided_whitespace_pattern", "JSON output is always compact")
    found: list[OutputConstraint] = []
    if request.response_format is not None:
        constraint = _from_response_format(request.response_format)
        if constraint is not None:
            found.append(constraint)
    if request.structured_outputs is not None:
        found.append(_from_structured_outputs(request.structured_outputs))
    for field, kind in GUIDED_FIELDS.items():
        value = getattr(request, field)
        if value is not None:
            found.append(_params(field, field, kind, **{kind: value}))
    if len(found) > 1:
        names = " and ".join(c.field for c in found)
        raise RequestError(f"{names} each ask for structured outputs; give only one",
                           param=found[1].field)
    return found[0] if found else None
