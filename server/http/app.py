"""make_app(engine) -> web.Application: middlewares, routes, and the engine's lifetime."""
from __future__ import annotations

from aiohttp import web

from server.async_engine import AsyncEngine
from server.http import keys
from server.http.auth import TokenChecker, auth_middleware
from server.http.errors import error_middleware
from server.http.limits import guard_middleware
from server.http.metrics import Metrics
from server.http.routes import add_routes
from server.http.trace import access_middleware

MAX_BODY_BYTES = 2 * 1024 * 1024


def make_app(engine: AsyncEngine, served_names: list[str], token: str | None = None,
             max_body: int = MAX_BODY_BYTES, options: keys.ServerOptions | None = None,
             knowledge=None, reasoning=None) -> web.Application:
    """Middlewares, outermost first: access log + metrics (sees the final status), JSON errors,
    auth (401 before anything else is revealed), then drain / Origin / page headers."""
    options = options or keys.ServerOptions()
    checker = TokenChecker(token)
    app = web.Application(client_max_size=max_body, middlewares=[
        access_middleware, error_middleware, auth_middleware(checker, options.metrics_public),
        guard_middleware(checker.enabled)])
    metrics = Metrics(engine, served_names[0] if served_names else "")
    app[keys.STATE] = keys.ServerState(engine=engine, served_names=served_names, max_body=max_body,
                                       options=options, metrics=metrics, knowledge=knowledge,
                                       reasoning=reasoning)
    app.cleanup_ctx.append(_engine_lifetime)
    add_routes(app)
    return app


async def _engine_lifetime(app: web.Application):
    state = app[keys.STATE]
    state.engine.start()
    state.ready = True
    yield
    state.ready = False
    state.engine.stop()
