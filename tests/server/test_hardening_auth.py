"""Auth on every route with path and Host tricks (B1, B3, B7), and the socket guards (C2, C3)."""
from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp import web

from server.async_engine import AsyncEngine
from server.http.app import make_app
from server.http import keys
from server.http.keys import ServerOptions
from server.http.limits import GuardedSite

PROTECTED = [("GET", "/v1/models"), ("HEAD", "/v1/models"), ("POST", "/v1/chat/completions"),
             ("POST", "/v1/completions"), ("POST", "/"), ("GET", "/metrics")]
TRICKS = ["//v1/models", "/v1/../v1/models", "/V1/models", "/v1%2Fmodels", "/v1/models/", "/v1/./models",
          "/static/../v1/models", "/health/../v1/models", "/%2e%2e/v1/models", "/static/../../etc/passwd",
          "/static/%2e%2e/%2e%2e/etc/passwd", "/static/"]


async def raw(host: str, port: int, head: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head)
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    rest = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    return int(status_line.split()[1]), rest


@pytest.fixture
async def locked(aiohttp_client, served_engine):
    return await aiohttp_client(make_app(AsyncEngine(served_engine), ["m"], token="secret"))


@pytest.mark.parametrize("method,path", PROTECTED)
@pytest.mark.parametrize("auth", [None, "", "wrong", "Bearer", "Bearer secre", "SECRET"])
async def test_every_protected_route_refuses_without_the_token(locked, method, path, auth):
    headers = {} if auth is None else {"Authorization": auth}
    resp = await locked.request(method, path, headers={**headers, "Content-Type": "application/json"},
                                data=b'{"prompt":"hi","max_tokens":1}' if method == "POST" else None)
    assert resp.status == 401
    if method != "HEAD":
        assert (await resp.json())["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("path", TRICKS)
async def test_path_tricks_are_never_served(locked, path):
    status, body = await raw(locked.server.host, locked.server.port,
                             f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status in (400, 401, 403, 404), (path, status)
    assert b'"data"' not in body and b"root:" not in body


@pytest.mark.parametrize("host", ["x/health?", "x/health", "x?/health", "127.0.0.1/v1/../health"])
async def test_host_header_tricks_do_not_move_the_checked_path(locked, host):
    status, _ = await raw(locked.server.host, locked.server.port,
                          f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    assert status in (400, 401)


async def test_connection_cap_and_header_deadline(served_engine):
    app = make_app(AsyncEngine(served_engine), ["m"], options=ServerOptions(max_connections=2, header_timeout=0.3))
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = GuardedSite(runner, "127.0.0.1", 0, app[keys.STATE].options)
    await site.start()
    try:
        port = site.port
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        refused = await asyncio.wait_for(reader.read(), 5)
        assert refused.startswith(b"HTTP/1.1 503")
        assert orjson.loads(refused.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "overloaded_error"
        for r, _ in silent:                     # Slowloris: no request head within the deadline
            assert await asyncio.wait_for(r.read(), 5) == b""
        status, _ = await raw("127.0.0.1", port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 200                    # the canary is served once the slots are free
    finally:
        await runner.cleanup()
