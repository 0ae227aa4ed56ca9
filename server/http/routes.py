"""Thin route handlers: bytes -> protocol parse -> engine.generate -> one streaming loop or a collector."""
from __future__ import annotations

import time
from pathlib import Path

import orjson
from aiohttp import hdrs, web

from protocol import eas, openai
from protocol.errors import ProtocolError
from server.http import keys, rag
from server.http.body import read_bytes, read_openai_json
from server.http.streaming import collect, trace_of, write_stream
from server.http.ws import websocket_session

STATIC_DIR = Path(__file__).parent / "static"
SSE = "text/event-stream"


def json_response(body: dict, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _submit(request: web.Request, parsed_request, prompt: object):
    """Hand the request to the engine (the trace notes the time and, for --log-prompts, the prompt)."""
    trace_of(request).submit(prompt)
    return request.app[keys.STATE].engine.generate(parsed_request)


async def models(request: web.Request) -> web.Response:
    state = request.app[keys.STATE]
    return json_response(openai.render_models(state.served_names, state.engine.max_model_len,
                                              state.created))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[keys.STATE]
    parsed = openai.parse_chat_request(await read_openai_json(request), trace_of(request).request_id)
    model = openai.check_model(parsed.model, state.served_names)
    rid, n, created = parsed.request.request_id, parsed.request.params.n, int(time.time())
    sources = await _chat_knowledge(state, parsed) if parsed.knowledge_top_k else None
    # a grammar-constrained answer has no reasoning block: the grammar applies from its first token
    reasoning = state.reasoning if parsed.request.constraint is None else None
    events = _submit(request, parsed.request, parsed.request.messages)
    if parsed.stream:
        renderer = openai.ChatStreamRenderer(rid, model, created, n, parsed.include_usage, parsed.tools, reasoning)
        renderer.sources = sources
        return await write_stream(request, events, renderer, SSE)
    collector = openai.ChatCollector(rid, model, created, n, parsed.tools, reasoning)
    collector.sources = sources
    return json_response(await collect(events, collector, trace_of(request)))


async def _chat_knowledge(state: keys.ServerState, parsed) -> list[dict]:
    """`"knowledge"` on chat: the last user message is the question, earlier user/assistant turns the history."""
    if parsed.tools is not None or parsed.request.tools:
        raise ProtocolError("knowledge cannot be combined with tools", status=400, param="knowledge")
    messages = parsed.request.messages
    if messages[-1]["role"] != "user":
        raise ProtocolError("knowledge: the last message must be the user's question", status=400,
                            param="knowledge")
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    history, question = [], None
    for m in messages[:-1]:
        if m["role"] == "user":
            question = m["content"]
        elif m["role"] == "assistant" and question is not None:
            history.append((question, m["content"]))
            question = None
    hits = await rag.retrieve(state, "knowledge", messages[-1]["content"], history[-1][0] if history else None,
                              parsed.knowledge_top_k)
    rag.augment(state, parsed.request, messages[-1]["content"], hits, history, system)
    return rag.sources(hits)


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[keys.STATE]
    parsed = openai.parse_completion_request(await read_openai_json(request), trace_of(request).request_id)
    model = openai.check_model(parsed.model, state.served_names)
    rid, n, created = parsed.request.request_id, parsed.request.params.n, int(time.time())
    events = _submit(request, parsed.request, parsed.request.prompt or parsed.request.prompt_token_ids)
    if parsed.stream:
        renderer = openai.CompletionStreamRenderer(rid, model, created, n, parsed.include_usage,
                                                   parsed.flavour)
        return await write_stream(request, events, renderer, SSE)
    return json_response(await collect(events, openai.CompletionCollector(rid, model, created, n),
                                       trace_of(request)))


async def eas_http(request: web.Request) -> web.StreamResponse:
    raw = await read_bytes(request)
    parsed = eas.parse_eas_request(raw, request.headers.get(hdrs.CONTENT_TYPE), trace_of(request).request_id)
    sources = None
    if parsed.langchain:
        state = request.app[keys.STATE]
        hits = await rag.retrieve(state, "langchain", parsed.prompt,
                                  parsed.history[-1][0] if parsed.history else None)
        system = next((m["content"] for m in parsed.request.messages if m["role"] == "system"), None)
        rag.augment(state, parsed.request, parsed.prompt, hits, [tuple(p) for p in parsed.history], system)
        sources = rag.sources(hits)
    events = _submit(request, parsed.request, parsed.prompt)
    if parsed.stream:
        renderer = eas.EasStreamRenderer(parsed.prompt, parsed.history, sources)
        return await write_stream(request, events, renderer, "application/octet-stream")
    return json_response(await collect(events, eas.EasCollector(parsed.prompt, parsed.history, sources),
                                       trace_of(request)))


async def root_get(request: web.Request) -> web.StreamResponse:
    if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
        return await websocket_session(request)
    return await webui(request)


async def webui(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def health(request: web.Request) -> web.Response:
    """Liveness: the process serves (draining included); 503 once the engine has failed (it exits next)."""
    state = request.app[keys.STATE]
    if state.engine.dead is not None:
        raise ProtocolError("the engine has failed", status=503)
    return json_response({"status": "draining" if state.draining else "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: the model is loaded and the server is not draining (a gateway or Kubernetes routes here)."""
    state = request.app[keys.STATE]
    if state.engine.dead is not None or state.draining or not state.ready:
        raise ProtocolError("draining" if state.draining else "not ready", status=503, retry_after=1)
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[keys.STATE].metrics.render()
    resp = web.Response(body=body)
    resp.headers[hdrs.CONTENT_TYPE] = content_type
    return resp


def add_routes(app: web.Application) -> None:
    from server.http.knowledge_api import add_knowledge_routes

    add_knowledge_routes(app)
    r = app.router
    r.add_get("/health", health, name="health")
    r.add_get("/ready", ready, name="ready")
    r.add_get("/metrics", metrics, name="metrics")
    r.add_get("/v1/models", models, name="models")
    r.add_post("/v1/chat/completions", chat_completions, name="chat")
    r.add_post("/v1/completions", completions, name="completions")
    r.add_post("/", eas_http, name="eas")
    r.add_get("/", root_get, name="root")
    r.add_get("/ws", websocket_session, name="ws")
    r.add_get("/webui", webui, name="webui")
    if STATIC_DIR.is_dir():
        r.add_static("/static", STATIC_DIR, name="static", follow_symlinks=False, show_index=False)
