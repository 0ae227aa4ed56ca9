"""RequestTrace: one request's timings and outcome -> metrics and ONE structured access-log line.

The access middleware opens a trace per HTTP request (and the WebSocket session one per round); the
transports call `on_event` for each engine event (the streaming loop, the collectors, WS rounds).
Logs never hold the Authorization header, and prompt text only with --log-prompts.
"""
from __future__ import annotations

import enum
import logging
import time
import uuid
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from protocol.types import Event, Failed, Finished, FinishReason, TokenDelta
from server.http import keys

access_log = logging.getLogger("berth.access")

TRACE = web.RequestKey("trace", object)
_PROTOCOLS = {"chat": "openai_chat", "completions": "openai_completions", "eas": "eas"}
_QUIET_ROUTES = frozenset({"health", "ready", "metrics", "static"})
MAX_LOGGED_PROMPT = 2000


class Outcome(str, enum.Enum):
    OK = "ok"                    # every choice finished (stop / length)
    ABORTED = "aborted"          # client gone, cancelled, or drained
    ERROR = "error"              # failed after admission, or a 5xx
    REJECTED = "rejected"        # 4xx before generation (bad input, auth, size)
    OVERLOADED = "overloaded"    # 429 / 503
    TIMEOUT = "timeout"          # body deadline or a stalled reader


@dataclass(slots=True)
class RequestTrace:
    protocol: str | None                       # None: not a generation request (not counted)
    route: str
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.monotonic)
    submitted: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    queue_time: float | None = None             # engine queue wait of choice 0 (its Finished event)
    failed: bool = False
    aborted: bool = False
    outcome: Outcome | None = None             # set early by a transport that knows better (timeout)
    prompt: str | None = None
    metrics: object = None                     # server.http.metrics.Metrics, or None
    log_prompts: bool = False

    def submit(self, prompt: object = None) -> None:
        """The request goes to the engine now."""
        self.submitted = time.monotonic()
        if self.metrics is not None:
            self.metrics.admission.observe(self.submitted - self.started)
        if prompt is not None:
            self.prompt = prompt if isinstance(prompt, str) else orjson.dumps(prompt).decode()

    def on_event(self, event: Event) -> None:
        """The hook every transport calls for each engine event it consumes."""
        if isinstance(event, TokenDelta):
            self._on_tokens(event, self.metrics)
        elif isinstance(event, Finished):
            if event.index == 0:
                self.num_prompt_tokens = event.usage.prompt_tokens
                self.queue_time = event.queue_time
                if self.metrics is not None:
                    self.metrics.prompt_tokens.inc(event.usage.prompt_tokens)
                    if event.queue_time is not None:
                        self.metrics.queue.observe(event.queue_time)
            self.aborted |= event.reason is FinishReason.ABORT
        elif isinstance(event, Failed):
            self.failed = True

    def _on_tokens(self, delta: TokenDelta, metrics) -> None:
        num = len(delta.token_ids)
        if not num:
            return
        now = time.monotonic()
        self.num_output_tokens += num
        if metrics is not None:
            metrics.generation_tokens.inc(num)
            if self.first_token_at is None:
                metrics.ttft.observe(now - (self.submitted or self.started))
            else:
                for _ in range(num):
                    metrics.itl.observe((now - self.last_token_at) / num)
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now

    def finish(self, status: int) -> None:
        """Count the request once and write its access-log line."""
        metrics = self.metrics
        outcome = self.outcome or _outcome(self, status)
        duration = time.monotonic() - self.started
        if metrics is not None and self.protocol is not None:
            metrics.requests.labels(self.protocol, outcome.value).inc()
            if self.submitted is not None:
                metrics.e2e.observe(duration)
        line = {"request_id": self.request_id, "route": self.route, "protocol": self.protocol,
                "status": status, "outcome": outcome.value, "prompt_tokens": self.num_prompt_tokens,
                "output_tokens": self.num_output_tokens, "duration_ms": round(duration * 1000, 1),
                "ttft_ms": None if self.first_token_at is None
                else round((self.first_token_at - self.started) * 1000, 1),
                "queue_ms": None if self.queue_time is None else round(self.queue_time * 1000, 1)}
        if self.log_prompts and self.prompt is not None:
            line["prompt"] = self.prompt[:MAX_LOGGED_PROMPT]
        level = logging.DEBUG if self.route in _QUIET_ROUTES else logging.INFO
        access_log.log(level, "%s", orjson.dumps(line).decode())


def _outcome(trace: RequestTrace, status: int) -> Outcome:
    if status in (429, 503):
        return Outcome.OVERLOADED
    if status == 408:
        return Outcome.TIMEOUT
    if status == 499 or trace.aborted and not trace.failed:
        return Outcome.ABORTED
    if status >= 500 or trace.failed:
        return Outcome.ERROR
    if status >= 400:
        return Outcome.REJECTED
    return Outcome.OK


def route_name(request: web.Request) -> str:
    return getattr(request.match_info.route, "name", None) or "unmatched"


@web.middleware
async def access_middleware(request: web.Request, handler):
    """Outermost: sees the final status (error middleware runs inside), a cancel (client gone)."""
    state = request.app[keys.STATE]
    name = route_name(request)
    trace = RequestTrace(_PROTOCOLS.get(name), name, metrics=state.metrics,
                         log_prompts=state.options.log_prompts)
    request[TRACE] = trace
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except BaseException:
        trace.aborted = True          # cancelled: the client went away (handler_cancellation)
        status = 499
        raise
    finally:
        trace.finish(status)
