"""Typed application state (aiohttp AppKey)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from server.async_engine import AsyncEngine


@dataclass(slots=True)
class ServerState:
    engine: AsyncEngine
    served_names: list[str]
    max_body: int = 2 * 1024 * 1024
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False
    draining: bool = False


STATE = web.AppKey("state", ServerState)
