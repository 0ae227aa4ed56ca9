"""One async client per calling method of berth (PROTOCOLS.md); each times one generation.

Timing follows vLLM's benchmark clients: ttft is send -> first chunk carrying text, itl holds the
gaps between later text chunks, latency is send -> end of stream. Every client returns a
RequestResult and never raises for a failed request: the failure is recorded by kind.
"""
from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

from protocol.nul import NulDecoder
from protocol.sse import SseDecoder

EOS_FRAME = "<EOS>"


class ErrorKind(str, enum.Enum):
    HTTP = "http"              # a non-200 status
    TIMEOUT = "timeout"
    CONNECTION = "connection"  # refused, reset, closed mid-stream
    PROTOCOL = "protocol"      # bad framing, an error frame/chunk, a stream cut short


class StreamError(Exception):
    """The server broke its wire format or reported an error inside the stream."""


@dataclass(slots=True)
class RequestResult:
    """One timed generation. Times are seconds; chunk_times are offsets from the send, one per
    chunk that carried text. prompt/output tokens come from the server's usage when it gives them."""
    success: bool = False
    error_kind: ErrorKind | None = None
    error: str = ""
    status: int | None = None
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)
    text: str = ""
    round_index: int | None = None
    start_time: float = 0.0           # time.perf_counter() at the send
    tag: str = "free"                 # "constrained" when the request carried a StructuredSpec

    def add_text(self, delta: str, now: float) -> None:
        if not delta:
            return
        offset = now - self.start_time
        if self.ttft is None:
            self.ttft = offset
        else:
            self.itl.append(offset - self.chunk_times[-1])
        self.chunk_times.append(offset)
        self.text += delta

    def fail(self, kind: ErrorKind, error: str) -> None:
        self.success = False
        self.error_kind = kind
        self.error = error[:500]


@dataclass(slots=True)
class Target:
    """Where and how to call: base URL (http://host:port), served model name (None: omit the
    field), token, per-request timeout, and an optional tokenizer count for servers without usage."""
    base_url: str
    model: str | None = None
    token: str | None = None
    timeout_s: float = 600.0
    ignore_eos: bool = True
    count_tokens: Callable[[str], int] | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path

    def count(self, text: str, fallback: int) -> int:
        return self.count_tokens(text) if self.count_tokens is not None else fallback


History = list[tuple[str, str]]   # earlier (question, answer) rounds of the same conversation

CONSTRAINED, FREE = "constrained", "free"


@dataclass(frozen=True, slots=True)
class StructuredSpec:
    """A constraint the bench puts on a request: a JSON schema (response_format json_schema on
    chat, EAS and WebSocket; structured_outputs.json on completions) or an OpenAI tools list sent
    with tool_choice "required" (chat only)."""
    schema: dict | None = None
    tools: list | None = None
    name: str = "bench"

    def fields(self, method: str) -> dict:
        """The body fields for one calling method; ValueError for tools off the chat route."""
        if self.tools is not None:
            if method != "chat":
                raise ValueError(f"tools are only sent on the chat method, not {method!r}")
            return {"tools": self.tools, "tool_choice": "required"}
        if self.schema is None:
            return {}
        if method == "completions":
            return {"structured_outputs": {"json": self.schema}}
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": self.name, "schema": self.schema}}}


def _finish(result: RequestResult, target: Target, prompt_text: str, usage: dict | None) -> None:
    result.latency = time.perf_counter() - result.start_time
    if usage and usage.get("completion_tokens") is not None:
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        result.output_tokens = int(usage["completion_tokens"])
    else:
        result.prompt_tokens = target.count(prompt_text, len(prompt_text.split()))
        result.output_tokens = target.count(result.text, len(result.chunk_times)) if result.text else 0
    result.success = result.error_kind is None


async def _guard(result: RequestResult, body) -> RequestResult:
    """Run body() and turn every failure into an error kind on result."""
    try:
        await body()
    except asyncio.TimeoutError:
        result.fail(ErrorKind.TIMEOUT, "timed out")
    except aiohttp.ClientResponseError as exc:       # e.g. a WebSocket handshake answered 401
        result.status = exc.status
        result.fail(ErrorKind.HTTP, f"HTTP {exc.status}: {exc.message}")
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        result.fail(ErrorKind.CONNECTION, f"{type(exc).__name__}: {exc}")
    except (StreamError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        result.fail(ErrorKind.PROTOCOL, f"{type(exc).__name__}: {exc}")
    if result.error_kind is not None:
        result.latency = time.perf_counter() - result.start_time
    return result


async def _check_status(resp: aiohttp.ClientResponse, result: RequestResult) -> bool:
    if resp.status == 200:
        return True
    result.status = resp.status
    body = (await resp.content.read(2048)).decode("utf-8", "replace")
    result.fail(ErrorKind.HTTP, f"HTTP {resp.status}: {body}")
    return False


def _raise_on_error(payload: dict) -> None:
    if payload.get("error"):
        raise StreamError(f"error in stream: {orjson.dumps(payload['error']).decode()}")
    if payload.get("error_info"):
        raise StreamError(f"error_info in stream: {orjson.dumps(payload['error_info']).decode()}")


async def _sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[float, dict | None]]:
    """(receive time, payload) per SSE event; payload None for [DONE], which ends the stream."""
    decoder = SseDecoder()
    async for chunk in resp.content.iter_any():
        now = time.perf_counter()
        for data in decoder.feed(chunk):
            if data.strip() == "[DONE]":
                yield now, None
                return
            payload = orjson.loads(data)
            if not isinstance(payload, dict):
                raise StreamError("SSE event is not a JSON object")
            _raise_on_error(payload)
            yield now, payload


async def _stream_openai(http: aiohttp.ClientSession, target: Target, path: str, body: dict,
                         prompt_text: str, text_of: Callable[[dict], str]) -> RequestResult:
    result = RequestResult(start_time=time.perf_counter())

    async def run() -> None:
        usage, ended = None, False
        timeout = aiohttp.ClientTimeout(total=target.timeout_s)
        async with http.post(target.url(path), json=body, headers=target.headers(), timeout=timeout) as resp:
            if not await _check_status(resp, result):
                return
            async for now, payload in _sse_events(resp):
                if payload is None:
                    ended = True
                    break
                choices = payload.get("choices") or []
                if choices:
                    result.add_text(text_of(choices[0]) or "", now)
                    ended = ended or bool(choices[0].get("finish_reason"))
                usage = payload.get("usage") or usage
        if not ended:
            raise StreamError("stream ended without finish_reason or [DONE]")
        _finish(result, target, prompt_text, usage)

    return await _guard(result, run)


def _sampling(target: Target, output_len: int, max_field: str = "max_tokens") -> dict:
    body: dict = {max_field: output_len, "temperature": 0}
    if target.model:
        body["model"] = target.model
    if target.ignore_eos:
        body["ignore_eos"] = True
    return body


def chat_delta_text(choice: dict) -> str:
    """The text a chat chunk's choice carries: delta.content plus the function.arguments fragments
    of delta.tool_calls (a tool-call answer streams its text there, content stays empty)."""
    delta = choice.get("delta") or {}
    text = delta.get("content") or ""
    for call in delta.get("tool_calls") or ():
        text += (call.get("function") or {}).get("arguments") or ""
    return text


async def openai_chat(http: aiohttp.ClientSession, target: Target, prompt: str, output_len: int,
                      history: History = (), constraint: StructuredSpec | None = None) -> RequestResult:
    """POST /v1/chat/completions, SSE, usage requested; history becomes earlier messages."""
    messages = []
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": prompt})
    body = _sampling(target, output_len) | {
        "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    if constraint is not None:
        body |= constraint.fields("chat")
    text = "\n".join(m["content"] for m in messages)
    return await _stream_openai(http, target, "/v1/chat/completions", body, text, chat_delta_text)


async def openai_completions(http: aiohttp.ClientSession, target: Target, prompt: str, output_len: int,
                             history: History = (), constraint: StructuredSpec | None = None) -> RequestResult:
    """POST /v1/completions, SSE. Works for OpenAI chunks (usage in a last chunk) and BladeLLM
    chunks (cumulative usage on every chunk, error_info on failure): the last usage seen wins."""
    text = "".join(f"{q}\n{a}\n" for q, a in history) + prompt
    body = _sampling(target, output_len) | {
        "prompt": text, "stream": True, "stream_options": {"include_usage": True}}
    if constraint is not None:
        body |= constraint.fields("completions")
    return await _stream_openai(http, target, "/v1/completions", body, text,
                                lambda choice: choice.get("text"))


def _eas_body(target: Target, prompt: str, output_len: int, history: History,
              constraint: StructuredSpec | None = None, method: str = "eas") -> dict:
    body = {"prompt": prompt, "history": [list(pair) for pair in history], "max_new_tokens": output_len,
            "use_stream_chat": True, "temperature": 0, "do_sample": False}
    if target.ignore_eos:
        body["ignore_eos"] = True
    if constraint is not None:
        body |= constraint.fields(method)
    return body


async def eas_http(http: aiohttp.ClientSession, target: Target, prompt: str, output_len: int,
                   history: History = (), constraint: StructuredSpec | None = None) -> RequestResult:
    """POST / (EAS structured request) with use_stream_chat: NUL-delimited cumulative
    {"response", "history"} frames; each frame's new suffix is the delta."""
    result = RequestResult(start_time=time.perf_counter())
    prompt_text = "".join(f"{q}\n{a}\n" for q, a in history) + prompt

    async def run() -> None:
        decoder, num_frames = NulDecoder(), 0
        timeout = aiohttp.ClientTimeout(total=target.timeout_s)
        async with http.post(target.url("/"), json=_eas_body(target, prompt, output_len, history, constraint),
                             headers=target.headers(), timeout=timeout) as resp:
            if not await _check_status(resp, result):
                return
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                for frame in decoder.feed(chunk):
                    _raise_on_error(frame)
                    answer = frame["response"]
                    if not isinstance(answer, str):
                        raise StreamError("response is not a string")
                    delta = answer[len(result.text):] if answer.startswith(result.text) else answer
                    result.add_text(delta, now)
                    num_frames += 1
        if decoder.pending or num_frames == 0:
            raise StreamError("stream ended inside a frame" if decoder.pending else "no frame received")
        _finish(result, target, prompt_text, None)

    return await _guard(result, run)


def ws_url(base_url: str) -> str:
    url = base_url.rstrip("/")
    url = "ws" + url[4:] if url.startswith("http") else url
    return url + "/ws"


async def _ws_round(ws: aiohttp.ClientWebSocketResponse, target: Target, result: RequestResult,
                    message: dict) -> None:
    await ws.send_str(orjson.dumps(message).decode())
    async with asyncio.timeout(target.timeout_s):
        while True:
            msg = await ws.receive()
            now = time.perf_counter()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                raise aiohttp.ClientConnectionError(f"websocket closed mid-round ({msg.type.name})")
            data = msg.data.decode("utf-8") if msg.type == aiohttp.WSMsgType.BINARY else msg.data
            if data == EOS_FRAME:
                return
            if data.startswith('{"error"'):
                _raise_on_error(orjson.loads(data))
            result.add_text(data, now)


async def websocket_session(http: aiohttp.ClientSession, target: Target, prompts: list[str],
                            output_len: int, constraint: StructuredSpec | None = None) -> list[RequestResult]:
    """One WebSocket connection to /ws, one round per prompt, the next sent after <EOS>; one
    RequestResult per round (round_index set). After a failed round the rest fail the same way.
    A constraint rides on every round's message (response_format applies to that round only)."""
    results: list[RequestResult] = []
    history: list[tuple[str, str]] = []
    if not prompts:
        return results

    async def run() -> None:
        async with http.ws_connect(ws_url(target.base_url), headers=target.headers(),
                                   timeout=aiohttp.ClientWSTimeout(ws_close=5.0)) as ws:
            for index, prompt in enumerate(prompts):
                result = RequestResult(round_index=index, start_time=time.perf_counter())
                results.append(result)
                message = _eas_body(target, prompt, output_len, [], constraint, "ws") | {"use_stream_chat": True}
                message.pop("history")
                await _guard(result, lambda: _ws_round(ws, target, result, message))
                if result.error_kind is not None:
                    return
                prompt_text = "".join(f"{q}\n{a}\n" for q, a in history) + prompt
                _finish(result, target, prompt_text, None)
                history.append((prompt, result.text))

    first = RequestResult(round_index=0, start_time=time.perf_counter())
    await _guard(first, run)   # a failed connect or handshake lands on the first round
    if not results:
        results.append(first)
    return _fill_failed(results, len(prompts))


def _fill_failed(results: list[RequestResult], num_rounds: int) -> list[RequestResult]:
    last = results[-1]
    for index in range(len(results), num_rounds):
        results.append(RequestResult(error_kind=last.error_kind, error="earlier round failed",
                                     round_index=index, start_time=last.start_time))
    return results
