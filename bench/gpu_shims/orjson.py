"""A stand-in for orjson over the standard json module, for machines without it: bench/gpu.sh puts this folder
on PYTHONPATH only when `import orjson` fails, and its summary says so. What protocol/ calls: dumps (compact
UTF-8 bytes), loads (bytes or str) and the two error types."""
from __future__ import annotations

import json

JSONDecodeError = json.JSONDecodeError
JSONEncodeError = TypeError


def dumps(obj, default=None, option=None) -> bytes:
    return json.dumps(obj, default=default, ensure_ascii=False, separators=(",", ":")).encode()


def loads(data):
    return json.loads(data)
