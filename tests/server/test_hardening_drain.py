"""Graceful drain of a real `berth serve` (RELIABILITY.md F1-F3): SIGTERM stops admission (503), in-flight
requests finish, a WebSocket closes 1001 after its current round, the deadline aborts the rest with a
terminal event, exit 0."""
from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import orjson

from protocol.sse import SseDecoder
from tests.conftest import LiveServer


async def sse_stream(session, url: str, body: dict, started: asyncio.Event) -> list[dict]:
    chunks, decoder = [], SseDecoder()
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        async for data in resp.content.iter_any():
            for payload in decoder.feed(data):
                chunks.append(payload)
                started.set()
    assert chunks[-1] == "[DONE]"
    return [orjson.loads(c) for c in chunks[:-1]]


async def ws_rounds(session, url: str, started: asyncio.Event) -> tuple[list[str], int]:
    async with session.ws_connect(url + "/ws") as ws:
        for _ in range(2):
            await ws.send_str(orjson.dumps({"prompt": "Tell me a story", "max_new_tokens": 12,
                                            "ignore_eos": True}).decode())
        frames = []
        while (msg := await ws.receive()).type == aiohttp.WSMsgType.TEXT:
            frames.append(msg.data)
            started.set()
        return frames, msg.data


async def scenario(server: LiveServer) -> None:
    url = server.url
    async with aiohttp.ClientSession() as session:
        events = [asyncio.Event() for _ in range(3)]
        short = asyncio.ensure_future(sse_stream(session, url, {"prompt": "Once upon a time", "max_tokens": 12,
                                                                "ignore_eos": True, "stream": True}, events[0]))
        long = asyncio.ensure_future(sse_stream(session, url, {"prompt": "Once upon a time", "max_tokens": 2000,
                                                               "ignore_eos": True, "stream": True}, events[1]))
        ws = asyncio.ensure_future(ws_rounds(session, url, events[2]))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        async with session.get(url + "/health") as resp:
            assert resp.status == 503
        async with session.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"]
            assert (await resp.json())["error"]["type"] == "overloaded_error"
        assert (await short)[-1]["choices"][0]["finish_reason"] == "length"
        frames, close_code = await ws
        assert frames.count("<EOS>") == 2                    # round 1 answered, round 2 refused
        assert orjson.loads(frames[-2])["error"]["code"] == 503
        assert close_code == aiohttp.WSCloseCode.GOING_AWAY
        finish = [c["choices"][0]["finish_reason"] for c in await long if c["choices"]]
        assert finish[-1] == "abort"                         # the drain deadline's terminal event


def test_sigterm_drains_in_flight_and_aborts_at_the_deadline():
    server = LiveServer("--drain-timeout", "4").wait_ready()
    try:
        asyncio.run(scenario(server))
        started = time.monotonic()
        assert server.proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.communicate()
