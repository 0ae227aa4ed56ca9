"""OpenAI routes (and the BladeLLM flavour of /v1/completions): request parsing, model names.

Stream renderers and non-stream collectors live in openai_stream / openai_collect and are
re-exported here, so `protocol.openai` is the whole OpenAI surface.

Structured outputs (protocol.constraints) apply to both routes; tools (protocol.tools) to chat only.
request.constraint: the structured-output constraint, or Constraint("tools", spec) for tool_choice
required / named, or for auto when some tool is strict (both at once: a 400). request.tools: the
offered tools (None with tool_choice none).

Messages after parsing: {"role", "content": str} (developer -> system, text parts joined by "\n");
an assistant message may add "tool_calls": [{"id", "type": "function", "function": {"name",
"arguments": <JSON string>}}] (its content "" when null or absent); a tool message adds
"tool_call_id" and, when given, "name".
"""
from __future__ import annotations

from dataclasses import dataclass

from protocol.constraints import parse_constraint
from protocol.errors import ProtocolError, bad_field
from protocol.openai_collect import ChatCollector, CompletionCollector
from protocol.openai_stream import ChatStreamRenderer, CompletionStreamRenderer
from protocol.sampling import MAX_TOKEN_ID, as_bool, as_int, parse_sampling
from protocol.tools import parse_tools
from protocol.types import Constraint, GenerateRequest, ToolSpec

__all__ = ["ParsedRequest", "parse_chat_request", "parse_completion_request", "check_model", "render_models",
           "ChatStreamRenderer", "CompletionStreamRenderer", "ChatCollector", "CompletionCollector"]

MODEL_DIR_ALIASES = ("/model_dir/", "/model_dir")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_MODEL_NAME_ECHO = 256


@dataclass(slots=True)
class ParsedRequest:
    request: GenerateRequest
    stream: bool
    model: str | None          # as requested; check_model() resolves it
    include_usage: bool
    flavour: str               # "openai" | "bladellm"
    tools: ToolSpec | None = None   # chat: calls are parsed out of the text (None: no tools / tool_choice none)
    knowledge_top_k: int | None = None   # chat extension "knowledge": answer from the knowledge base's top-k chunks


def parse_chat_request(body: object, request_id: str) -> ParsedRequest:
    body = _object(body)
    messages = _messages(body.get("messages"))
    params = parse_sampling(body)
    constraint = parse_constraint(body)
    spec = parse_tools(body, params.n)
    if spec is not None and (spec.choice != "auto" or any(t.strict for t in spec.tools)):
        if constraint is not None:
            field = "tool_choice" if spec.choice != "auto" else "tools"
            raise bad_field(field, "cannot be combined with a structured-output constraint "
                                   "(response_format, structured_outputs or guided_*)")
        constraint = Constraint("tools", spec)
    request = GenerateRequest(request_id=request_id, params=params, messages=messages,
                              add_generation_prompt=as_bool("add_generation_prompt",
                                                            body.get("add_generation_prompt", True)),
                              constraint=constraint, tools=spec.tools if spec is not None else None)
    stream = as_bool("stream", _or(body.get("stream"), False))
    return ParsedRequest(request, stream, _model(body), _include_usage(body), "openai", spec, _knowledge(body))


def parse_completion_request(body: object, request_id: str) -> ParsedRequest:
    """OpenAI completions; BladeLLM's flavour has no "model" or sends `stream` as a string."""
    body = _object(body)
    _reject_unsupported(body)
    text, token_ids = _prompt(body.get("prompt"))
    request = GenerateRequest(request_id=request_id, params=parse_sampling(body, completion=True),
                              prompt=text, prompt_token_ids=token_ids, constraint=parse_constraint(body))
    raw_stream = body.get("stream")
    flavour = "bladellm" if "model" not in body or isinstance(raw_stream, str) else "openai"
    return ParsedRequest(request, _stream_flag(raw_stream), _model(body), _include_usage(body), flavour)


def check_model(requested: str | None, served_names: list[str]) -> str:
    """The model name to echo in responses: the served one when none was asked, the requested
    one when it is served or is the EAS alias /model_dir/. Otherwise 404."""
    if requested is None:
        return served_names[0]
    if requested in served_names or requested in MODEL_DIR_ALIASES:
        return requested
    name = requested[:MAX_MODEL_NAME_ECHO]
    raise ProtocolError(f'The model "{name}" does not exist.', status=404, param="model", type="not_found_error")


def render_models(served_names: list[str], max_model_len: int, created: int) -> dict:
    """The GET /v1/models body."""
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "berth",
                      "max_model_len": max_model_len} for name in served_names]}


def _object(body: object) -> dict:
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object")
    return body


def _or(value: object, default: object) -> object:
    return default if value is None else value


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_field("model", "must be a string")
    return model


DEFAULT_KNOWLEDGE_TOP_K = 3
MAX_KNOWLEDGE_TOP_K = 20


def _knowledge(body: dict) -> int | None:
    """berth's extension `"knowledge": true | {"top_k": K}`: the number of chunks to retrieve, or None."""
    value = body.get("knowledge")
    if value is None or value is False:
        return None
    if value is True:
        return DEFAULT_KNOWLEDGE_TOP_K
    if not isinstance(value, dict) or set(value) - {"top_k"}:
        raise bad_field("knowledge", f'must be true or {{"top_k": <1-{MAX_KNOWLEDGE_TOP_K}>}}')
    top_k = as_int("knowledge.top_k", _or(value.get("top_k"), DEFAULT_KNOWLEDGE_TOP_K))
    if not 1 <= top_k <= MAX_KNOWLEDGE_TOP_K:
        raise bad_field("knowledge", f"top_k must be between 1 and {MAX_KNOWLEDGE_TOP_K}")
    return top_k


def _include_usage(body: dict) -> bool:
    options = _or(body.get("stream_options"), {})
    if not isinstance(options, dict):
        raise bad_field("stream_options", "must be an object")
    return as_bool("stream_options.include_usage", _or(options.get("include_usage"), False))


def _stream_flag(value: object) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return as_bool("stream", _or(value, False))


def _messages(value: object) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise bad_field("messages", "must be a non-empty list of messages")
    return [_message(m) for m in value]


def _message(message: object) -> dict:
    if not isinstance(message, dict):
        raise bad_field("messages", "each message must be an object")
    role = message.get("role")
    if role not in ROLES:
        raise bad_field("messages", f"unknown role; expected one of {', '.join(ROLES)}")
    content = message.get("content")
    tool_calls = _tool_calls(message.get("tool_calls")) if role == "assistant" else None
    if content is None and role == "assistant":
        content = ""
    parsed = {"role": ROLES[role], "content": _content(content)}
    if tool_calls:
        parsed["tool_calls"] = tool_calls
    if role == "tool":
        if not isinstance(message.get("tool_call_id"), str):
            raise bad_field("messages", "a tool message needs a tool_call_id string")
        parsed["tool_call_id"] = message["tool_call_id"]
        if message.get("name") is not None:
            if not isinstance(message["name"], str):
                raise bad_field("messages", "a tool message's name must be a string")
            parsed["name"] = message["name"]
    return parsed


def _tool_calls(value: object) -> list[dict] | None:
    """An assistant message's tool_calls, validated and copied (None or [] -> None)."""
    if value is None:
        return None
    shape = ('tool_calls must be a list of {"id": <string>, "type": "function", '
             '"function": {"name": <string>, "arguments": <JSON string>}}')
    if not isinstance(value, list):
        raise bad_field("messages", shape)
    calls = []
    for call in value:
        fn = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(fn, dict) or not isinstance(call.get("id"), str) or call.get("type") != "function"
                or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str)):
            raise bad_field("messages", shape)
        calls.append({"id": call["id"], "type": "function",
                      "function": {"name": fn["name"], "arguments": fn["arguments"]}})
    return calls or None


def _content(content: object) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_field("messages", "content must be a string or a list of text parts")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_field("messages", 'content parts must be {"type": "text", "text": <string>}')
        texts.append(part["text"])
    return "\n".join(texts)


def _prompt(value: object) -> tuple[str | None, list[int] | None]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    elif isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        raise bad_field("prompt", "batched prompts are not supported; send one prompt per request")
    if isinstance(value, str):
        if not value:
            raise bad_field("prompt", "must not be empty")
        return value, None
    if not isinstance(value, list) or not value:
        raise bad_field("prompt", "must be a non-empty string or list of token ids")
    token_ids = [as_int("prompt", t) for t in value]
    if any(not 0 <= t <= MAX_TOKEN_ID for t in token_ids):
        raise bad_field("prompt", "token ids must be non-negative integers")
    return None, token_ids


def _reject_unsupported(body: dict) -> None:
    if body.get("tools"):
        raise bad_field("tools", "tool calling is only supported on /v1/chat/completions")
    if body.get("echo"):
        raise bad_field("echo", "is not supported")
    if body.get("suffix"):
        raise bad_field("suffix", "is not supported")
    if body.get("prompt_logprobs") is not None:
        raise bad_field("prompt_logprobs", "is not supported")
    best_of = body.get("best_of")
    if best_of is not None and as_int("best_of", best_of) not in (1, body.get("n") or 1):
        raise bad_field("best_of", "is not supported (it must be 1 or equal to n)")
