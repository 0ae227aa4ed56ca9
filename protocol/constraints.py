"""Structured-output fields of a request body -> one Constraint (or None: free text).

Accepted spellings (chat and completions; EAS / WebSocket pass a dict holding only response_format):
- OpenAI `response_format`: {"type": "text"} -> None; {"type": "json_object"} -> json {"type": "object"};
  {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}} -> json schema.
  A missing schema is {"type": "object"}; the schema `true` ("anything") is stored as {}, its dict
  spelling; `false` matches nothing and is a 400.
- vLLM's `structured_outputs`: exactly one of json (a schema, or a JSON string of one), regex,
  choice, grammar, json_object (true). Null members count as absent. `backend` (a string) is
  accepted and ignored (the engine has one grammar library). vLLM's other options (structural_tag,
  whitespace_pattern, disable_*) change the answer in ways berth does not implement: a 400 naming
  `structured_outputs.<key>`, except a disable_* flag set to false (vLLM's default: nothing asked).
- vLLM's legacy `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (same values);
  `guided_decoding_backend` (a string) is ignored; `guided_whitespace_pattern` is a 400.
More than one of these (response_format other than text counts) is a 400 naming the second one.

Shapes only: whether the grammar library can compile a schema or grammar is the engine's 400.
Caps: a schema's JSON, a regex, a grammar or a choice list's total text at most MAX_SPEC_BYTES
(UTF-8); at most MAX_CHOICES choices.
"""
from __future__ import annotations

import re

import orjson

from protocol.errors import bad_field
from protocol.types import Constraint

MAX_SPEC_BYTES = 64 * 1024
MAX_CHOICES = 1024
NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")      # OpenAI's rule for schema and function names

_LEGACY = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_SO_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_SO_FLAGS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties")
ONLY_ONE = "only one structured-output constraint per request"


def parse_constraint(body: dict) -> Constraint | None:
    """The request's constraint; ProtocolError (400 naming the field) for a bad or second one."""
    found: list[tuple[str, Constraint]] = []
    if body.get("response_format") is not None:
        constraint = _response_format(body["response_format"])
        if constraint is not None:
            found.append(("response_format", constraint))
    if body.get("structured_outputs") is not None:
        found.append(("structured_outputs", _structured_outputs(body["structured_outputs"])))
    for field, kind in _LEGACY.items():
        if body.get(field) is not None:
            found.append((field, _value(field, kind, body[field])))
    backend = body.get("guided_decoding_backend")
    if backend is not None and not isinstance(backend, str):
        raise bad_field("guided_decoding_backend", "must be a string")
    if body.get("guided_whitespace_pattern") is not None:
        raise bad_field("guided_whitespace_pattern", "is not supported")
    if len(found) > 1:
        raise bad_field(found[1][0], f"{ONLY_ONE} ({found[0][0]} is already one)")
    return found[0][1] if found else None


def _response_format(value: object) -> Constraint | None:
    field = "response_format"
    if not isinstance(value, dict):
        raise bad_field(field, 'must be an object such as {"type": "json_object"}')
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json", {"type": "object"})
    if kind != "json_schema":
        raise bad_field(field, 'type must be "text", "json_object" or "json_schema"')
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_field(field, "json_schema must be an object holding the schema")
    name = spec.get("name")
    if name is not None and not (isinstance(name, str) and NAME_RE.fullmatch(name)):
        raise bad_field(field, "json_schema.name must be 1 to 64 letters, digits, '_' or '-'")
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise bad_field(field, "json_schema.description must be a string")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise bad_field(field, "json_schema.strict must be a boolean")
    schema = spec.get("schema")
    if schema is None:
        schema = {"type": "object"}
    elif schema is True:
        schema = {}
    elif not isinstance(schema, dict):
        raise bad_field(field, "json_schema.schema must be a JSON schema object (or true)")
    return Constraint("json", _capped_schema(field, schema))


def _structured_outputs(value: object) -> Constraint:
    field = "structured_outputs"
    if not isinstance(value, dict):
        raise bad_field(field, "must be an object")
    present = {k: v for k, v in value.items() if v is not None}
    for key, member in present.items():
        if key == "backend":
            if not isinstance(member, str):
                raise bad_field(f"{field}.backend", "must be a string")
        elif key in _SO_FLAGS and member is False:
            continue
        elif key not in _SO_KINDS:
            raise bad_field(f"{field}.{key}", "is not supported")
    kinds = [k for k in _SO_KINDS if k in present]
    if len(kinds) != 1:
        raise bad_field(field, f"must hold exactly one of {', '.join(_SO_KINDS)}")
    kind = kinds[0]
    if kind == "json_object":
        if present[kind] is not True:
            raise bad_field(f"{field}.json_object", "must be true")
        return Constraint("json", {"type": "object"})
    return _value(f"{field}.{kind}", kind, present[kind])


def _value(field: str, kind: str, value: object) -> Constraint:
    """One constraint value: json (schema dict or JSON string of one), regex, grammar, choice."""
    if kind == "json":
        if isinstance(value, str):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise bad_field(field, "is not valid JSON") from None
        if not isinstance(value, dict):
            raise bad_field(field, "must be a JSON schema object")
        return Constraint("json", _capped_schema(field, value))
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise bad_field(field, "must be a non-empty list of non-empty strings")
        if len(value) > MAX_CHOICES:
            raise bad_field(field, f"at most {MAX_CHOICES} choices are allowed")
        if sum(len(c.encode("utf-8", "surrogatepass")) for c in value) > MAX_SPEC_BYTES:
            raise bad_field(field, f"the choices exceed {MAX_SPEC_BYTES} bytes")
        return Constraint("choice", tuple(value))
    if not isinstance(value, str) or not value:
        raise bad_field(field, "must be a non-empty string")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
        raise bad_field(field, f"exceeds {MAX_SPEC_BYTES} bytes")
    return Constraint(kind, value)


def _capped_schema(field: str, schema: dict) -> dict:
    if schema_size(schema) > MAX_SPEC_BYTES:
        raise bad_field(field, f"the schema exceeds {MAX_SPEC_BYTES} bytes of JSON")
    return schema


def schema_size(schema: object) -> int:
    """Bytes of the schema's JSON; too deep to encode counts as too large."""
    try:
        return len(orjson.dumps(schema))
    except orjson.JSONEncodeError:
        return MAX_SPEC_BYTES + 1
