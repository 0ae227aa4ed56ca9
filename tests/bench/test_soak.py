"""bench/soak.py: its RSS drift arithmetic, its loss detection against a server that drops terminal
frames, and a short real soak against berth (nothing lost, nothing leaked)."""
from __future__ import annotations

import random

import pytest
from aiohttp import web

from bench import soak
from server.async_engine import AsyncEngine
from server.http.app import make_app


def test_rss_drift_is_a_slope_not_two_end_points():
    rng = random.Random(0)
    flat = [(t * 15.0, 3160 + rng.choice([-12, 0, 11, 60])) for t in range(40)]   # allocator swings
    flat[-1] = (flat[-1][0], 3220)                                                  # a high last sample
    drift = soak.rss_drift(flat, warmup_s=30)
    assert abs(drift["rss_drift_pct_per_hour"]) < 2
    assert drift["rss_mib_warm_min"] == 3148 and drift["rss_mib_warm_max"] == 3220
    growing = [(t * 60.0, 1000 + t) for t in range(10)]                              # +1 MiB a minute
    assert soak.rss_drift(growing, warmup_s=0)["rss_drift_pct_per_hour"] == pytest.approx(60 / 1004.5 * 100, rel=1e-3)
    assert soak.rss_drift(growing[:2], warmup_s=0)["rss_drift_pct_per_hour"] is None


def broken_app() -> web.Application:
    """Every transport ends without its terminal frame: no [DONE], no final NUL, no <EOS>."""
    async def sse(request):
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b'data: {"choices": []}\n\n')
        return resp

    async def nul(request):
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b'{"response": "partial"')
        return resp

    async def ws(request):
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        await sock.receive()
        await sock.send_str("half an answer")
        await sock.close()
        return sock

    async def metrics(request):
        return web.Response(text="process_resident_memory_bytes 1048576\nberth_kv_blocks_used 0\n")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", sse)
    app.router.add_post("/", nul)
    app.router.add_get("/ws", ws)
    app.router.add_get("/metrics", metrics)
    return app


def args_for(port: int, *extra: str):
    return soak.parse_args(["--url", f"http://127.0.0.1:{port}", "--streams", "4", "--max-requests", "16",
                            "--max-tokens", "4", "--sample-every", "0.5", "--warmup", "0", *extra])


async def test_soak_counts_streams_without_a_terminal_frame_as_lost(aiohttp_server):
    server = await aiohttp_server(broken_app())
    report = await soak.Soak(args_for(server.port, "--disconnect", "0")).run()
    assert report["requests"] == 16 and report["lost"] == 16
    assert {k.split(":")[1] for k in report["outcomes"]} == {"lost"}


async def test_short_soak_against_berth_loses_and_leaks_nothing(aiohttp_server, served_engine):
    server = await aiohttp_server(make_app(AsyncEngine(served_engine), ["m"], token="soak-token"))
    report = await soak.Soak(args_for(server.port, "--token", "soak-token", "--disconnect", "0.3",
                                      "--minutes", "0.5")).run()
    assert report["requests"] == 16 and report["lost"] == 0 and report["leaked_blocks"] == 0
    kinds = {k.split(":")[0] for k in report["outcomes"]}
    assert kinds == {"sse", "nul", "ws"}
    assert {k.split(":")[1] for k in report["outcomes"]} <= {"ok", "disconnected"}
    assert any(k.endswith(":disconnected") for k in report["outcomes"])
    assert report["rss_mib_start"] > 0
    assert not served_engine.has_unfinished() and served_engine.block_manager.num_used_blocks == 0
