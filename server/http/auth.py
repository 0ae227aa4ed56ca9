"""Token auth: default-deny, constant time, decided on the matched route, never on a URL string.

Accepted forms: `Authorization: <token>`, `Authorization: Bearer <token>` (scheme case-insensitive), and
for browsers' WebSockets a `Sec-WebSocket-Protocol` value `berth-token.<base64url(token)>`.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from aiohttp import hdrs, web

from protocol.errors import ProtocolError

PUBLIC_ROUTES = frozenset({"health", "ready", "webui", "static", "root"})   # root: the page, or WS (checked there)
TOKEN_SUBPROTOCOL = "berth-token."


class TokenChecker:
    def __init__(self, token: str | None):
        self._digest = hashlib.sha256(token.encode()).digest() if token else None

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def matches(self, candidate: str) -> bool:
        if self._digest is None:
            return True
        return hmac.compare_digest(hashlib.sha256(candidate.encode()).digest(), self._digest)

    def check(self, request: web.Request) -> None:
        """Raise 401 unless the request carries the token (or no token is configured)."""
        if self._digest is None:
            return
        values = request.headers.getall(hdrs.AUTHORIZATION, [])
        if len(values) > 1:
            raise ProtocolError("more than one Authorization header", status=400)
        if values and self.matches(_strip_scheme(values[0])):
            return
        if not values and (sub := ws_token(request)) is not None and self.matches(sub):
            return
        raise ProtocolError("Invalid or missing token in the Authorization header", status=401)


def _strip_scheme(value: str) -> str:
    scheme, _, rest = value.strip().partition(" ")
    return rest.strip() if scheme.lower() == "bearer" and rest else value.strip()


def ws_token(request: web.Request) -> str | None:
    for proto in request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(","):
        proto = proto.strip()
        if proto.startswith(TOKEN_SUBPROTOCOL):
            raw = proto[len(TOKEN_SUBPROTOCOL):]
            try:
                return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return ""
    return None


def auth_middleware(checker: TokenChecker, metrics_public: bool = False):
    public = PUBLIC_ROUTES | {"metrics"} if metrics_public else PUBLIC_ROUTES

    @web.middleware
    async def middleware(request: web.Request, handler):
        route = request.match_info.route
        name = getattr(route, "name", None)
        is_page = name == "root" and request.method in ("GET", "HEAD") and \
            request.headers.get(hdrs.UPGRADE, "").lower() != "websocket"
        if name not in public or (name == "root" and not is_page):
            checker.check(request)
        return await handler(request)
    return middleware
