"""End-to-end tests of every route against the real default model (greedy, fp32)."""
from __future__ import annotations

import orjson
import pytest

from protocol.nul import NulDecoder
from protocol.sse import SseDecoder
from tests.conftest import CANADA, read_sse_then_close, wait_idle

GREEDY = {"temperature": 0, "max_tokens": 24}


async def sse_payloads(resp) -> list[str]:
    decoder, out = SseDecoder(), []
    async for chunk in resp.content.iter_any():
        out += decoder.feed(chunk)
    return out


async def test_models_lists_served_name(make_client, served_engine):
    client = await make_client(served_engine)
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert body["data"][0]["id"] == "SmolLM2-135M-Instruct"
    assert body["data"][0]["max_model_len"] == served_engine.max_model_len


async def test_chat_stream_and_non_stream_agree_on_ottawa(make_client, served_engine):
    client = await make_client(served_engine)
    resp = await client.post("/v1/chat/completions", json={"messages": CANADA, **GREEDY})
    assert resp.status == 200
    body = await resp.json()
    text = body["choices"][0]["message"]["content"]
    assert "Ottawa" in text
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] > 0
    resp = await client.post("/v1/chat/completions", json={
        "messages": CANADA, "stream": True, "stream_options": {"include_usage": True}, **GREEDY})
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    payloads = await sse_payloads(resp)
    assert payloads[-1] == "[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == text
    assert chunks[-1]["usage"]["completion_tokens"] == body["usage"]["completion_tokens"]
    await wait_idle(served_engine)


async def test_chat_accepts_content_parts_and_model_dir_alias(make_client, served_engine):
    client = await make_client(served_engine)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of Canada?"}]}]
    body = await (await client.post("/v1/chat/completions",
                                    json={"model": "/model_dir/", "messages": messages, **GREEDY})).json()
    assert "Ottawa" in body["choices"][0]["message"]["content"]


async def test_bladellm_stream_shape_and_cumulative_usage(make_client, served_engine):
    client = await make_client(served_engine)
    resp = await client.post("/v1/completions", json={"prompt": "The capital of Canada is", "stream": "true",
                                                      "max_tokens": 6, "temperature": 0})
    payloads = await sse_payloads(resp)
    assert payloads[-1] == "[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    for i, chunk in enumerate(chunks):
        assert set(chunk) >= {"id", "object", "choices", "usage", "error_info"}
        assert chunk["error_info"] is None
        assert chunk["usage"]["prompt_tokens"] > 0
        assert chunk["usage"]["total_tokens"] == chunk["usage"]["prompt_tokens"] + chunk["usage"]["completion_tokens"]
    assert [c["usage"]["completion_tokens"] for c in chunks] == sorted(c["usage"]["completion_tokens"] for c in chunks)
    assert all(c["choices"][0]["finish_reason"] == "" for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"][0]["text"] == ""
    assert chunks[-1]["usage"]["completion_tokens"] == 6


async def test_openai_completions_non_stream(make_client, served_engine):
    client = await make_client(served_engine)
    body = await (await client.post("/v1/completions", json={
        "model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 5,
        "temperature": 0})).json()
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 5
    assert body["choices"][0]["finish_reason"] == "length"


async def test_eas_string_structured_and_stream(make_client, served_engine):
    client = await make_client(served_engine)
    resp = await client.post("/", data=b"What is the capital of Canada?",
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    body = await resp.json()
    assert set(body) == {"response", "history"}
    assert body["history"][-1][0] == "What is the capital of Canada?"
    payload = {"prompt": "What is the capital of Canada?", "temperature": 0, "max_new_tokens": 24,
               "history": [["Hi", "Hello! How can I help?"]], "use_stream_chat": False}
    full = await (await client.post("/", json=payload)).json()
    assert "Ottawa" in full["response"]
    assert full["history"] == [["Hi", "Hello! How can I help?"], [payload["prompt"], full["response"]]]
    resp = await client.post("/", json={**payload, "use_stream_chat": True})
    decoder, frames = NulDecoder(), []
    async for chunk in resp.content.iter_any():
        frames += decoder.feed(chunk)
    assert len(frames) > 1
    assert frames[-1]["response"] == full["response"]
    assert all(frames[i + 1]["response"].startswith(frames[i]["response"]) for i in range(len(frames) - 1))
    assert frames[-1]["history"][-1] == [payload["prompt"], full["response"]]


async def test_websocket_multi_round_session(make_client, served_engine):
    client = await make_client(served_engine)
    ws = await client.ws_connect("/ws")
    await ws.send_str(orjson.dumps({"system_prompt": "You are a helpful assistant."}).decode())
    await ws.send_bytes(orjson.dumps({"prompt": "What is the capital of Canada?", "temperature": 0,
                                      "max_new_tokens": 24}))
    await ws.send_str(orjson.dumps({"prompt": "And of France?", "temperature": 0, "max_new_tokens": 24,
                                    "use_stream_chat": False}).decode())
    rounds, current = [], []
    while len(rounds) < 3:
        msg = await ws.receive_str()
        if msg == "<EOS>":
            rounds.append("".join(current))
            current = []
        else:
            current.append(msg)
    await ws.close()
    assert rounds[0] == ""                      # system prompt only: answered by <EOS> alone
    assert "Ottawa" in rounds[1]
    assert "Paris" in rounds[2]
    await wait_idle(served_engine)


async def test_websocket_bad_message_keeps_session(make_client, served_engine):
    client = await make_client(served_engine)
    ws = await client.ws_connect("/")
    await ws.send_str("{not json")
    err = orjson.loads(await ws.receive_str())
    assert err["error"]["code"] == 400
    assert await ws.receive_str() == "<EOS>"
    await ws.send_str(orjson.dumps({"prompt": "Say hi", "max_new_tokens": 3}).decode())
    frames = []
    while (msg := await ws.receive_str()) != "<EOS>":
        frames.append(msg)
    assert frames
    await ws.close()


@pytest.mark.parametrize("route,body,status,fragment", [
    ("/v1/chat/completions", b"{bad", 400, "JSON"),
    ("/v1/chat/completions", b"[]", 400, ""),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": -1}', 400,
     "temperature"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": [-1]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": [99999999]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "n": 1000}', 400, "n"),
])
async def test_bad_input_is_a_clear_400(make_client, served_engine, route, body, status, fragment):
    client = await make_client(served_engine)
    resp = await client.post(route, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == status
    err = (await resp.json())["error"]
    assert fragment in err["message"] or fragment == err["param"]
    ok = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert ok.status == 200


async def test_prompt_longer_than_context_names_both_lengths(make_client, served_engine):
    client = await make_client(served_engine)
    prompt = "word " * (served_engine.max_model_len + 10)
    resp = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4})
    assert resp.status == 400
    message = (await resp.json())["error"]["message"]
    assert str(served_engine.max_model_len) in message


async def test_media_type_body_size_and_method_errors(make_client, served_engine):
    client = await make_client(served_engine)
    resp = await client.post("/v1/chat/completions", data=b"{}", headers={"Content-Type": "text/plain"})
    assert resp.status == 415
    assert (await resp.json())["error"]["message"] == "Unsupported Media Type: Only 'application/json' is allowed"
    resp = await client.post("/v1/completions", data=b"x" * (3 * 1024 * 1024),
                             headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert "error" in await resp.json()
    resp = await client.get("/v1/chat/completions")
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == 405
    resp = await client.get("/nope")
    assert resp.status == 404
    resp = await client.post("/", data=b"\xff\xfe\xfa")
    assert resp.status == 400


@pytest.mark.parametrize("header,status", [
    (None, 401), ("wrong", 401), ("Bearer wrong", 401), ("Bearer", 401), ("", 401),
    ("secret", 200), ("Bearer secret", 200), ("bearer secret", 200), ("Secret", 401),
])
async def test_auth_forms(make_client, served_engine, header, status):
    client = await make_client(served_engine, token="secret")
    headers = {} if header is None else {"Authorization": header}
    assert (await client.get("/v1/models", headers=headers)).status == status
    resp = await client.post("/", json={"prompt": "hi", "max_new_tokens": 2, "use_stream_chat": False},
                             headers=headers)
    assert resp.status == status
    body = await resp.json()
    if status == 401:
        assert body["error"]["type"] == "authentication_error"
    else:
        assert "response" in body


async def test_auth_covers_websocket_and_leaves_health_and_page_open(make_client, served_engine):
    import aiohttp

    client = await make_client(served_engine, token="secret")
    assert (await client.get("/health")).status == 200
    assert (await client.get("/ready")).status == 200          # readiness is open too (probes, gateways)
    assert (await client.get("/webui")).status == 200
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws")
    assert info.value.status == 401
    ws = await client.ws_connect("/ws", headers={"Authorization": "secret"})
    await ws.close()
    import base64
    sub = "berth-token." + base64.urlsafe_b64encode(b"secret").decode().rstrip("=")
    ws = await client.ws_connect("/ws", protocols=("berth", sub))
    assert ws.protocol == "berth"
    await ws.close()
    resp = await client.get("/v1/models", headers=[("Authorization", "secret"), ("Authorization", "secret")])
    assert resp.status in (400, 401)


async def test_sse_disconnect_aborts_generation(make_client, served_engine):
    client = await make_client(served_engine)
    resp = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Write a very long story."}], "stream": True,
        "max_tokens": 2000, "ignore_eos": True})
    await read_sse_then_close(resp, 3)
    await wait_idle(served_engine, timeout=5)


async def test_nul_stream_and_non_stream_disconnects_abort(make_client, served_engine):
    import asyncio

    client = await make_client(served_engine)
    resp = await client.post("/", json={"prompt": "Write a very long story.", "max_new_tokens": 2000})
    await resp.content.readuntil(b"\0")
    resp.close()
    await wait_idle(served_engine, timeout=5)
    task = asyncio.create_task(client.post("/v1/completions", json={"prompt": "Once upon a time",
                                                                    "max_tokens": 2000, "ignore_eos": True}))
    await asyncio.sleep(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(served_engine, timeout=5)
