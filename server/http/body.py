"""Reading request bodies within limits: size (413), time (408), JSON only on /v1 (415), strict JSON (400)."""
from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from protocol.errors import ProtocolError
from server.http import keys

MEDIA_TYPE_MESSAGE = "Unsupported Media Type: Only 'application/json' is allowed"


async def read_bytes(request: web.Request) -> bytes:
    state = request.app[keys.STATE]
    try:
        async with asyncio.timeout(state.options.body_timeout):
            return await request.read()
    except TimeoutError:
        raise ProtocolError(f"the request body did not arrive within {state.options.body_timeout:g} s",
                            status=408) from None
    except web.HTTPRequestEntityTooLarge:
        raise ProtocolError(f"request body is larger than {state.max_body} bytes",
                            status=413) from None


def parse_json(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        reason = "the body is not valid UTF-8" if "utf-8" in str(exc).lower() else "the body is not valid JSON"
        raise ProtocolError(reason, status=400) from None


async def read_openai_json(request: web.Request) -> object:
    if request.content_type != "application/json":
        raise ProtocolError(MEDIA_TYPE_MESSAGE, status=415)
    return parse_json(await read_bytes(request))
