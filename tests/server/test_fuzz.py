"""Property-based fuzzing of every POST route (RELIABILITY.md group A): no 5xx, JSON errors, server alive.

The server runs in a background thread over the session's real engine, with the operator cap
max_new_tokens=2 so that every accepted body generates at most two tokens."""
from __future__ import annotations

import asyncio
import json
import math
import os
import threading

import pytest
import requests
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.async_engine import AsyncEngine
from server.http.app import make_app

ROUTES = ["/v1/chat/completions", "/v1/completions", "/"]
NASTY_NUMBERS = [0, 1, 2, -1, 1.5, True, "10", 10**30, None, math.nan, math.inf, -math.inf, 1e999, 2**63]
FIELDS = ["model", "messages", "prompt", "stream", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
          "n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
          "do_sample", "ignore_eos", "history", "system_prompt", "use_stream_chat", "stream_options",
          "best_of", "prompt_logprobs", "stop_token_ids", "min_tokens", "logit_bias", "echo"]
# 60 examples per route in CI; BERTH_FUZZ_EXAMPLES=2000 for a longer run
SETTINGS = settings(max_examples=int(os.environ.get("BERTH_FUZZ_EXAMPLES", "60")), deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                      st.text(max_size=12), st.sampled_from(NASTY_NUMBERS))
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                        max_size=3), max_leaves=6)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x", 1]),
                                 "content": st.one_of(st.text(max_size=20), json_value)})
structured = st.fixed_dictionaries(
    {"max_tokens": st.sampled_from(NASTY_NUMBERS), "max_new_tokens": st.sampled_from(NASTY_NUMBERS)},
    optional={"messages": st.lists(message, max_size=3), "prompt": st.one_of(st.text(max_size=20), json_value),
              **{f: json_value for f in FIELDS if f not in ("messages", "prompt")}})


def encode(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode()   # Python's json writes NaN / Infinity


bodies = st.one_of(
    structured.map(encode),
    json_value.map(encode),
    st.binary(max_size=64),
    st.sampled_from([b"[" * 100000, b"{" * 50000, b'{"prompt": "\xff\xfe"}', b"\x00" * 10, b"",
                     b'{"messages": [{"role": "user", "content": "hi"}], "n": 1000000}']))


@pytest.fixture(scope="module")
def server_url(served_engine):
    """A real server in a thread (hypothesis drives it synchronously); generation capped at 2 tokens."""
    saved, served_engine.max_new_tokens = served_engine.max_new_tokens, 2
    loop = asyncio.new_event_loop()
    app = make_app(AsyncEngine(served_engine), ["SmolLM2-135M-Instruct"])
    runner = web.AppRunner(app, handler_cancellation=True)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{site.port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    served_engine.max_new_tokens = saved
    assert not served_engine.has_unfinished()
    assert served_engine.block_manager.num_used_blocks == 0


def check(resp: requests.Response) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == resp.status_code
        assert "Traceback" not in err["message"] and "0x" not in err["message"]


@SETTINGS
@given(route=st.sampled_from(ROUTES), body=bodies,
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", None]))
def test_fuzzed_bodies_never_5xx(server_url, route, body, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    check(requests.post(server_url + route, data=body, headers=headers, timeout=60))


@SETTINGS
@given(route=st.sampled_from(ROUTES + ["/v1/models", "/health", "/metrics", "/ws", "/nope"]),
       method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"]))
def test_fuzzed_methods_are_json_errors(server_url, route, method):
    resp = requests.request(method, server_url + route, timeout=30)
    check(resp)


def test_server_alive_and_idle_after_fuzzing(server_url, served_engine):
    import time

    resp = requests.post(server_url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert resp.status_code == 200
    assert requests.get(server_url + "/health", timeout=5).status_code == 200
    deadline = time.monotonic() + 10
    while served_engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not served_engine.has_unfinished()
    assert served_engine.block_manager.num_used_blocks == 0
