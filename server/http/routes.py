"""Thin route handlers: bytes -> protocol parse -> engine.generate -> one streaming loop or a collector."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import orjson
from aiohttp import hdrs, web

from protocol import eas, openai
from protocol.errors import ProtocolError
from server.http import keys
from server.http.body import read_bytes, read_openai_json
from server.http.streaming import collect, write_stream
from server.http.ws import websocket_session

STATIC_DIR = Path(__file__).parent / "static"
SSE = "text/event-stream"


def json_response(body: dict, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _new_id(prefix: str) -> str:
    return uuid.uuid4().hex   # renderers add their own "chatcmpl-" / "cmpl-" prefixes


async def models(request: web.Request) -> web.Response:
    state = request.app[keys.STATE]
    return json_response(openai.render_models(state.served_names, state.engine.max_model_len,
                                              state.created))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[keys.STATE]
    parsed = openai.parse_chat_request(await read_openai_json(request), _new_id("chatcmpl"))
    model = openai.check_model(parsed.model, state.served_names)
    rid, n, created = parsed.request.request_id, parsed.request.params.n, int(time.time())
    events = state.engine.generate(parsed.request)
    if parsed.stream:
        renderer = openai.ChatStreamRenderer(rid, model, created, n, parsed.include_usage)
        return await write_stream(request, events, renderer, SSE)
    return json_response(await collect(events, openai.ChatCollector(rid, model, created, n)))


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[keys.STATE]
    parsed = openai.parse_completion_request(await read_openai_json(request), _new_id("cmpl"))
    model = openai.check_model(parsed.model, state.served_names)
    rid, n, created = parsed.request.request_id, parsed.request.params.n, int(time.time())
    events = state.engine.generate(parsed.request)
    if parsed.stream:
        renderer = openai.CompletionStreamRenderer(rid, model, created, n, parsed.include_usage,
                                                   parsed.flavour)
        return await write_stream(request, events, renderer, SSE)
    return json_response(await collect(events, openai.CompletionCollector(rid, model, created, n)))


async def eas_http(request: web.Request) -> web.StreamResponse:
    state = request.app[keys.STATE]
    raw = await read_bytes(request)
    parsed = eas.parse_eas_request(raw, request.headers.get(hdrs.CONTENT_TYPE), _new_id("eas"))
    events = state.engine.generate(parsed.request)
    if parsed.stream:
        renderer = eas.EasStreamRenderer(parsed.prompt, parsed.history)
        return await write_stream(request, events, renderer, "application/octet-stream")
    return json_response(await collect(events, eas.EasCollector(parsed.prompt, parsed.history)))


async def root_get(request: web.Request) -> web.StreamResponse:
    if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
        return await websocket_session(request)
    return await webui(request)


async def webui(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def health(request: web.Request) -> web.Response:
    state = request.app[keys.STATE]
    if state.engine.dead is not None or state.draining or not state.ready:
        raise ProtocolError("not ready" if not state.ready else "unavailable", status=503)
    return json_response({"status": "ok"})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/health", health, name="health")
    r.add_get("/v1/models", models, name="models")
    r.add_post("/v1/chat/completions", chat_completions, name="chat")
    r.add_post("/v1/completions", completions, name="completions")
    r.add_post("/", eas_http, name="eas")
    r.add_get("/", root_get, name="root")
    r.add_get("/ws", websocket_session, name="ws")
    r.add_get("/webui", webui, name="webui")
    if STATIC_DIR.is_dir():
        r.add_static("/static", STATIC_DIR, name="static", follow_symlinks=False, show_index=False)
