"""Hardening (RELIABILITY.md groups B, C, D, E, G, H): metrics, overload, faults, slow readers, limits.

Every test ends with the engine invariants (INV): nothing running or waiting, every KV block free."""
from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson
import pytest
from aiohttp import web

from protocol.sse import SseDecoder
from protocol.types import TokenDelta
from server.async_engine import AsyncEngine, _Channel
from server.http.app import make_app
from server.http.keys import ServerOptions
from tests.conftest import wait_idle

NAME = "SmolLM2-135M-Instruct"
LONG = {"messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 400,
        "ignore_eos": True}


@pytest.fixture
async def build(aiohttp_client, served_engine):
    """build(token=None, max_pending=128, **options) -> (client, AsyncEngine); INV is checked afterwards,
    once the apps are closed (a closing app aborts whatever its handlers still had in flight)."""
    clients = []

    async def make(token: str | None = None, max_pending: int = 128, **options):
        engine = AsyncEngine(served_engine, max_pending=max_pending)
        app = make_app(engine, [NAME], token=token, options=ServerOptions(**options))
        clients.append(await aiohttp_client(app))
        return clients[-1], engine
    yield make
    for client in clients:
        await client.close()
    assert not served_engine.has_unfinished()
    assert served_engine.block_manager.num_used_blocks == 0


async def assert_inv(engine) -> None:
    await wait_idle(engine, timeout=10)
    assert engine.block_manager.num_used_blocks == 0


async def read_sse(resp) -> list[str]:
    decoder, out = SseDecoder(), []
    async for chunk in resp.content.iter_any():
        out += decoder.feed(chunk)
    return out


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == (f"{name}{{{want}}}" if labels else name):
            return float(value)
    raise AssertionError(f"{name} {labels} not in /metrics")


async def scrape_counted(client, headers=None, **labels) -> str:
    """/metrics once the request with these labels is counted (its handler returns after the client
    has read the last byte)."""
    for _ in range(100):
        text = await (await client.get("/metrics", headers=headers)).text()
        if f'berth_requests_total{{outcome="{labels["outcome"]}",protocol="{labels["protocol"]}"}}' in text:
            return text
        await asyncio.sleep(0.02)
    raise AssertionError(f"request {labels} never counted")


async def test_metrics_behind_auth_and_count_a_request(build, served_engine):
    client, _ = await build(token="secret")
    assert (await client.get("/metrics")).status == 401
    resp = await client.post("/v1/chat/completions", headers={"Authorization": "secret"}, json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True})
    assert (await read_sse(resp))[-1] == "[DONE]"
    await assert_inv(served_engine)
    text = await scrape_counted(client, {"Authorization": "Bearer secret"}, protocol="openai_chat", outcome="ok")
    assert metric(text, "berth_requests_total", outcome="ok", protocol="openai_chat") == 1
    assert metric(text, "berth_time_to_first_token_seconds_count") == 1
    assert metric(text, "berth_inter_token_latency_seconds_count") >= 1
    assert metric(text, "berth_e2e_request_latency_seconds_count") == 1
    assert metric(text, "berth_request_queue_time_seconds_count") == 1
    assert metric(text, "berth_request_admission_seconds_count") == 1
    assert metric(text, "berth_generation_tokens_total") >= 1
    assert metric(text, "berth_prompt_tokens_total") > 0
    assert metric(text, "berth_kv_blocks_used") == 0
    assert metric(text, "berth_kv_blocks_free") == served_engine.block_manager.num_blocks
    assert metric(text, "berth_num_requests_running") == 0
    public, _ = await build(token="secret", metrics_public=True)
    assert (await public.get("/metrics")).status == 200


async def test_overload_is_429_with_retry_after_on_http_and_ws(build, served_engine):
    client, engine = await build(max_pending=1)
    busy = await client.post("/v1/chat/completions", json={**LONG, "stream": True})
    assert busy.status == 200
    resp = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "1"
    err = (await resp.json())["error"]
    assert err["type"] == "overloaded_error" and err["code"] == 429
    ws = await client.ws_connect("/ws")
    await ws.send_str(orjson.dumps({"prompt": "Hi", "max_new_tokens": 2}).decode())
    assert orjson.loads(await ws.receive_str())["error"]["code"] == 429
    assert await ws.receive_str() == "<EOS>"
    await ws.close()
    busy.close()
    await assert_inv(served_engine)
    text = await scrape_counted(client, protocol="openai_completions", outcome="overloaded")
    assert metric(text, "berth_requests_total", outcome="overloaded", protocol="openai_completions") == 1


async def test_ws_drop_mid_answer_with_queued_rounds_frees_everything(build, served_engine):
    client, engine = await build()
    ws = await client.ws_connect("/")
    for i in range(5):            # the seed's client sends its prompts back-to-back
        await ws.send_str(orjson.dumps({"prompt": f"Story {i}", "max_new_tokens": 300,
                                        "ignore_eos": True}).decode())
    assert await ws.receive_str() != "<EOS>"       # round 1 is streaming
    await ws.close()
    await assert_inv(served_engine)
    assert engine.num_pending == 0


async def test_ws_limits_oversize_garbage_and_flood(build, served_engine):
    client, _ = await build()
    ws = await client.ws_connect("/ws")
    await ws.send_bytes(b"\xff\x00garbage")
    assert orjson.loads(await ws.receive_str())["error"]["code"] == 400
    assert await ws.receive_str() == "<EOS>"
    await ws.send_str("x" * ((1 << 20) + 1))
    msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    ws = await client.ws_connect("/ws")
    for _ in range(40):
        await ws.send_str(orjson.dumps({"prompt": "Hi", "max_new_tokens": 2}).decode())
    codes = []
    while (msg := await ws.receive()).type == aiohttp.WSMsgType.TEXT:
        codes.append(msg.data)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.POLICY_VIOLATION
    await assert_inv(served_engine)


async def test_per_request_fault_fails_only_that_request(build, served_engine, monkeypatch):
    from server.engine import output

    real_add = output.ChoiceOutput.add

    def faulty_add(self, token_id, logprob=None, complete=False):
        if self.params.seed == 4242 and self.num_output_tokens >= 1:   # fails on its 2nd token
            raise RuntimeError("injected detokenizer fault")
        return real_add(self, token_id, logprob, complete)
    monkeypatch.setattr(output.ChoiceOutput, "add", faulty_add)
    client, engine = await build()
    body = {"prompt": "Once upon a time", "max_tokens": 4, "ignore_eos": True}
    bad, good, bad_stream = await asyncio.gather(
        client.post("/v1/completions", json={**body, "seed": 4242}),
        client.post("/v1/completions", json={**body, "seed": 1}),
        client.post("/v1/completions", json={**body, "seed": 4242, "stream": True}))
    assert bad.status == 500
    assert (await bad.json())["error"]["message"] == "generation failed"
    assert (await good.json())["usage"]["completion_tokens"] == 4
    payloads = await read_sse(bad_stream)
    assert payloads[-1] == "[DONE]" and "error" in payloads[-2]
    assert engine.dead is None
    assert (await client.get("/health")).status == 200
    await assert_inv(served_engine)


async def test_forward_failure_fails_all_in_flight_and_health_503(build, served_engine, monkeypatch):
    client, engine = await build()
    started = asyncio.Event()
    real_run = served_engine.runner.run

    def failing_run(batch):
        if started.is_set():
            raise RuntimeError("injected forward fault")
        return real_run(batch)
    monkeypatch.setattr(served_engine.runner, "run", failing_run)
    stream = await client.post("/v1/chat/completions", json={**LONG, "stream": True})
    plain = asyncio.ensure_future(client.post("/", json={"prompt": "Hi", "max_new_tokens": 300,
                                                         "use_stream_chat": False}))
    await asyncio.sleep(0.3)
    started.set()
    payloads = await asyncio.wait_for(read_sse(stream), 10)
    assert payloads[-1] == "[DONE]" and "error" in orjson.loads(payloads[-2])
    assert (await asyncio.wait_for(plain, 10)).status == 500
    assert (await client.get("/health")).status == 503
    refused = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert refused.status == 503
    monkeypatch.undo()
    await assert_inv(served_engine)


async def test_stalled_reader_is_aborted_and_freed(build, served_engine, monkeypatch):
    client, engine = await build(stall_timeout=0.3)
    real_write = web.StreamResponse.write
    calls = []

    async def stuck_write(self, data):
        calls.append(len(data))
        if len(calls) > 1:
            await asyncio.sleep(3600)     # the client stopped reading: the socket never drains
        return await real_write(self, data)
    monkeypatch.setattr(web.StreamResponse, "write", stuck_write)
    resp = await client.post("/v1/chat/completions", json={**LONG, "stream": True})
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ConnectionError)):
        await read_sse(resp)
    await assert_inv(served_engine)
    monkeypatch.undo()
    text = await scrape_counted(client, protocol="openai_chat", outcome="timeout")
    assert metric(text, "berth_requests_total", outcome="timeout", protocol="openai_chat") == 1


def test_channel_coalesces_deltas_when_the_reader_is_behind():
    async def run():
        channel = _Channel(1)
        for i in range(1000):
            channel.put(TokenDelta("ab", (i,), 0, None, 7 if i == 0 else None))
        assert len(channel.events) == 1
        merged = await channel.get()
        assert merged.text == "ab" * 1000 and merged.token_ids == tuple(range(1000))
        assert merged.num_prompt_tokens == 7
    asyncio.run(run())


async def test_body_deadline_is_408_json(build, served_engine):
    client, _ = await build(body_timeout=0.3)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\":")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 408")
    assert b"application/json" in head
    writer.close()


async def test_origin_check_and_page_security_headers(build, served_engine):
    client, _ = await build(token="secret")
    page = await client.get("/webui")
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY"
    host = f"{client.server.host}:{client.server.port}"
    assert (await client.get("/webui", headers={"Origin": "https://evil.example"})).status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws", headers={"Authorization": "secret", "Origin": "https://evil.example"})
    assert info.value.status == 403
    ws = await client.ws_connect("/ws", headers={"Authorization": "secret", "Origin": f"http://{host}"})
    await ws.close()


async def test_access_log_one_line_per_request_without_secrets(build, served_engine, caplog):
    caplog.set_level(logging.INFO, logger="berth.access")
    client, _ = await build(token="secret")
    await client.post("/v1/completions", headers={"Authorization": "Bearer secret"},
                      json={"prompt": "The secret word is swordfish", "max_tokens": 2})
    await client.get("/v1/models")
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "berth.access"]
    assert [(x["route"], x["status"]) for x in lines] == [("completions", 200), ("models", 401)]
    assert lines[0]["output_tokens"] == 2 and lines[0]["ttft_ms"] is not None and lines[0]["request_id"]
    assert "swordfish" not in caplog.text and "secret" not in caplog.text
    caplog.clear()
    client, _ = await build(log_prompts=True)
    await client.post("/v1/completions", json={"prompt": "The secret word is swordfish", "max_tokens": 2})
    assert "swordfish" in caplog.text


async def test_queue_time_is_the_scheduler_wait(build, served_engine, caplog, monkeypatch):
    """With one running slot, the second request's queue_ms covers the first one's generation."""
    caplog.set_level(logging.INFO, logger="berth.access")
    monkeypatch.setattr(served_engine.scheduler, "max_num_seqs", 1)
    client, _ = await build()
    body = {"prompt": "Count to twenty:", "ignore_eos": True}
    first = asyncio.ensure_future(client.post("/v1/completions", json={**body, "max_tokens": 24}))
    await asyncio.sleep(0.2)
    second = await client.post("/v1/completions", json={**body, "max_tokens": 2})
    assert second.status == 200 and (await first).status == 200
    lines = {x["output_tokens"]: x for x in (orjson.loads(r.getMessage()) for r in caplog.records
                                              if r.name == "berth.access")}
    assert lines[2]["queue_ms"] > 0.5 * (lines[24]["duration_ms"] - 200)
    assert lines[24]["queue_ms"] < lines[2]["queue_ms"]
    text = await (await client.get("/metrics")).text()
    assert metric(text, "berth_request_queue_time_seconds_count") == 2
