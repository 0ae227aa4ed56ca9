"""WebSocket sessions (PROTOCOLS.md): multi-round dialogues with server-side history, `<EOS>` per answer.

One receive loop per socket (it keeps heartbeats alive and sees a Cancel at once) feeds a bounded queue;
one worker answers the queued messages strictly in order. Closing the socket cancels the worker, which
aborts the round in progress (AsyncEngine.generate's finally).
"""
from __future__ import annotations

import asyncio
import contextlib
import uuid

from aiohttp import WSMsgType, web

from protocol.errors import ProtocolError
from protocol.types import Failed, TokenDelta
from protocol.ws import EOS, Cancel, SessionState, WsGenerate, parse_ws_message, render_error, render_text
from server.http import keys

MAX_QUEUED_MESSAGES = 8
MAX_MESSAGE_BYTES = 1 << 20


class _Session:
    def __init__(self, ws: web.WebSocketResponse, engine):
        self.ws = ws
        self.engine = engine
        self.state = SessionState()
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=MAX_QUEUED_MESSAGES)
        self.current_rid: str | None = None

    async def send_error(self, err: ProtocolError) -> None:
        await self.ws.send_str(render_error(err))
        await self.ws.send_str(EOS)

    async def run_rounds(self) -> None:
        while True:
            data = await self.queue.get()
            rid = f"ws-{uuid.uuid4().hex}"
            try:
                action = parse_ws_message(data, self.state, rid)
            except ProtocolError as err:
                await self.send_error(err)
                continue
            if isinstance(action, WsGenerate):
                await self.answer(action)
            else:                       # SetSystemPrompt (a Cancel with nothing running lands here too)
                await self.ws.send_str(EOS)

    async def answer(self, action: WsGenerate) -> None:
        self.current_rid = action.request.request_id
        parts: list[str] = []
        failed = False
        try:
            events = self.engine.generate(action.request)
            try:
                async for event in events:
                    if isinstance(event, TokenDelta):
                        parts.append(event.text)
                        if action.stream:
                            for frame in render_text(event.text):
                                await self.ws.send_str(frame)
                    elif isinstance(event, Failed):
                        failed = True
                        await self.ws.send_str(render_error(event.error))
            finally:
                await events.aclose()
        except ProtocolError as err:      # refused before it started (overload, engine down)
            failed = True
            await self.ws.send_str(render_error(err))
        finally:
            self.current_rid = None
        answer = "".join(parts)
        if not action.stream and not failed:
            for frame in render_text(answer):
                await self.ws.send_str(frame)
        if not failed:
            self.state.commit(action.prompt, answer)
        await self.ws.send_str(EOS)

    async def receive(self, data: str | bytes) -> None:
        if _is_cancel(data):
            if self.current_rid is not None:
                self.engine.abort(self.current_rid)   # the round ends with its partial answer + EOS
            return
        if self.queue.full():
            await self.send_error(ProtocolError(
                f"too many queued messages (at most {MAX_QUEUED_MESSAGES})", status=429, retry_after=1))
            return
        self.queue.put_nowait(data)


def _is_cancel(data: str | bytes) -> bool:
    try:
        return isinstance(parse_ws_message(data, SessionState(), "probe"), Cancel)
    except ProtocolError:
        return False


async def websocket_session(request: web.Request) -> web.WebSocketResponse:
    state = request.app[keys.STATE]
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=MAX_MESSAGE_BYTES, protocols=("berth",))
    await ws.prepare(request)
    session = _Session(ws, state.engine)
    worker = asyncio.create_task(session.run_rounds())
    try:
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                await session.receive(msg.data)
            elif msg.type == WSMsgType.ERROR:
                break
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await worker
    return ws
