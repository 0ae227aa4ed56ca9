"""ONE streaming loop for SSE and NUL-delimited streams; the renderer decides the framing.

The handler first waits for the engine's first event, so an admission error (prompt too long, overload)
is still an HTTP error status. After that, errors travel in the stream's own error form. If the client
goes away, leaving the event iterator aborts the generation (AsyncEngine.generate's finally).
"""
from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from protocol.errors import ProtocolError
from protocol.types import Event, Failed

_GONE = (ConnectionResetError, ConnectionError)


async def first_event(events: AsyncIterator[Event]) -> Event | None:
    """The first event; a Failed first event is raised as its ProtocolError (an HTTP error)."""
    try:
        event = await anext(events)
    except StopAsyncIteration:
        return None
    if isinstance(event, Failed):
        await events.aclose()
        raise event.error
    return event


async def write_stream(request: web.Request, events: AsyncIterator[Event], renderer,
                       content_type: str) -> web.StreamResponse:
    first = await first_event(events)
    response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    try:
        if first is not None:
            await _write(response, renderer.on_event(first))
        async for event in events:
            await _write(response, renderer.on_event(event))
        await _write(response, renderer.on_end())
    except ProtocolError as err:
        await _write(response, renderer.on_error(err))
    except _GONE:
        return response            # the client left: aclose() below aborts the generation
    finally:
        await events.aclose()
    try:
        await response.write_eof()
    except _GONE:
        pass
    return response


async def collect(events: AsyncIterator[Event], collector) -> dict:
    """Non-stream: feed every event to the collector (Failed raises its ProtocolError)."""
    try:
        async for event in events:
            collector.feed(event)
    finally:
        await events.aclose()
    return collector.body()


async def _write(response: web.StreamResponse, chunks: list[bytes]) -> None:
    if chunks:
        await response.write(b"".join(chunks))
