"""NUL-delimited JSON framing of the EAS stream: each frame is one JSON object followed by b"\\0".

JSON escapes every control character (a NUL in a string becomes \\u0000), so a raw NUL byte can
only be a frame end, and the UTF-8 encoding of any other character never contains a 0x00 byte.
"""
from __future__ import annotations

import orjson


def encode_frame(obj: dict) -> bytes:
    return orjson.dumps(obj) + b"\0"


class NulDecoder:
    """Push parser: feed() bytes split anywhere (inside a frame or a UTF-8 character) and get
    back each complete frame as a dict. Empty frames are skipped (as the seed's
    `iter_lines(delimiter=b"\\0")` client does). A frame that is not a JSON object raises ValueError.
    """

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[dict]:
        if b"\0" not in chunk:
            self._buf += chunk
            return []
        frames = (self._buf + chunk).split(b"\0")
        self._buf = frames.pop()
        return [_decode(frame) for frame in frames if frame]

    @property
    def pending(self) -> bytes:
        """Bytes of an incomplete last frame (non-empty at the end of a stream means truncation)."""
        return self._buf


def _decode(frame: bytes) -> dict:
    obj = orjson.loads(frame)
    if not isinstance(obj, dict):
        raise ValueError(f"NUL frame is not a JSON object: {type(obj).__name__}")
    return obj
