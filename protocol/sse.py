"""Server-sent events framing (WHATWG HTML, "9.2 Server-sent events", event stream format).

encode_event() frames one payload; SseDecoder is the push parser used by tests and bench clients.
"""
from __future__ import annotations

import re

import orjson

DONE: bytes = b"data: [DONE]\n\n"

_LINE_END = re.compile(rb"\r\n|\r|\n")   # the spec's end-of-line: CRLF, lone CR or lone LF
_BOM = b"\xef\xbb\xbf"


def encode_event(data: dict | str | bytes) -> bytes:
    """One event: a `data:` line per line of the payload, then a blank line.

    A dict is serialised with orjson (one line: JSON escapes every CR and LF). A str or bytes
    payload holding line breaks becomes several `data:` lines, which a decoder joins with LF.
    """
    if isinstance(data, dict):
        return b"data: " + orjson.dumps(data) + b"\n\n"
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    lines = _LINE_END.split(payload)
    return b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


class SseDecoder:
    """Push parser: feed() bytes split anywhere (inside a line ending or a UTF-8 character) and
    get back the data of each complete event, in order.

    Implements the WHATWG rules that matter for data: lines end at CRLF, CR or LF; a line starting
    with ":" is a comment; "field: value" drops one space after the colon; only `data` is kept
    (event, id, retry and unknown fields are ignored); a blank line dispatches the event, whose
    data lines are joined by LF. An event with no data line is not dispatched.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data_lines: list[str] | None = None
        self._skip_lf = False       # the last chunk ended with CR: a LF opening the next is its pair
        self._at_start = True

    def feed(self, chunk: bytes) -> list[str]:
        buf = self._buf + chunk
        if self._skip_lf and buf:
            if buf.startswith(b"\n"):
                buf = buf[1:]
            self._skip_lf = False
        if self._at_start:
            if _BOM.startswith(buf):        # too short to tell yet (or empty)
                self._buf = buf
                return []
            self._at_start = False
            buf = buf.removeprefix(_BOM)
        events: list[str] = []
        pos = 0
        for match in _LINE_END.finditer(buf):
            if match.group() == b"\r" and match.end() == len(buf):
                self._skip_lf = True
            self._line(buf[pos:match.start()].decode("utf-8", "replace"), events)
            pos = match.end()
        self._buf = buf[pos:]
        return events

    def _line(self, line: str, events: list[str]) -> None:
        if not line:
            if self._data_lines is not None:
                events.append("\n".join(self._data_lines))
            self._data_lines = None
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if name != "data":
            return
        if value.startswith(" "):
            value = value[1:]
        if self._data_lines is None:
            self._data_lines = []
        self._data_lines.append(value)
