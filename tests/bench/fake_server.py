"""A small aiohttp server speaking every berth calling method with known frames, split across writes."""
from __future__ import annotations

import asyncio
import json

from aiohttp import web

TOKEN = "secret"
MODE = web.AppKey("mode", str)
BODIES = web.AppKey("bodies", list)
WORDS = ["Hello", " wörld", " 🙂", " bye"]      # multi-byte characters on purpose


def _split(data: bytes, sizes=(1, 3, 7)) -> list[bytes]:
    """Cut data into small irregular pieces (inside lines, frames and UTF-8 characters)."""
    pieces, pos, i = [], 0, 0
    while pos < len(data):
        step = sizes[i % len(sizes)]
        pieces.append(data[pos:pos + step])
        pos, i = pos + step, i + 1
    return pieces


async def _write_split(resp: web.StreamResponse, data: bytes) -> None:
    for piece in _split(data):
        await resp.write(piece)
        await asyncio.sleep(0)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _authorized(request: web.Request) -> bool:
    return request.headers.get("Authorization") == f"Bearer {TOKEN}"


def _unauthorized() -> web.Response:
    return web.json_response({"error": {"message": "bad token", "type": "authentication_error",
                                        "param": None, "code": 401}}, status=401)


async def chat(request: web.Request) -> web.StreamResponse:
    if not _authorized(request):
        return _unauthorized()
    body = await request.json()
    request.app[BODIES].append(body)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    data = _sse({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
    for word in WORDS:
        data += _sse({"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]})
    data += _sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    data += _sse({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}})
    if request.app[MODE] == "cut":
        data = data[: len(data) // 2]
    else:
        data += b"data: [DONE]\n\n"
    await _write_split(resp, data)
    return resp


def _blade_chunk(text: str, num: int, finish: str = "", error_info=None) -> dict:
    return {"id": "x", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": 7, "completion_tokens": num, "total_tokens": 7 + num},
            "error_info": error_info}


async def completions(request: web.Request) -> web.StreamResponse:
    if not _authorized(request):
        return _unauthorized()
    request.app[BODIES].append(await request.json())
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    data = b"".join(_sse(_blade_chunk(word, i + 1)) for i, word in enumerate(WORDS))
    if request.app[MODE] == "error":
        data = _sse(_blade_chunk(WORDS[0], 1)) + _sse(_blade_chunk("", 1, "stop", {"message": "engine failed"}))
    else:
        data += _sse(_blade_chunk("", len(WORDS), "stop"))
    await _write_split(resp, data + b"data: [DONE]\n\n")
    return resp


async def eas(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await ws(request)
    if not _authorized(request):
        return _unauthorized()
    body = await request.json()
    request.app[BODIES].append(body)
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    await resp.prepare(request)
    data, answer = b"", ""
    for word in WORDS:
        answer += word
        frame = {"response": answer, "history": body.get("history", []) + [[body["prompt"], answer]]}
        data += json.dumps(frame, ensure_ascii=False).encode() + b"\0"
    if request.app[MODE] == "cut":
        data = data[:-3]
    await _write_split(resp, data)
    return resp


async def ws(request: web.Request) -> web.WebSocketResponse:
    if not _authorized(request):
        return _unauthorized()
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    num_rounds = 0
    async for msg in sock:
        message = json.loads(msg.data)
        request.app[BODIES].append(message)
        num_rounds += 1
        if request.app[MODE] == "error" and num_rounds == 2:
            await sock.send_str(json.dumps({"error": {"message": "bad field", "code": 400}}))
        else:
            for word in WORDS[: 1 + num_rounds]:
                await sock.send_str(word)
        await sock.send_str("<EOS>")
    return sock


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})


def make_app(mode: str = "ok") -> web.Application:
    """mode: ok | cut (stream ends early) | error (an error inside the stream)."""
    app = web.Application()
    app[MODE] = mode
    app[BODIES] = []
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/", eas)
    app.router.add_get("/ws", ws)
    app.router.add_get("/v1/models", models)
    return app
