"""Error middleware: every failure leaves as a JSON error object, never a traceback or a repr."""
from __future__ import annotations

import logging

import orjson
from aiohttp import web

from protocol.errors import ProtocolError

log = logging.getLogger("berth.http")

_HTTP_MESSAGES = {
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request body too large",
}


def error_response(err: ProtocolError) -> web.Response:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return web.Response(body=orjson.dumps(err.to_dict()), status=err.status,
                        content_type="application/json", headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ProtocolError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.status == 101:
            raise
        message = _HTTP_MESSAGES.get(exc.status, exc.reason)
        resp = error_response(ProtocolError(message, status=exc.status))
        for key in ("Allow", "Retry-After"):
            if key in exc.headers:
                resp.headers[key] = exc.headers[key]
        return resp
    except Exception:  # noqa: BLE001 - a true bug: log it, answer a generic 500
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ProtocolError("internal server error", status=500))
