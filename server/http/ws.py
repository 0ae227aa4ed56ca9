"""WebSocket sessions (PROTOCOLS.md): multi-round dialogues with server-side history, `<EOS>` per answer.

One receive loop per socket (it keeps heartbeats alive and sees a Cancel at once) feeds a queue; one
worker answers the queued messages strictly in order and is the only task that sends, so an error frame
never lands inside another round's answer. Closing the socket cancels the worker, which aborts the round
in progress (AsyncEngine.generate's finally). Every message gets exactly one terminal `<EOS>`: messages
over the per-connection cap get an error frame + `<EOS>` in their turn; a flood beyond twice the cap
closes the connection (1008). On drain the current round finishes, queued ones are refused, then 1001.
A send that makes no progress for stall_timeout aborts the round and closes with 1011. A session that
has received no frame (pings included) for ws_idle_timeout and has no round running or queued is closed
with 1001; ws_heartbeat pings the client and closes the socket (1006) if no pong comes back in time.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

from aiohttp import WSCloseCode, WSMsgType, web

from protocol.errors import ProtocolError
from protocol.types import Failed, TokenDelta
from protocol.ws import EOS, Cancel, SessionState, WsGenerate, parse_ws_message, render_error, render_text
from server.http import keys, rag
from server.http.streaming import StalledReader
from server.http.trace import Outcome, RequestTrace

MAX_QUEUED_MESSAGES = 8
MAX_MESSAGE_BYTES = 1 << 20
_GONE = (ConnectionResetError, ConnectionError)
_DRAIN = object()


class _Session:
    def __init__(self, ws: web.WebSocketResponse, state: keys.ServerState, transport: asyncio.Transport | None):
        self.ws = ws
        self.server = state
        self.engine = state.engine
        self.state = SessionState()
        self.queue: asyncio.Queue = asyncio.Queue()       # (data, accepted) items, or _DRAIN
        self.num_accepted = 0
        self.current_rid: str | None = None
        self.draining = False
        self.worker_closing = False                         # the worker is sending the close frame
        self.transport = transport                          # dropped when a stalled reader cannot get 1011
        self.in_round = False                               # the worker is handling a queued message
        self.last_round_end = time.monotonic()

    async def send(self, text: str) -> None:
        try:
            async with asyncio.timeout(self.server.options.stall_timeout):
                await self.ws.send_str(text)
        except TimeoutError:
            raise StalledReader from None

    async def send_error(self, err: ProtocolError) -> None:
        await self.send(render_error(err))
        await self.send(EOS)

    async def run_rounds(self) -> None:
        try:
            await self._rounds()
            self.worker_closing = True
            await self.close(WSCloseCode.GOING_AWAY, b"server shutting down")
        except StalledReader:
            self.worker_closing = True
            try:
                await self.close(WSCloseCode.INTERNAL_ERROR, b"client too slow")
            finally:                            # a client that does not read never takes the close frame
                if self.transport is not None:
                    self.transport.abort()
        except _GONE:
            pass

    async def _rounds(self) -> None:
        while True:
            item = await self.queue.get()
            if item is _DRAIN:
                return
            data, accepted = item
            self.num_accepted -= accepted
            self.in_round = True
            try:
                if self.draining:
                    await self.send_error(ProtocolError("the server is shutting down", status=503, retry_after=1))
                elif not accepted:
                    await self.send_error(ProtocolError(
                        f"too many queued messages (at most {MAX_QUEUED_MESSAGES})", status=429, retry_after=1))
                else:
                    await self.round(data)
            finally:
                self.in_round = False
                self.last_round_end = time.monotonic()
            if self.draining and self.queue.empty():
                return

    async def round(self, data: str | bytes) -> None:
        rid = f"ws-{uuid.uuid4().hex}"
        try:
            action = parse_ws_message(data, self.state, rid)
        except ProtocolError as err:
            self.new_trace(rid).finish(err.status)
            await self.send_error(err)
            return
        if isinstance(action, WsGenerate):
            hits = None
            if action.langchain:
                try:
                    hits = await self.augment(action)
                except ProtocolError as err:
                    self.new_trace(rid).finish(err.status)
                    await self.send_error(err)
                    return
            await self.answer(action, hits)
        else:                       # SetSystemPrompt (a Cancel with nothing running lands here too)
            await self.send(EOS)

    def new_trace(self, rid: str) -> RequestTrace:
        return RequestTrace("ws", "ws", request_id=rid, metrics=self.server.metrics,
                            log_prompts=self.server.options.log_prompts)

    async def augment(self, action: WsGenerate) -> list:
        """langchain: true: the round answers from the knowledge base (the session keeps the plain turns)."""
        history = [tuple(pair) for pair in self.state.history]
        hits = await rag.retrieve(self.server, "langchain", action.prompt, history[-1][0] if history else None)
        rag.augment(self.server, action.request, action.prompt, hits, history, self.state.system_prompt)
        return hits

    async def answer(self, action: WsGenerate, hits: list | None = None) -> None:
        trace = self.new_trace(action.request.request_id)
        trace.submit(action.prompt)
        self.current_rid = action.request.request_id
        parts: list[str] = []
        status = 499
        try:
            status = await self._generate(action, trace, parts)
        except StalledReader:
            trace.outcome = Outcome.TIMEOUT
            raise
        finally:
            self.current_rid = None
            trace.finish(status)
        answer = "".join(parts)
        if status == 200:
            # a knowledge-base answer ends with a "Sources:" line: in the answer's one frame when not
            # streamed (a client that reads one frame sees it), as a last frame when streamed
            sources = rag.sources_text(hits) if hits is not None else ""
            if not action.stream:
                for frame in render_text(answer + sources):
                    await self.send(frame)
            elif sources:
                await self.send(sources)
            self.state.commit(action.prompt, answer)     # the session's history keeps the plain answer
        await self.send(EOS)

    async def _generate(self, action: WsGenerate, trace: RequestTrace, parts: list[str]) -> int:
        """Stream one round; the HTTP-like status of its outcome (200, or the error's)."""
        try:
            events = self.engine.generate(action.request)
            try:
                async for event in events:
                    trace.on_event(event)
                    if isinstance(event, TokenDelta):
                        parts.append(event.text)
                        if action.stream:
                            for frame in render_text(event.text):
                                await self.send(frame)
                    elif isinstance(event, Failed):
                        await self.send(render_error(event.error))
                        return event.error.status
            finally:
                await events.aclose()
        except ProtocolError as err:      # refused before it started (overload, engine down)
            await self.send(render_error(err))
            return err.status
        return 200

    def receive(self, data: str | bytes) -> bool:
        """Queue a client message; False when the client floods (the connection is closed)."""
        if _is_cancel(data):
            if self.current_rid is not None:
                self.engine.abort(self.current_rid)   # the round ends with its partial answer + EOS
            return True
        if self.queue.qsize() >= 2 * MAX_QUEUED_MESSAGES:
            return False
        accepted = self.num_accepted < MAX_QUEUED_MESSAGES
        self.num_accepted += accepted
        self.queue.put_nowait((data, accepted))
        return True

    def idle_for(self) -> float:
        """Seconds since the last round ended; 0 while a round runs or messages are queued."""
        if self.in_round or not self.queue.empty():
            return 0.0
        return time.monotonic() - self.last_round_end

    def drain(self) -> None:
        """Finish the current round, refuse the queued ones, close with 1001."""
        self.draining = True
        if self.current_rid is None and self.queue.empty():
            self.queue.put_nowait(_DRAIN)

    async def close(self, code: int, message: bytes) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self.ws.close(code=code, message=message)


def close_reply(code: int) -> int:
    """Our answer to a client's Close frame: 1000, or 1002 for a code RFC 6455 7.4 forbids on the wire
    (1004-1006 and 1015 are reserved; 1016-2999 unassigned; none outside 1000-4999). aiohttp already
    refuses most of these with 1002 but takes 1006 and 5000+ as a normal close (Autobahn 7.9.5).
    aiohttp reports a Close without a status code as 0 (a wire 0 it refuses itself)."""
    valid = code == 0 or 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999
    return WSCloseCode.OK if valid else WSCloseCode.PROTOCOL_ERROR


def _is_cancel(data: str | bytes) -> bool:
    try:
        return isinstance(parse_ws_message(data, SessionState(), "probe"), Cancel)
    except ProtocolError:
        return False


async def websocket_session(request: web.Request) -> web.WebSocketResponse:
    state = request.app[keys.STATE]
    idle_timeout = state.options.ws_idle_timeout
    ws = web.WebSocketResponse(heartbeat=state.options.ws_heartbeat, max_msg_size=MAX_MESSAGE_BYTES,
                               protocols=("berth",), autoclose=False)
    await ws.prepare(request)
    session = _Session(ws, state, request.transport)
    state.sessions.add(session)
    worker = asyncio.create_task(session.run_rounds())
    try:
        while True:
            try:
                msg = await ws.receive(timeout=idle_timeout)   # pings and pongs are answered inside
            except TimeoutError:
                if session.idle_for() < idle_timeout:
                    continue                                   # the client is waiting for an answer
                await session.close(WSCloseCode.GOING_AWAY, b"idle timeout")
                break
            if msg.type is WSMsgType.CLOSE:
                await session.close(close_reply(msg.data), b"")
                break
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break                                          # CLOSED, ERROR
            if not session.receive(msg.data):
                await session.close(WSCloseCode.POLICY_VIOLATION, b"too many queued messages")
                break
    except _GONE:
        pass
    finally:
        state.sessions.discard(session)
        if not session.worker_closing:
            worker.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await worker
    return ws
