"""The knowledge base through every route (in-process app, default model, a private SQLite store):
PAI-RAG's upload/state/query routes, documents list/delete, `langchain: true` on POST / (JSON and NUL
stream) and WebSocket rounds, `"knowledge"` on chat completions, and the 400s without a knowledge base."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from protocol.nul import NulDecoder
from protocol.sse import SseDecoder
from tests.conftest import KNOWLEDGE_DIR, wait_idle

SHORT = {"temperature": 0, "max_new_tokens": 24}


@pytest.fixture
def knowledge(tmp_path, served_engine):
    from server.knowledge import KnowledgeBase

    hf = served_engine.tokenizer.hf
    kb = KnowledgeBase.open(str(tmp_path / "kb.sqlite3"), tmp_path,
                            count_tokens=lambda t: len(hf.encode(t, add_special_tokens=False)))
    added, errors = kb.index_dir(KNOWLEDGE_DIR)
    assert {d.name for d in added} == {"mnn.md", "berth-ports.txt"} and not errors
    yield kb
    kb.close()


@pytest.fixture
def kb_client(aiohttp_client, served_engine, knowledge):
    from server.async_engine import AsyncEngine
    from server.http.app import make_app

    async def make(token: str | None = None, with_kb: bool = True):
        app = make_app(AsyncEngine(served_engine), ["SmolLM2-135M-Instruct"], token=token,
                       knowledge=knowledge if with_kb else None)
        return await aiohttp_client(app)
    return make


async def wait_task(client, task_id: str, headers=None) -> dict:
    for _ in range(200):
        state = await (await client.get(f"/api/v1/get_upload_state?task_id={task_id}", headers=headers)).json()
        if state["status"] in ("completed", "failed"):
            return state
        await asyncio.sleep(0.05)
    raise AssertionError("indexing did not finish")


async def test_upload_list_query_and_delete(kb_client):
    client = await kb_client()
    form = aiohttp.FormData()
    form.add_field("files", b"Zorblax is the capital of the planet Quenta. It has nine moons.",
                   filename="quenta.txt", content_type="text/plain")
    form.add_field("files", b"MZ\x90\x00binary", filename="tool.exe", content_type="application/octet-stream")
    form.add_field("files", b"", filename="empty.txt", content_type="text/plain")
    form.add_field("files", b'{"text": "The Quenta sea is green."}', filename="sea.json",
                   content_type="application/json")
    resp = await client.post("/api/v1/upload_data", data=form)
    assert resp.status == 200
    state = await wait_task(client, (await resp.json())["task_id"])
    assert state["status"] == "completed" and sorted(state["documents"]) == ["quenta.txt", "sea.json"]
    assert sorted(e["file"] for e in state["errors"]) == ["empty.txt", "tool.exe"]
    resp = await client.post("/api/v1/upload_data", json={"name": "notes/../moons.md",
                                                          "text": "Quenta's largest moon is Vel."})
    state = await wait_task(client, (await resp.json())["task_id"])
    assert state["documents"] == ["moons.md"]               # the base name only
    docs = await (await client.get("/api/v1/documents")).json()
    assert {d["name"] for d in docs["documents"]} == {"mnn.md", "berth-ports.txt", "quenta.txt", "sea.json",
                                                      "moons.md"}
    hits = (await (await client.post("/api/v1/query/retrieval",
                                     json={"question": "What is the capital of Quenta?", "top_k": 2})).json())["docs"]
    assert hits[0]["metadata"]["file_name"] == "quenta.txt" and "Zorblax" in hits[0]["text"]
    assert len(hits) <= 2 and hits[0]["score"] >= hits[-1]["score"]
    body = await (await client.post("/api/v1/query", json={"question": "What is the capital of Quenta?",
                                                           **SHORT})).json()
    assert body["answer"] and body["docs"][0]["metadata"]["file_name"] == "quenta.txt"
    assert (await client.delete("/api/v1/documents/quenta.txt")).status == 200
    assert (await client.delete("/api/v1/documents/quenta.txt")).status == 404
    hits = (await (await client.post("/api/v1/query/retrieval", json={"question": "Zorblax capital"})).json())["docs"]
    assert all(h["metadata"]["file_name"] != "quenta.txt" for h in hits)
    assert (await client.get("/api/v1/get_upload_state?task_id=nope")).status == 404


async def test_eas_langchain_answers_with_sources_json_and_stream(kb_client, served_engine):
    client = await kb_client()
    plain = await (await client.post("/", json={"prompt": "Can you tell me what's the MNN?",
                                                "use_stream_chat": False, **SHORT})).json()
    body = await (await client.post("/", json={"prompt": "Can you tell me what's the MNN?", "langchain": True,
                                               "use_stream_chat": False, **SHORT})).json()
    assert body["sources"][0]["doc"] == "mnn.md" and body["sources"][0]["chunk_id"].endswith(":0")
    assert body["history"] == [["Can you tell me what's the MNN?", body["response"]]]
    assert body["response"] != plain["response"]                      # the sources changed the prompt
    resp = await client.post("/", json={"prompt": "Can you tell me what's the MNN?", "langchain": True, **SHORT})
    decoder, frames = NulDecoder(), []
    async for chunk in resp.content.iter_any():
        frames += decoder.feed(chunk)
    assert frames[-1]["response"] == body["response"]                 # greedy: same answer streamed
    assert all(f["sources"] == body["sources"] for f in frames)
    await wait_idle(served_engine)


async def test_websocket_langchain_round_ends_with_sources(kb_client, served_engine):
    client = await kb_client()
    ws = await client.ws_connect("/ws")
    for stream in (True, False):
        await ws.send_str(json.dumps({"prompt": "Can you tell me what's the MNN?", "langchain": True,
                                      "use_stream_chat": stream, **SHORT}))
        frames = []
        while (msg := await ws.receive_str()) != "<EOS>":
            frames.append(msg)
        assert "Sources: [1] mnn.md #0" in frames[-1]
        assert not frames[-1].startswith("{")
    await ws.send_str(json.dumps({"prompt": "And who develops it?", "langchain": True, **SHORT}))
    while (await ws.receive_str()) != "<EOS>":
        pass
    await ws.close()
    await wait_idle(served_engine)


async def test_chat_knowledge_extension_returns_sources(kb_client, served_engine):
    client = await kb_client()
    ask = {"messages": [{"role": "user", "content": "Which port does berth listen on?"}], "temperature": 0,
           "max_tokens": 24}
    plain = await (await client.post("/v1/chat/completions", json=ask)).json()
    body = await (await client.post("/v1/chat/completions", json={**ask, "knowledge": {"top_k": 1}})).json()
    assert body["sources"] == [{"doc": "berth-ports.txt", "chunk_id": body["sources"][0]["chunk_id"],
                                "score": body["sources"][0]["score"]}]
    assert body["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 20     # the chunk is in the prompt
    resp = await client.post("/v1/chat/completions", json={**ask, "knowledge": True, "stream": True})
    decoder, chunks = SseDecoder(), []
    async for data in resp.content.iter_any():
        chunks += [json.loads(p) for p in decoder.feed(data) if p != "[DONE]"]
    assert chunks[0]["sources"][0]["doc"] == "berth-ports.txt"
    assert all("sources" not in c for c in chunks[1:])
    await wait_idle(served_engine)


async def test_without_a_knowledge_base_requests_get_clear_400s(kb_client, served_engine):
    client = await kb_client(with_kb=False)
    resp = await client.post("/", json={"prompt": "What's MNN?", "langchain": True, **SHORT})
    body = await resp.json()
    assert resp.status == 400 and body["error"]["param"] == "langchain" and "--knowledge" in body["error"]["message"]
    resp = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                          "knowledge": True})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "knowledge"
    assert (await client.get("/api/v1/documents")).status == 400
    ws = await client.ws_connect("/ws")
    await ws.send_str(json.dumps({"prompt": "What's MNN?", "langchain": True}))
    error = json.loads(await ws.receive_str())
    assert error["error"]["code"] == 400 and await ws.receive_str() == "<EOS>"
    await ws.close()
    await wait_idle(served_engine)


async def test_knowledge_routes_need_the_token_and_bound_uploads(kb_client, monkeypatch):
    from server.http import knowledge_api

    client = await kb_client(token="s3cret")
    assert (await client.get("/api/v1/documents")).status == 401
    form = aiohttp.FormData()
    form.add_field("files", b"x", filename="a.txt")
    assert (await client.post("/api/v1/upload_data", data=form)).status == 401
    auth = {"Authorization": "Bearer s3cret"}
    assert (await client.get("/api/v1/documents", headers=auth)).status == 200
    monkeypatch.setattr(knowledge_api, "MAX_FILE_BYTES", 1000)
    form = aiohttp.FormData()
    form.add_field("files", b"word " * 400, filename="big.txt")
    resp = await client.post("/api/v1/upload_data", data=form, headers=auth)
    assert resp.status == 413 and "big.txt" in (await resp.json())["error"]["message"]
