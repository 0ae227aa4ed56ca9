"""EAS "Transformers standard" route `POST /`: STRING and structured requests, NUL-framed stream.

Decisions (PROTOCOLS.md leaves them open):
- A body that parses as a JSON object is a structured request, whatever its Content-Type.
  Otherwise it is a STRING request: a bare JSON string is the prompt; text that is not JSON is the
  prompt with surrounding whitespace stripped (curl files end with a newline). A JSON array,
  number, boolean or null is a 400; so is a body that looks like JSON (Content-Type JSON, or text
  starting with "{") but does not parse.
- STRING requests are answered non-streamed, {"response", "history"} (the seed shows its curl
  STRING example under "Non-streaming mode"); structured ones follow use_stream_chat (default true).
- history: a list of [question, answer] pairs of strings; empty pairs are skipped (the seed
  documents the default as "[()]"); at most MAX_HISTORY_PAIRS pairs.
- response_format (same shapes as OpenAI's; protocol.constraints) constrains the answer; the
  answer (JSON text) is the response and the history entry, unaltered. Other structured-output
  spellings are OpenAI-route fields and are ignored here like any unknown field.
"""
from __future__ import annotations

from dataclasses import dataclass

import orjson

from protocol.constraints import parse_constraint
from protocol.errors import ProtocolError, bad_field
from protocol.nul import encode_frame
from protocol.sampling import as_bool, parse_sampling
from protocol.types import Constraint, Event, Failed, Finished, GenerateRequest, SamplingParams, TokenDelta

EAS_DEFAULTS = {"temperature": 0.95, "top_k": 30, "top_p": 0.8, "max_new_tokens": 2048}
MAX_HISTORY_PAIRS = 1000


@dataclass(slots=True)
class EasRequest:
    request: GenerateRequest
    stream: bool
    prompt: str
    history: list[list[str]]
    langchain: bool = False


@dataclass(slots=True)
class EasFields:
    """The structured-request fields shared by POST / and WebSocket messages (None: absent)."""
    prompt: str | None
    system_prompt: str | None
    history: list[list[str]] | None
    stream: bool
    langchain: bool
    params: SamplingParams
    constraint: Constraint | None = None


def parse_eas_request(body: bytes, content_type: str | None, request_id: str) -> EasRequest:
    value = _decode_body(body, content_type)
    if isinstance(value, str):
        if not value:
            raise bad_field("prompt", "must not be empty")
        params = parse_sampling({}, defaults=EAS_DEFAULTS)
        return EasRequest(build_request(request_id, params, "", [], value), False, value, [])
    fields = parse_eas_fields(value)
    if not fields.prompt:
        raise bad_field("prompt", "is required and must not be empty")
    history = fields.history or []
    request = build_request(request_id, fields.params, fields.system_prompt or "", history, fields.prompt,
                            fields.constraint)
    return EasRequest(request, fields.stream, fields.prompt, history, fields.langchain)


def parse_eas_fields(obj: dict) -> EasFields:
    prompt = _optional_str(obj, "prompt")
    system_prompt = _optional_str(obj, "system_prompt")
    history = parse_history(obj["history"]) if obj.get("history") is not None else None
    stream = _flag(obj, "use_stream_chat", True)
    _flag(obj, "use_cache", True)                       # accepted; the prefix cache is always on
    langchain = _flag(obj, "langchain", False)
    params = parse_sampling(obj, defaults=EAS_DEFAULTS)
    if params.n != 1:
        raise bad_field("n", "must be 1 on this route")
    constraint = parse_constraint({"response_format": obj.get("response_format")})
    return EasFields(prompt, system_prompt, history, stream, langchain, params, constraint)


def parse_history(value: object) -> list[list[str]]:
    if not isinstance(value, list):
        raise bad_field("history", "must be a list of [question, answer] pairs")
    if len(value) > MAX_HISTORY_PAIRS:
        raise bad_field("history", f"at most {MAX_HISTORY_PAIRS} pairs are allowed")
    pairs = []
    for pair in value:
        if pair == []:
            continue
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(s, str) for s in pair):
            raise bad_field("history", "each item must be a [question, answer] pair of strings")
        pairs.append([pair[0], pair[1]])
    return pairs


def build_request(request_id: str, params: SamplingParams, system_prompt: str,
                  history: list[list[str]], prompt: str, constraint: Constraint | None = None) -> GenerateRequest:
    """messages = [system?] + history turns + the user prompt; max_tokens is capped to fit."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": prompt})
    return GenerateRequest(request_id=request_id, params=params, messages=messages, cap_max_tokens=True,
                           constraint=constraint)


def _decode_body(body: bytes, content_type: str | None) -> dict | str:
    try:
        text = bytes(body).decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise ProtocolError("the request body is not valid UTF-8") from None
    mime = (content_type or "").split(";")[0].strip().lower()
    looks_json = mime == "application/json" or mime.endswith("+json") or text.lstrip().startswith("{")
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        if looks_json:
            raise ProtocolError("the request body is not valid JSON") from None
        return text.strip()
    if not isinstance(value, (dict, str)):
        raise ProtocolError("a JSON body must be an object (structured request) or a string (the prompt)")
    return value


def _optional_str(obj: dict, name: str) -> str | None:
    value = obj.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_field(name, "must be a string")
    return value


def _flag(obj: dict, name: str, default: bool) -> bool:
    value = obj.get(name)
    if value is None:
        return default
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return as_bool(name, value)


class EasStreamRenderer:
    """NUL frames, each the cumulative {"response": answer_so_far, "history": [...previous...,
    [prompt, answer_so_far]]}. Same driving interface as the SSE renderers (openai_stream):
    empty deltas give no frame; on_end gives a frame only if none was sent (an empty answer still
    gets one); an error is one {"error": {...}} frame and nothing after it."""

    def __init__(self, prompt: str, history: list, sources: list[dict] | None = None) -> None:
        self._answer = ""
        self._num_frames = 0
        self.is_done = False
        # The frame is {"response": A, "history": [...history, [prompt, A]]}: encode the constant
        # part once, so a frame costs two encodings of the answer, not of the whole history.
        prefix = orjson.dumps(history)[:-1] + (b"," if history else b"")
        self._middle = b',"history":' + prefix + b"[" + orjson.dumps(prompt) + b","
        # knowledge-base answers (langchain): every frame also carries "sources" (an extra key)
        self._end = b"]]" + (b',"sources":' + orjson.dumps(sources) if sources is not None else b"") + b"}\0"

    def on_event(self, ev: Event) -> list[bytes]:
        if self.is_done:
            return []
        match ev:
            case TokenDelta():
                if not ev.text:
                    return []
                self._answer += ev.text
                return [self._frame()]
            case Finished():
                return []
            case Failed():
                return self.on_error(ev.error)
        raise TypeError(f"not an engine event: {type(ev).__name__}")

    def on_end(self) -> list[bytes]:
        if self.is_done:
            return []
        self.is_done = True
        return [self._frame()] if self._num_frames == 0 else []

    def on_error(self, err: ProtocolError) -> list[bytes]:
        if self.is_done:
            return []
        self.is_done = True
        return [encode_frame(err.to_dict())]

    def _frame(self) -> bytes:
        self._num_frames += 1
        answer = orjson.dumps(self._answer)
        return b'{"response":' + answer + self._middle + answer + self._end


class EasCollector:
    """Non-stream body {"response", "history"}; feed() raises a Failed event's ProtocolError."""

    def __init__(self, prompt: str, history: list, sources: list[dict] | None = None) -> None:
        self._prompt = prompt
        self._history = history
        self._parts: list[str] = []
        self._sources = sources

    def feed(self, ev: Event) -> None:
        match ev:
            case TokenDelta():
                self._parts.append(ev.text)
            case Failed():
                raise ev.error

    def body(self) -> dict:
        answer = "".join(self._parts)
        body = {"response": answer, "history": [*self._history, [self._prompt, answer]]}
        if self._sources is not None:
            body["sources"] = self._sources     # knowledge-base answers (langchain): what was retrieved
        return body
