"""The `--engine transformers` path (EAS standard deployment) behind the same routes and contract."""
from __future__ import annotations

import orjson

from tests.conftest import CANADA, read_sse_then_close, wait_idle


async def test_transformers_engine_chat_stream_and_abort(make_client, hf_engine):
    client = await make_client(hf_engine)
    body = await (await client.post("/v1/chat/completions", json={
        "messages": CANADA, "temperature": 0, "max_tokens": 16})).json()
    assert "Ottawa" in body["choices"][0]["message"]["content"]
    assert body["usage"]["prompt_tokens"] > 0
    resp = await client.post("/v1/completions", json={"prompt": "Once upon a time", "stream": True,
                                                      "max_tokens": 500, "ignore_eos": True})
    await read_sse_then_close(resp, 2)
    await wait_idle(hf_engine, timeout=5)


async def test_transformers_engine_websocket_round(make_client, hf_engine):
    client = await make_client(hf_engine)
    ws = await client.ws_connect("/ws")
    await ws.send_str(orjson.dumps({"prompt": "What is the capital of Canada?", "temperature": 0,
                                    "max_new_tokens": 16}).decode())
    parts = []
    while (msg := await ws.receive_str()) != "<EOS>":
        parts.append(msg)
    await ws.close()
    assert "Ottawa" in "".join(parts)


def test_transformers_engine_reports_queue_time(hf_engine):
    """One job at a time: the second request's queue time covers the first one's generation."""
    from protocol.types import Finished, GenerateRequest, SamplingParams

    for rid in ("a", "b"):
        hf_engine.add(GenerateRequest(rid, SamplingParams(max_tokens=4, ignore_eos=True), prompt="Count to ten:"))
    finished = {}
    while hf_engine.has_unfinished():
        finished.update((rid, e) for rid, e in hf_engine.step() if isinstance(e, Finished))
    assert 0 <= finished["a"].queue_time < finished["b"].queue_time
