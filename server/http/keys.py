"""Typed application state (aiohttp AppKey) and the server's operational options."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from server.async_engine import AsyncEngine


@dataclass(slots=True)
class ServerOptions:
    """Limits and switches of one server (RELIABILITY.md §4 defaults)."""
    metrics_public: bool = False         # /metrics without the token
    log_prompts: bool = False            # access log lines may hold prompt text
    body_timeout: float = 60.0           # seconds to receive a request body → 408
    header_timeout: float = 10.0         # seconds from connect to a complete first request head
    stall_timeout: float = 60.0          # seconds a write may wait on a slow reader → abort
    drain_timeout: float = 30.0          # seconds in-flight requests get after SIGTERM
    max_connections: int = 1024          # open TCP connections; more are answered 503 and closed
    keepalive_timeout: float = 75.0
    ws_heartbeat: float = 20.0           # WS ping interval; no pong within half of it → closed (1006)
    ws_idle_timeout: float = 600.0       # a WS session with no frame and no round for this long → 1001
    allowed_hosts: frozenset[str] | None = None   # Host names served (lower case, no port); None: any


@dataclass(slots=True)
class ServerState:
    engine: AsyncEngine
    served_names: list[str]
    max_body: int = 2 * 1024 * 1024
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False
    draining: bool = False
    options: ServerOptions = field(default_factory=ServerOptions)
    metrics: object = None               # server.http.metrics.Metrics (set by make_app)
    sessions: set = field(default_factory=set)   # open WebSocket sessions (closed 1001 on drain)
    knowledge: object = None             # server.knowledge.KnowledgeBase, or None (no --knowledge)
    reasoning: object = None             # protocol.reasoning.ReasoningConfig: split <think> on chat, or None
    uploads: dict = field(default_factory=dict)  # task id -> server.http.knowledge_api.UploadTask


STATE = web.AppKey("state", ServerState)
