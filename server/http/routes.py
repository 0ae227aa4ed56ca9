"""Thin route handlers: bytes -> protocol parse -> engine.generate -> one streaming loop or a collector."""
from __future__ import annotations

import time
from pathlib import Path

import orjson
from aiohttp import hdrs, web

from protocol import eas, openai
from protocol.errors import ProtocolError
from server.http import keys
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
    events = _submit(request, parsed.request, parsed.request.messages)
    if parsed.stream:
        renderer = openai.ChatStreamRenderer(rid, model, created, n, parsed.include_usage, parsed.tools)
        return await write_stream(request, events, renderer, SSE)
    return json_response(await collect(events, openai.ChatCollector(rid, model, created, n, parsed.tools),
                                       trace_of(request)))


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
    events = _submit(request, parsed.request, parsed.prompt)
    if parsed.stream:
        renderer = eas.EasStreamRenderer(parsed.prompt, parsed.history)
        return await write_stream(request, events, renderer, "application/octet-stream")
    return json_response(await collect(events, eas.EasCollector(parsed.prompt, parsed.history),
                                       trace_of(request)))


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


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[keys.STATE].metrics.render()
    resp = web.Response(body=body)
    resp.headers[hdrs.CONTENT_TYPE] = content_type
    return resp


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/health", health, name="health")
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
