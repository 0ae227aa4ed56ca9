"""Each protocol client against a fake server that splits frames across writes."""
from __future__ import annotations

import socket

import aiohttp
import pytest

from bench import clients
from bench.clients import ErrorKind, Target
from tests.bench.fake_server import BODIES, TOKEN, WORDS, make_app

pytestmark = pytest.mark.asyncio


async def _target(aiohttp_server, mode="ok", token=TOKEN, **kw):
    server = await aiohttp_server(make_app(mode))
    return server, Target(str(server.make_url("")), token=token, timeout_s=10, **kw)


async def test_chat_stream_usage_and_timing(aiohttp_server):
    server, target = await _target(aiohttp_server, model="m")
    async with aiohttp.ClientSession() as http:
        r = await clients.openai_chat(http, target, "hi", 16, history=[("q0", "a0")])
    assert r.success and r.error_kind is None
    assert r.text == "".join(WORDS)
    assert (r.prompt_tokens, r.output_tokens) == (11, 4)
    assert len(r.chunk_times) == 4 and len(r.itl) == 3
    assert r.ttft is not None and r.ttft <= r.latency
    body = server.app[BODIES][0]
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 16 and body["temperature"] == 0 and body["ignore_eos"] is True
    assert body["model"] == "m"
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]


async def test_chat_stream_cut_is_protocol_error(aiohttp_server):
    _, target = await _target(aiohttp_server, mode="cut")
    async with aiohttp.ClientSession() as http:
        r = await clients.openai_chat(http, target, "hi", 16)
    assert not r.success and r.error_kind is ErrorKind.PROTOCOL


async def test_401_is_http_error(aiohttp_server):
    _, target = await _target(aiohttp_server, token="wrong")
    async with aiohttp.ClientSession() as http:
        for call in (clients.openai_chat, clients.openai_completions, clients.eas_http):
            r = await call(http, target, "hi", 16)
            assert (r.success, r.error_kind, r.status) == (False, ErrorKind.HTTP, 401)
            assert "bad token" in r.error


async def test_bladellm_completions_cumulative_usage(aiohttp_server):
    server, target = await _target(aiohttp_server, ignore_eos=False)
    async with aiohttp.ClientSession() as http:
        r = await clients.openai_completions(http, target, "The capital", 8)
    assert r.success and r.text == "".join(WORDS)
    assert (r.prompt_tokens, r.output_tokens) == (7, 4)
    body = server.app[BODIES][0]
    assert body["prompt"] == "The capital" and "ignore_eos" not in body and "model" not in body


async def test_bladellm_error_info_mid_stream(aiohttp_server):
    _, target = await _target(aiohttp_server, mode="error")
    async with aiohttp.ClientSession() as http:
        r = await clients.openai_completions(http, target, "x", 8)
    assert not r.success and r.error_kind is ErrorKind.PROTOCOL and "engine failed" in r.error


async def test_eas_nul_frames_deltas(aiohttp_server):
    server, target = await _target(aiohttp_server)
    async with aiohttp.ClientSession() as http:
        r = await clients.eas_http(http, target, "hi", 32, history=[("q", "a")])
    assert r.success and r.text == "".join(WORDS)
    assert r.output_tokens == 4          # no usage, no tokenizer: one token per text chunk
    assert len(r.itl) == 3
    body = server.app[BODIES][0]
    assert body["use_stream_chat"] is True and body["max_new_tokens"] == 32 and body["history"] == [["q", "a"]]


async def test_eas_counts_with_tokenizer(aiohttp_server):
    _, target = await _target(aiohttp_server, count_tokens=lambda text: len(text))
    async with aiohttp.ClientSession() as http:
        r = await clients.eas_http(http, target, "hey", 32)
    assert r.success and r.output_tokens == len("".join(WORDS)) and r.prompt_tokens == 3


async def test_eas_truncated_frame(aiohttp_server):
    _, target = await _target(aiohttp_server, mode="cut")
    async with aiohttp.ClientSession() as http:
        r = await clients.eas_http(http, target, "hi", 32)
    assert not r.success and r.error_kind is ErrorKind.PROTOCOL


async def test_websocket_rounds(aiohttp_server):
    server, target = await _target(aiohttp_server)
    async with aiohttp.ClientSession() as http:
        results = await clients.websocket_session(http, target, ["a", "b", "c"], 8)
    assert [r.round_index for r in results] == [0, 1, 2]
    assert all(r.success for r in results)
    assert [r.text for r in results] == ["".join(WORDS[:2]), "".join(WORDS[:3]), "".join(WORDS[:4])]
    assert [r.output_tokens for r in results] == [2, 3, 4]
    assert [m["prompt"] for m in server.app[BODIES]] == ["a", "b", "c"]
    assert all("history" not in m for m in server.app[BODIES])


async def test_websocket_error_frame_fails_round_and_rest(aiohttp_server):
    _, target = await _target(aiohttp_server, mode="error")
    async with aiohttp.ClientSession() as http:
        results = await clients.websocket_session(http, target, ["a", "b", "c"], 8)
    assert [r.success for r in results] == [True, False, False]
    assert results[1].error_kind is ErrorKind.PROTOCOL and "bad field" in results[1].error
    assert results[2].round_index == 2


async def test_websocket_401(aiohttp_server):
    _, target = await _target(aiohttp_server, token=None)
    async with aiohttp.ClientSession() as http:
        results = await clients.websocket_session(http, target, ["a", "b"], 8)
    assert [(r.error_kind, r.round_index) for r in results] == [(ErrorKind.HTTP, 0), (ErrorKind.HTTP, 1)]
    assert results[0].status == 401


async def test_connection_refused():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]      # closed again before the request: nothing listens
    target = Target(f"http://127.0.0.1:{port}", timeout_s=5)
    async with aiohttp.ClientSession() as http:
        r = await clients.openai_chat(http, target, "hi", 4)
        [w] = await clients.websocket_session(http, target, ["hi"], 4)
    assert r.error_kind is ErrorKind.CONNECTION and w.error_kind is ErrorKind.CONNECTION

