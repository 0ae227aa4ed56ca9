"""Sampling fields of a request body -> SamplingParams (PROTOCOLS.md, "Sampling fields").

Types are strict: a bool is not a number, numbers must be finite, integers must be integral
(2048.0 is accepted as 2048, as pydantic's lax mode does for vLLM; 1.5, "10" and true are not).
A field that is absent or null takes the route default, then the SamplingParams default.
Every error is a 400 ProtocolError whose param and message name the field.
"""
from __future__ import annotations

import math

from protocol.errors import ProtocolError, bad_field
from protocol.types import MAX_TOP_LOGPROBS, SamplingParams

MAX_TOKENS_ALIASES = ("max_tokens", "max_completion_tokens", "max_new_tokens")
MAX_STOP_TOKEN_IDS = 64
MAX_TOKEN_ID = 2**31 - 1
_INT_BOUND = 2**64          # wider than any count we accept; seed range is checked by validate()

_FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_INTS = ("top_k", "seed", "min_tokens", "n")


def parse_sampling(body: dict, *, defaults: dict | None = None, completion: bool = False) -> SamplingParams:
    """Read every sampling field of `body` (unknown fields are ignored).

    defaults: per-route defaults under the wire names (EAS: temperature 0.95, top_k 30, top_p 0.8,
    max_new_tokens 2048). completion: `logprobs` is the OpenAI completions integer k (return the
    sampled token's logprob and the k best), else the chat boolean.
    """
    fields = {**(defaults or {}), **{k: v for k, v in body.items() if v is not None}}
    params = SamplingParams()
    for name in _FLOATS:
        if name in fields:
            setattr(params, name, as_float(name, fields[name]))
    for name in _INTS:
        if name in fields:
            setattr(params, name, as_int(name, fields[name]))
    if params.top_k == -1:
        params.top_k = 0                      # -1 and 0 both mean "off"; keep one spelling
    params.max_tokens = _max_tokens(body, defaults or {})
    params.stop = _stop(fields.get("stop"))
    params.stop_token_ids = _stop_token_ids(fields.get("stop_token_ids"))
    params.ignore_eos = as_bool("ignore_eos", fields.get("ignore_eos", False))
    if not as_bool("do_sample", fields.get("do_sample", True)):
        params.temperature = 0.0
    _logprobs(params, fields, completion)
    return params.validate()


def as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_field(name, f"must be a number, got {_kind(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise bad_field(name, "must be a finite number")
    return number


def as_int(name: str, value: object) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_field(name, f"must be an integer, got {_kind(value)}")
    if not -_INT_BOUND < value < _INT_BOUND:
        raise bad_field(name, "is out of range")
    return value


def as_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise bad_field(name, f"must be a boolean, got {_kind(value)}")
    return value


def _kind(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "a non-finite number"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "an object", type(None): "null"}
    return names.get(type(value), "an unsupported value")


def _max_tokens(body: dict, defaults: dict) -> int | None:
    present = [(name, as_int(name, body[name])) for name in MAX_TOKENS_ALIASES if body.get(name) is not None]
    for name, value in present[1:]:
        if value != present[0][1]:
            raise bad_field(name, f"conflicts with {present[0][0]} ({value} != {present[0][1]})")
    if not present:
        present = [(name, as_int(name, defaults[name])) for name in MAX_TOKENS_ALIASES if name in defaults]
    if not present:
        return None
    name, value = present[0]
    if value < 1:
        raise bad_field(name, "must be at least 1")
    return value


def _stop(value: object) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad_field("stop", "must be a string or a list of strings")
    return tuple(value)


def _stop_token_ids(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise bad_field("stop_token_ids", "must be a list of token ids")
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise bad_field("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} are allowed")
    ids = tuple(as_int("stop_token_ids", i) for i in value)
    if any(not 0 <= i <= MAX_TOKEN_ID for i in ids):
        raise bad_field("stop_token_ids", "token ids must be non-negative")
    return ids


def _logprobs(params: SamplingParams, fields: dict, completion: bool) -> None:
    value = fields.get("logprobs")
    if completion:
        if value is not None:
            k = as_int("logprobs", value)
            if not 0 <= k <= MAX_TOP_LOGPROBS:
                raise bad_field("logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}")
            params.logprobs, params.top_logprobs = True, k
        return
    params.logprobs = as_bool("logprobs", value if value is not None else False)
    if "top_logprobs" in fields:
        params.top_logprobs = as_int("top_logprobs", fields["top_logprobs"])
        if params.top_logprobs and not params.logprobs:
            raise ProtocolError("top_logprobs: requires logprobs to be true", param="top_logprobs")
