"""ONE streaming loop for SSE and NUL-delimited streams; the renderer decides the framing.

The handler first waits for the engine's first event, so an admission error (prompt too long, overload)
is still an HTTP error status. After that, errors travel in the stream's own error form. If the client
goes away, leaving the event iterator aborts the generation (AsyncEngine.generate's finally).

Slow readers: while a write waits for the socket to drain, the engine's deltas coalesce in the request's
channel (AsyncEngine), so memory stays bounded; a write that makes no progress for stall_timeout
aborts the request and drops the connection.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from protocol.errors import ProtocolError
from protocol.types import Event, Failed
from server.http import keys
from server.http.trace import TRACE, Outcome, RequestTrace

_GONE = (ConnectionResetError, ConnectionError)


class StalledReader(Exception):
    """A write made no progress within the stall timeout."""


def trace_of(request: web.Request) -> RequestTrace:
    trace = request.get(TRACE)
    return trace if trace is not None else RequestTrace(None, "unknown")


async def first_event(events: AsyncIterator[Event], trace: RequestTrace) -> Event | None:
    """The first event; a Failed first event is raised as its ProtocolError (an HTTP error)."""
    try:
        event = await anext(events)
    except StopAsyncIteration:
        return None
    if isinstance(event, Failed):
        await events.aclose()
        raise event.error
    trace.on_event(event)
    return event


async def write_stream(request: web.Request, events: AsyncIterator[Event], renderer,
                       content_type: str) -> web.StreamResponse:
    trace = trace_of(request)
    stall = request.app[keys.STATE].options.stall_timeout
    first = await first_event(events, trace)
    response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    try:
        await response.prepare(request)           # inside: a client gone before the headers still aborts
        if first is not None:
            await _write(response, renderer.on_event(first), stall)
        async for event in events:
            trace.on_event(event)
            await _write(response, renderer.on_event(event), stall)
        await _write(response, renderer.on_end(), stall)
    except ProtocolError as err:
        trace.failed = True
        with contextlib.suppress(*_GONE, StalledReader):
            await _write(response, renderer.on_error(err), stall)
    except _GONE:
        trace.aborted = True
        return response            # the client left: aclose() below aborts the generation
    except StalledReader:
        trace.outcome = Outcome.TIMEOUT
        if request.transport is not None:
            request.transport.abort()
        return response
    finally:
        await events.aclose()
    try:
        await response.write_eof()
    except _GONE:
        pass
    return response


async def collect(events: AsyncIterator[Event], collector, trace: RequestTrace | None = None) -> dict:
    """Non-stream: feed every event to the collector (Failed raises its ProtocolError)."""
    try:
        async for event in events:
            if trace is not None:
                trace.on_event(event)
            collector.feed(event)
    finally:
        await events.aclose()
    return collector.body()


async def _write(response: web.StreamResponse, chunks: list[bytes], stall: float) -> None:
    if chunks:
        try:
            async with asyncio.timeout(stall):
                await response.write(b"".join(chunks))
        except TimeoutError:
            raise StalledReader from None
