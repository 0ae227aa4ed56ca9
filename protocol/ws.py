"""WebSocket sessions on `GET /` and `/ws` (PROTOCOLS.md, "WebSocket sessions").

Each client message is a JSON object (text or binary frame) with the EAS structured-request
fields. The session keeps the system prompt and history across rounds. Server frames are raw
text: the answer's incremental text (or the whole answer), then EOS; an error is one
render_error() frame, then EOS.

Decisions:
- A message with no prompt (absent, null or "") but with system_prompt and/or history only
  updates the session (SetSystemPrompt); it is answered by EOS alone. A message with none of
  the three is a 400 "prompt is required".
- {"action": "cancel"} (the WebUI's Stop button) aborts the round in progress.
- A message is validated whole before it touches the session: a bad message changes nothing.
- response_format (as on POST /) constrains that message's answer only; it is not kept in the
  session, and a message that only updates the session ignores it.
- Content frames never equal EOS: render_text() splits a text that is exactly "<EOS>" into the
  two frames "<EO" and "S>" (a client that concatenates frames gets the model's text back).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from protocol.eas import build_request, parse_eas_fields
from protocol.errors import ProtocolError, bad_field
from protocol.types import GenerateRequest

EOS = "<EOS>"


@dataclass(slots=True)
class SessionState:
    system_prompt: str = ""
    history: list[list[str]] = field(default_factory=list)

    def commit(self, prompt: str, answer: str) -> None:
        """Record a finished round (the next rounds see it as history)."""
        self.history.append([prompt, answer])


@dataclass(slots=True)
class SetSystemPrompt:
    """The session was updated (system prompt and/or history); answer with EOS alone."""


@dataclass(slots=True)
class Cancel:
    """Abort the round in progress (if any); no answer frames beyond that round's EOS."""


@dataclass(slots=True)
class WsGenerate:
    request: GenerateRequest
    stream: bool
    prompt: str
    langchain: bool = False


WsAction = SetSystemPrompt | Cancel | WsGenerate


def parse_ws_message(data: str | bytes, session: SessionState, request_id: str) -> WsAction:
    """Parse one client message and apply it to `session` (only if it is valid)."""
    obj = _decode(data)
    if "action" in obj:
        if obj["action"] != "cancel":
            raise bad_field("action", 'the only action is "cancel"')
        return Cancel()
    fields = parse_eas_fields(obj)
    if not fields.prompt and fields.system_prompt is None and fields.history is None:
        raise bad_field("prompt", "prompt is required")
    if fields.system_prompt is not None:
        session.system_prompt = fields.system_prompt
    if fields.history is not None:
        session.history = fields.history
    if not fields.prompt:
        return SetSystemPrompt()
    request = build_request(request_id, fields.params, session.system_prompt, session.history, fields.prompt,
                            fields.constraint)
    return WsGenerate(request, fields.stream, fields.prompt, fields.langchain)


def render_error(err: ProtocolError) -> str:
    return orjson.dumps(err.to_dict()).decode()


def render_text(text: str) -> list[str]:
    """Content frames for `text`: none for "", two for a text that is exactly EOS."""
    if not text:
        return []
    if text == EOS:
        return [EOS[:3], EOS[3:]]
    return [text]


def _decode(data: str | bytes) -> dict:
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("the message is not valid UTF-8") from None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError("the message is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("the message must be a JSON object")
    return obj
