"""Admission guards in front of the routes: drain (503), a Host allowlist (403, against DNS rebinding),
cross-site Origin (403), page security headers, and at the socket level a connection cap and a header
deadline (aiohttp has neither).
"""
from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from protocol.errors import ProtocolError
from server.http import keys

log = logging.getLogger("berth.http")

DRAIN_EXEMPT = frozenset({"health", "ready", "metrics"})
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
PAGE_ROUTES = frozenset({"webui", "static", "root"})
ORIGIN_CHECKED = frozenset({"webui", "static", "root", "ws"})
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_REFUSAL_BODY = b'{"error":{"message":"too many open connections","type":"overloaded_error","param":null,"code":503}}'
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
           b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY))


def guard_middleware(token_enabled: bool):
    @web.middleware
    async def middleware(request: web.Request, handler):
        state = request.app[keys.STATE]
        name = getattr(request.match_info.route, "name", None)
        allowed = state.options.allowed_hosts
        if allowed is not None and host_name(request.headers.get(hdrs.HOST)) not in allowed:
            raise ProtocolError("unexpected Host header; start berth with --allowed-hosts to serve this name",
                                status=403)
        if state.draining and name not in DRAIN_EXEMPT:
            raise ProtocolError("the server is shutting down; retry on another replica", status=503,
                                retry_after=1)
        if token_enabled and name in ORIGIN_CHECKED and is_cross_site(request):
            raise ProtocolError("cross-site request refused", status=403)
        response = await handler(request)
        if name in PAGE_ROUTES and not response.prepared and not isinstance(response, web.WebSocketResponse):
            response.headers.update(PAGE_HEADERS)
        return response
    return middleware


def default_allowed_hosts(bind_host: str) -> frozenset[str] | None:
    """A loopback bind serves loopback names only: a page on another site whose name an attacker
    re-points at 127.0.0.1 (DNS rebinding) sends its own name as Host and is refused. Any other bind
    serves any Host unless --allowed-hosts names them."""
    return LOOPBACK_NAMES if bind_host.lower().strip("[]") in LOOPBACK_NAMES else None


def parse_allowed_hosts(spec: str | None, bind_host: str) -> frozenset[str] | None:
    """--allowed-hosts "a.example,b.example" (names, no ports), "*" for any; absent: by the bind."""
    if spec is None:
        return default_allowed_hosts(bind_host)
    names = {n.strip().lower().strip("[]") for n in spec.split(",") if n.strip()}
    return None if "*" in names else frozenset(names | LOOPBACK_NAMES)


def host_name(host: str | None) -> str:
    """The name of a Host header without its port, lower case: "[::1]:8000" -> "::1"."""
    host = (host or "").strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def is_cross_site(request: web.Request) -> bool:
    """An Origin header whose host:port differs from Host (browsers send Origin on WS upgrades)."""
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None:
        return False
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return True
    return not netloc or netloc.lower() != (request.headers.get(hdrs.HOST) or "").lower()


class ConnectionGuard:
    """Protocol factory around aiohttp's Server: caps open connections and closes any connection that
    has not sent a complete request head within header_timeout (Slowloris). Later requests on a
    kept-alive connection are bounded by keepalive_timeout."""

    def __init__(self, server: web.Server, max_connections: int, header_timeout: float):
        self.server = server
        self.max_connections = max_connections
        self.header_timeout = header_timeout

    def __call__(self) -> asyncio.Protocol:
        if len(self.server.connections) >= self.max_connections:
            return _Refuse()
        handler = self.server()
        asyncio.get_running_loop().call_later(self.header_timeout, _close_if_silent, handler)
        return handler


def _close_if_silent(handler) -> None:
    # aiohttp counts a request once its head is parsed (RequestHandler._request_count).
    if getattr(handler, "_request_count", 1) == 0 and handler.transport is not None:
        log.info("closing a connection that sent no complete request head in time")
        handler.force_close()


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(REFUSAL)
        transport.close()


class GuardedSite(web.TCPSite):
    """TCPSite whose listener hands connections to a ConnectionGuard."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, options: keys.ServerOptions):
        super().__init__(runner, host, port)
        self._options = options

    async def start(self) -> None:
        await web.BaseSite.start(self)
        guard = ConnectionGuard(self._runner.server, self._options.max_connections,
                                self._options.header_timeout)
        self._server = await asyncio.get_running_loop().create_server(
            guard, self._host, self._port, backlog=self._backlog, reuse_address=self._reuse_address)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port
