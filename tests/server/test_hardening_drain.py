"""Graceful drain of a real `berth serve` (RELIABILITY.md F1-F4): SIGTERM stops admission (503), in-flight
requests finish, a WebSocket closes 1001 after its current round, the deadline or a second signal aborts
the rest with a terminal event, exit 0, and no child process outlives the server."""
from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import orjson
import psutil

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


async def ws_rounds(session, url: str, started: asyncio.Event, rounds: int = 2,
                    max_new_tokens: int = 12) -> tuple[list[str], int]:
    """Send `rounds` messages at once; every text frame until the close, and the close code."""
    async with session.ws_connect(url + "/ws") as ws:
        for _ in range(rounds):
            await ws.send_str(orjson.dumps({"prompt": "Tell me a story", "max_new_tokens": max_new_tokens,
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
        async with session.get(url + "/ready") as resp:
            assert resp.status == 503                  # readiness: draining, route elsewhere
        async with session.get(url + "/health") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "draining"   # liveness: alive
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


def assert_no_orphans(pid: int, children: list[psutil.Process]) -> None:
    """F4: the server is gone, and so is every process it had started (a zombie has exited too)."""
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    for child in children:
        try:
            alive = child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        assert not alive, f"orphan process {child.pid} {child.name()}"


def test_sigterm_drains_in_flight_and_aborts_at_the_deadline():
    server = LiveServer("--drain-timeout", "4").wait_ready()
    try:
        asyncio.run(scenario(server))
        children = psutil.Process(server.proc.pid).children(recursive=True)
        started = time.monotonic()
        assert server.proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
        assert_no_orphans(server.proc.pid, children)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.communicate()


async def nul_stream(session, url: str, started: asyncio.Event) -> list[bytes]:
    async with session.post(url + "/", json={"prompt": "Tell me a long story", "max_new_tokens": 2000,
                                             "ignore_eos": True}) as resp:
        assert resp.status == 200
        data = b""
        async for chunk in resp.content.iter_any():
            data += chunk
            started.set()
    return data.split(b"\0")


async def second_signal_scenario(server: LiveServer, children: list) -> float:
    """In-flight work is still running in a 60 s drain when a second signal arrives; the time it came."""
    url = server.url
    async with aiohttp.ClientSession() as session:
        events = [asyncio.Event() for _ in range(5)]
        body = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        streams = [asyncio.ensure_future(sse_stream(session, url, body, events[i])) for i in range(3)]
        nul = asyncio.ensure_future(nul_stream(session, url, events[3]))
        ws = asyncio.ensure_future(ws_rounds(session, url, events[4], rounds=1, max_new_tokens=2000))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
        children += psutil.Process(server.proc.pid).children(recursive=True)
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        async with session.get(url + "/ready") as resp:
            assert resp.status == 503
        assert not any(t.done() for t in (*streams, nul, ws)), "the drain must still be waiting for them"
        server.proc.send_signal(signal.SIGINT)
        second = time.monotonic()
        for chunks in await asyncio.wait_for(asyncio.gather(*streams), 10):
            finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
            assert finish[-1] == "abort" and len(finish) > 1     # tokens, then the terminal abort event
        frames = await asyncio.wait_for(nul, 10)
        assert frames[-1] == b"" and "response" in orjson.loads(frames[-2])   # a clean end, whole frames
        frames, close_code = await asyncio.wait_for(ws, 10)
        assert frames[-1] == "<EOS>" and close_code == aiohttp.WSCloseCode.GOING_AWAY
        return second


def test_second_signal_aborts_a_long_drain_and_leaves_no_orphans():
    """F2 (second signal) and F4: with --drain-timeout 60, SIGTERM starts the drain; a SIGINT a second
    later aborts everything at once (SSE ends with finish_reason "abort" then [DONE], the NUL stream
    ends cleanly, the WS round ends with <EOS> then close 1001), and the process exits 0 within 5 s of
    the second signal (RELIABILITY.md: 4 s; vLLM's abort mode takes up to 4.1 s)."""
    server = LiveServer("--drain-timeout", "60").wait_ready()
    children: list = []
    try:
        second = asyncio.run(second_signal_scenario(server, children))
        assert server.proc.wait(timeout=15) == 0
        assert time.monotonic() - second < 5, f"exit took {time.monotonic() - second:.1f} s"
        assert_no_orphans(server.proc.pid, children)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.communicate()
