"""The server's lifetime: listen, serve until SIGTERM/SIGINT (drain) or an engine failure (exit 1).

Drain: admission stops at once (503 + Retry-After, /health 503) while the listener stays open; in-flight
requests get drain_timeout to finish; WebSockets close with 1001 after their current round. The deadline
or a second signal aborts what is left: each stream ends with finish_reason "abort" (its terminal event).
"""
from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from server.http import keys
from server.http.limits import GuardedSite

log = logging.getLogger("berth")

ABORT_GRACE = 3.0        # seconds aborted streams get to write their terminal event
DEATH_GRACE = 1.0        # seconds in-flight requests get to receive the engine-failure error
POLL = 0.05


async def serve(app: web.Application, host: str, port: int) -> int:
    """Run until stopped; the process exit code (0 after a drain, 1 if the engine failed)."""
    state = app[keys.STATE]
    options = state.options
    runner = web.AppRunner(app, handler_cancellation=True, keepalive_timeout=options.keepalive_timeout,
                           access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    await GuardedSite(runner, host, port, options).start()
    signals: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    try:
        code = await _wait_for_stop(state, signals)
    finally:
        await runner.cleanup()
    return code


async def _wait_for_stop(state: keys.ServerState, signals: asyncio.Queue) -> int:
    died = asyncio.ensure_future(state.engine.died.wait())
    stop = asyncio.ensure_future(signals.get())
    await asyncio.wait({died, stop}, return_when=asyncio.FIRST_COMPLETED)
    if died.done():
        stop.cancel()
        log.error("the engine failed; exiting for the supervisor to restart berth")
        state.draining = True
        await asyncio.sleep(DEATH_GRACE)
        return 1
    died.cancel()
    await drain(state, signals)
    return 0


async def drain(state: keys.ServerState, signals: asyncio.Queue) -> bool:
    """Stop admission and wait for in-flight work; True if everything finished before the deadline."""
    loop = asyncio.get_running_loop()
    state.draining = True
    timeout = state.options.drain_timeout
    log.info("draining: %d requests, %d WebSocket sessions, up to %g s", state.engine.num_pending,
             len(state.sessions), timeout)
    for session in list(state.sessions):
        session.drain()
    deadline = loop.time() + timeout
    while not _idle(state) and signals.empty() and loop.time() < deadline:
        await asyncio.sleep(POLL)
    if _idle(state):
        log.info("drained")
        return True
    log.warning("drain %s: aborting %d requests", "interrupted" if not signals.empty() else "deadline reached",
                state.engine.num_pending)
    state.engine.abort_all()
    deadline = loop.time() + ABORT_GRACE
    while not _idle(state) and loop.time() < deadline:
        await asyncio.sleep(POLL)
    for session in list(state.sessions):
        await session.close(1001, b"server shutting down")
    return False


def _idle(state: keys.ServerState) -> bool:
    return state.engine.num_pending == 0 and not state.sessions
