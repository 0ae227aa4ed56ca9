"""RELIABILITY.md §3 groups A (bad input), B (authentication and exposure) and C (overload), where
test_routes.py, test_hardening*.py, test_fuzz.py and tests/protocol leave a gap:

A1-A3  truncated, non-object and non-UTF-8 bodies on every route, each a 400 in the OpenAI error shape
A4     100k nested `[`: a quick 400 on every JSON route (HTTP and WebSocket)
A5-A7  non-finite numbers, hostile max_tokens and over-cap counts over HTTP, naming the field
A8     prompt + max_tokens over the context, and a prompt the KV pool can never hold: 400, nothing allocated
A10    token ids at the vocabulary boundary
A11    a body one byte over client_max_size; a Content-Length shorter than the body
A12    a 100 KB header and 200 headers: aiohttp's 400 before routing, the server still serves
A13    stop-string caps; metacharacters are matched literally
A14    an unknown model over HTTP
B4     the token check takes as long for a key wrong in its first byte as in its last (KS test)
B5     two Authorization headers are never served
B6     injected faults leak no token, path, object repr or traceback
B7     a symlink out of the static root and a directory are refused
B8     a cross-site Origin on the WebSocket upgrade at `/` and on static files
C1     a burst over the queue cap: exactly one terminal response per request, accepted ones complete
C4     1000 pipelined requests on one connection: a bounded queue, the server serves all, then idles

Every test that reaches the engine ends with INV (the `build` fixture: nothing running or waiting,
every KV block free).
"""
from __future__ import annotations

import asyncio
import gc
import logging
import random
import time

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from protocol.errors import ProtocolError
from server.async_engine import AsyncEngine
from server.http.app import MAX_BODY_BYTES, make_app
from server.http.auth import TokenChecker
from tests.server.test_hardening import assert_inv, build, metric, read_sse  # noqa: F401 (build: fixture)

NAME = "SmolLM2-135M-Instruct"
JSON = {"Content-Type": "application/json"}
JSON_ROUTES = ["/v1/chat/completions", "/v1/completions", "/"]
CHAT = b'{"messages": [{"role": "user", "content": "Hi"}]'
COMPLETION = b'{"prompt": "Hi"'
EAS = b'{"prompt": "Hi", "use_stream_chat": false'


def assert_error(body: dict, status: int, type_: str = "invalid_request_error") -> dict:
    """The OpenAI error object of RELIABILITY.md's contract; returns it."""
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] == status and err["type"] == type_, err
    return err


def with_field(prefix: bytes, field: bytes) -> bytes:
    """A JSON object body: prefix (an unclosed object) + one more raw `"name": value` member."""
    return prefix + b", " + field + b"}"


async def canary(client) -> None:
    resp = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert resp.status == 200
    assert (await resp.json())["usage"]["completion_tokens"] == 2
    assert (await client.get("/health")).status == 200


async def raw_exchange(client, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes on a fresh connection; everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            chunks.append(chunk)
    except ConnectionResetError:      # the server may reset a connection it refused mid-upload
        pass
    finally:
        writer.close()
    return b"".join(chunks)


def split_response(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# --- A. Bad input -------------------------------------------------------------------------------------

async def test_a1_truncated_or_invalid_json_is_400_on_every_route(build, served_engine):
    client, _ = await build()
    bodies = [b'{"prompt": "Hi", "max_tokens": 2', b'{"messages": [{"role": "user", "content": "Hi"}',
              b"{bad json}", b'{"prompt": "Hi"}}', b'{"prompt": "Hi"} trailing', b"", b"\x00"]
    for route in JSON_ROUTES:
        for body in bodies:
            resp = await client.post(route, data=body, headers=JSON)
            assert resp.status == 400, (route, body)
            assert_error(await resp.json(), 400)
    await canary(client)
    await assert_inv(served_engine)


async def test_a2_non_object_json_is_400_and_a_bare_string_is_the_eas_prompt(build, served_engine, monkeypatch):
    monkeypatch.setattr(served_engine, "max_new_tokens", 2)     # the EAS STRING request asks for 2048
    client, _ = await build()
    for route in ("/v1/chat/completions", "/v1/completions"):
        for body in (b"[]", b'"x"', b"42", b"null", b"true", b'[{"prompt": "x"}]'):
            resp = await client.post(route, data=body, headers=JSON)
            assert resp.status == 400, (route, body)
            assert_error(await resp.json(), 400)
    for body in (b"[]", b"42", b"null", b"true", b'[{"prompt": "x"}]', b'""'):
        resp = await client.post("/", data=body, headers=JSON)
        assert resp.status == 400, body
        assert_error(await resp.json(), 400)
    resp = await client.post("/", data=b'"Say hi"', headers=JSON)
    assert resp.status == 200
    assert (await resp.json())["history"][-1][0] == "Say hi"
    await assert_inv(served_engine)


async def test_a3_bodies_that_are_not_utf8_are_400_never_500(build, served_engine):
    client, _ = await build()
    bodies = [b'{"prompt": "\xff\xfe"}', b'{"messages": [{"role": "user", "content": "caf\xc3"}]}',
              b'{"prompt": "\\ud800"}', b'{"messages": [{"role": "user", "content": "\\udfff x"}]}']
    for route in JSON_ROUTES:
        for body in bodies:
            resp = await client.post(route, data=body, headers=JSON)
            assert resp.status == 400, (route, body)
            assert_error(await resp.json(), 400)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):   # EAS STRING requests
        headers = {"Content-Type": content_type} if content_type else {}
        resp = await client.post("/", data=b"What is \xff\xfe?", headers=headers,
                                 skip_auto_headers=() if content_type else ("Content-Type",))
        assert resp.status == 400, content_type
        assert "UTF-8" in assert_error(await resp.json(), 400)["message"]
    await canary(client)
    await assert_inv(served_engine)


async def test_a4_deep_nesting_is_a_quick_400_on_every_json_route(build, served_engine):
    """orjson stops at its depth limit (no RecursionError can escape); the bound is loose for a shared box."""
    client, _ = await build()
    bodies = [b"[" * 100_000, b'{"prompt": ' + b"[" * 100_000, b'{"a": ' * 50_000]
    for route in JSON_ROUTES:
        for body in bodies:
            started = time.perf_counter()
            resp = await client.post(route, data=body, headers=JSON)
            err = assert_error(await resp.json(), 400)
            elapsed = time.perf_counter() - started
            assert resp.status == 400 and err["param"] is None, (route, body[:12])
            assert elapsed < 1.0, (route, body[:12], elapsed)
    ws = await client.ws_connect("/ws")
    for body in bodies:
        started = time.perf_counter()
        await ws.send_str(body.decode())
        assert_error(orjson.loads(await ws.receive_str()), 400)
        assert await ws.receive_str() == "<EOS>"
        assert time.perf_counter() - started < 1.0
    await ws.close()
    await canary(client)
    await assert_inv(served_engine)


FIELD_CASES = [   # (route, body, param): param None where the JSON parser itself refuses the number
    # A5: non-finite numbers (Python's json would accept them; orjson refuses them as JSON)
    ("/v1/chat/completions", with_field(CHAT, b'"temperature": NaN'), None),
    ("/v1/chat/completions", with_field(CHAT, b'"top_p": Infinity'), None),
    ("/v1/completions", with_field(COMPLETION, b'"temperature": 1e999'), None),
    ("/v1/completions", with_field(COMPLETION, b'"top_p": -1e999'), None),
    ("/", with_field(EAS, b'"temperature": NaN'), None),
    ("/", with_field(EAS, b'"top_p": 1e999'), None),
    ("/v1/chat/completions", with_field(CHAT, b'"top_p": 1e300'), "top_p"),
    # A6: max_tokens
    ("/v1/completions", with_field(COMPLETION, b'"max_tokens": 1000000000000000000000000000000'), "max_tokens"),
    ("/v1/completions", with_field(COMPLETION, b'"max_tokens": ' + b"9" * 5000), None),
    ("/v1/completions", with_field(COMPLETION, b'"max_tokens": -1'), "max_tokens"),
    ("/v1/completions", with_field(COMPLETION, b'"max_tokens": 1.5'), "max_tokens"),
    ("/v1/completions", with_field(COMPLETION, b'"max_tokens": true'), "max_tokens"),
    ("/v1/completions", with_field(COMPLETION, b'"max_tokens": "10"'), "max_tokens"),
    ("/v1/completions", with_field(COMPLETION, b'"max_tokens": 0'), "max_tokens"),
    ("/v1/chat/completions", with_field(CHAT, b'"max_completion_tokens": 0'), "max_completion_tokens"),
    ("/v1/chat/completions", with_field(CHAT, b'"max_tokens": 18446744073709551616'), "max_tokens"),
    ("/", with_field(EAS, b'"max_new_tokens": 0'), "max_new_tokens"),
    ("/", with_field(EAS, b'"max_new_tokens": "10"'), "max_new_tokens"),
    ("/", with_field(EAS, b'"max_new_tokens": 1e30'), "max_new_tokens"),
    # A7: counts over their caps
    ("/v1/completions", with_field(COMPLETION, b'"n": 1000000'), "n"),
    ("/v1/chat/completions", with_field(CHAT, b'"n": 1000000'), "n"),
    ("/v1/completions", with_field(COMPLETION, b'"best_of": 1000'), "best_of"),
    ("/v1/completions", with_field(COMPLETION, b'"logprobs": -1'), "logprobs"),
    ("/v1/completions", with_field(COMPLETION, b'"logprobs": 1000000'), "logprobs"),
    ("/v1/completions", with_field(COMPLETION, b'"prompt_logprobs": -1'), "prompt_logprobs"),
    ("/v1/chat/completions", with_field(CHAT, b'"logprobs": true, "top_logprobs": 1000000'), "top_logprobs"),
]


async def test_a5_a6_a7_hostile_numbers_are_400_naming_the_field(build, served_engine):
    client, _ = await build()
    for route, body, param in FIELD_CASES:
        resp = await client.post(route, data=body, headers=JSON)
        assert resp.status == 400, (route, body[-40:])
        err = assert_error(await resp.json(), 400)
        assert err["param"] == param, (route, body[-40:], err)
        if param is not None:
            assert param in err["message"]
    assert served_engine.block_manager.num_used_blocks == 0
    await canary(client)
    await assert_inv(served_engine)


async def test_a8_context_overrun_is_refused_at_admission(build, served_engine):
    client, _ = await build()
    limit = served_engine.max_model_len
    ids = list(range(1000, 1100))                 # 100 prompt tokens; the completion would not fit
    for stream in (False, True):
        resp = await client.post("/v1/completions", json={"prompt": ids, "max_tokens": limit - 50,
                                                          "stream": stream})
        assert resp.status == 400                 # an HTTP error even when a stream was asked for
        err = assert_error(await resp.json(), 400)
        assert err["param"] == "max_tokens" and str(limit) in err["message"]
        assert served_engine.block_manager.num_used_blocks == 0 and not served_engine.has_unfinished()
    await assert_inv(served_engine)


@pytest.fixture
def small_pool_engine(served_engine):
    """The default model over a 48-block pool of 4 tokens (192 tokens), max_model_len unchanged."""
    from server.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.model_runner import ModelRunner

    runner = served_engine.runner
    small = ModelRunner(runner.model, runner.device, runner.dtype, 4, num_blocks=48)
    return Engine(small, served_engine.tokenizer, EngineConfig(block_size=4), served_engine.max_model_len)


async def test_a8_prompt_the_kv_pool_can_never_hold_is_400_never_queued(aiohttp_client, small_pool_engine):
    engine = small_pool_engine
    capacity = engine.runner.num_blocks * engine.runner.block_size
    client = await aiohttp_client(make_app(AsyncEngine(engine), [NAME]))
    ids = list(range(1000, 1000 + capacity + 50))           # well under max_model_len, over the pool
    assert len(ids) + 4 < engine.max_model_len
    requests = [("/v1/completions", {"prompt": ids, "max_tokens": 4}),
                ("/v1/completions", {"prompt": ids, "max_tokens": 4, "stream": True}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * capacity}],
                                          "max_tokens": 4}),
                ("/", {"prompt": "word " * capacity, "use_stream_chat": True})]   # capped max_new_tokens
    for route, body in requests:
        resp = await client.post(route, json=body)
        assert resp.status == 400, route
        err = assert_error(await resp.json(), 400)
        assert str(capacity) in err["message"], err
        assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished()
    ok = await client.post("/v1/completions", json={"prompt": ids[:20], "max_tokens": 2})
    assert ok.status == 200                   # the same engine serves what fits
    await client.close()
    assert not engine.has_unfinished() and engine.block_manager.num_used_blocks == 0


async def test_a10_token_ids_at_the_vocabulary_boundary(build, served_engine):
    client, _ = await build()
    vocab = served_engine.tokenizer.vocab_size
    for prompt in ([vocab], [1, 2, vocab + 1], [2**31 - 1], [-1], [2**63], [10**30]):
        resp = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
        assert resp.status == 400, prompt
        assert assert_error(await resp.json(), 400)["param"] == "prompt"
    resp = await client.post("/v1/completions", json={"prompt": [0, vocab - 1], "max_tokens": 1})
    assert resp.status == 200
    await assert_inv(served_engine)


async def test_a11_body_size_boundary_is_413_json(build, served_engine):
    client, _ = await build()
    head = b'{"prompt": "Hi", "max_tokens": 1, "pad": "'
    at_limit = head + b"a" * (MAX_BODY_BYTES - len(head) - 2) + b'"}'
    assert len(at_limit) == MAX_BODY_BYTES
    assert (await client.post("/v1/completions", data=at_limit, headers=JSON)).status == 200
    over = head + b"a" * (MAX_BODY_BYTES - len(head) - 1) + b'"}'
    for route in JSON_ROUTES:
        resp = await client.post(route, data=over, headers=JSON)
        assert resp.status == 413, route
        assert_error(await resp.json(), 413)
    await canary(client)
    await assert_inv(served_engine)


async def test_a11_content_length_shorter_than_the_body_is_never_a_smuggled_success(build, served_engine):
    """The bytes after Content-Length are parsed as a next request, which is garbage: aiohttp answers one
    400 and closes (it drops the whole read, the truncated first request included). Nothing is a 2xx."""
    client, _ = await build()
    body = b'{"prompt": "Hi", "max_tokens": 2}'
    for tail in (b"", b"\r\n\r\n"):
        raw = await raw_exchange(client, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                         b"Content-Type: application/json\r\nContent-Length: 10\r\n\r\n" + body + tail)
        assert split_response(raw)[0] == 400, raw[:80]
        assert b" 200 " not in raw and b"completion_tokens" not in raw
    await canary(client)
    await assert_inv(served_engine)


async def test_a12_huge_header_and_too_many_headers_are_400_before_routing(build, served_engine, caplog):
    """On /health (public: a routed request would be a 200) with a token set; the app never sees them."""
    caplog.set_level(logging.INFO, logger="berth.access")
    client, _ = await build(token="secret")
    big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\nConnection: close\r\n\r\n"
    many = (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
            + b"Connection: close\r\n\r\n")
    for head in (big, many):
        raw = await raw_exchange(client, head)
        assert split_response(raw)[0] == 400, raw[:80]
    assert not [r for r in caplog.records if r.name == "berth.access"]
    raw = await raw_exchange(client, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert split_response(raw)[0] == 200
    resp = await client.post("/v1/completions", headers={"Authorization": "secret"},
                             json={"prompt": "Hi", "max_tokens": 2})
    assert resp.status == 200
    await assert_inv(served_engine)


async def test_a13_stop_caps_and_metacharacters_are_literal(build, served_engine):
    client, _ = await build()
    for stop in (["x"] * 10_000, ["x" * (1 << 20)]):
        started = time.perf_counter()
        resp = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stop": stop})
        assert resp.status == 400
        assert assert_error(await resp.json(), 400)["param"] == "stop"
        assert time.perf_counter() - started < 2.0
    body = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    plain = (await (await client.post("/v1/completions", json=body)).json())["choices"][0]["text"]
    regexes = [".*", "\\w+", "[a-z]", "^", "(.)", "$", "\\d|\\s", "a?"]   # a regex engine matches each at once
    assert plain and not any(r in plain for r in regexes), plain
    resp = await (await client.post("/v1/completions", json={**body, "stop": regexes})).json()
    assert resp["choices"][0]["text"] == plain
    assert resp["choices"][0]["finish_reason"] == "length"
    await assert_inv(served_engine)


async def test_a14_unknown_model_is_404_json_on_every_openai_route(build, served_engine):
    client, _ = await build()
    for route, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                        ("/v1/completions", {"prompt": "Hi"})):
        for stream in (False, True):
            resp = await client.post(route, json={**body, "model": "gpt-nope", "stream": stream, "max_tokens": 2})
            assert resp.status == 404, route
            assert resp.content_type == "application/json"
            err = assert_error(await resp.json(), 404, "not_found_error")
            assert err["param"] == "model" and err["message"] == 'The model "gpt-nope" does not exist.'
    await assert_inv(served_engine)


# --- B. Authentication and exposure -------------------------------------------------------------------

TOKEN = "k7Qp2vXz9LmN4rT8sW1yB6cD3fG5hJ0a"
LONG_TOKEN = "".join(random.Random(7).choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(4096))
TIMING_SAMPLES = 20_000


class _Headers:
    """What TokenChecker.check reads of a request: its headers."""
    __slots__ = ("headers",)

    def __init__(self, authorization: str):
        self.headers = CIMultiDictProxy(CIMultiDict(Authorization=authorization))


def _wrong_key(token: str, position: int, rng: random.Random) -> str:
    """token with the character at `position` replaced (a fresh string object every time)."""
    old = token[position]
    new = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" if c != old])
    return token[:position] + new + token[position + 1:]


def auth_timings(checker: TokenChecker, token: str, seed: int) -> tuple[list[int], list[int]]:
    """TIMING_SAMPLES timings (ns) of checker.check, the server's auth decision, for bearer keys wrong in
    their first byte, and as many for keys wrong in their last byte, interleaved sample by sample so that
    machine noise hits both classes alike. Each pair's two requests are built and timed in a random
    order: a fixed order biases one class by tens of ns (heap layout, warm caches), enough for the KS
    test to tell two copies of the same check apart (measured while writing this test)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(TIMING_SAMPLES):
        classes = [0, 1]
        rng.shuffle(classes)
        pair = [(c, _Headers("Bearer " + _wrong_key(token, 0 if c == 0 else len(token) - 1, rng)))
                for c in classes]
        rng.shuffle(pair)
        pairs.append(pair)
    timings: tuple[list[int], list[int]] = ([], [])
    clock, check, refused = time.perf_counter_ns, checker.check, 0
    gc.disable()
    try:
        for pair in pairs:
            for cls, request in pair:
                started = clock()
                try:
                    check(request)
                except ProtocolError:
                    refused += 1
                timings[cls].append(clock() - started)
    finally:
        gc.enable()
    assert refused == 2 * TIMING_SAMPLES          # every wrong key was refused by the real decision
    return timings


def ks_pvalue(checker: TokenChecker, token: str, seed: int) -> float:
    from scipy.stats import ks_2samp

    first, last = auth_timings(checker, token, seed)
    return float(ks_2samp(first, last).pvalue)


@pytest.mark.parametrize("token", [TOKEN, LONG_TOKEN], ids=["32-chars", "4096-chars"])
def test_b4_token_check_time_does_not_depend_on_where_the_key_differs(token):
    """sha256 + hmac.compare_digest: no significant difference (two-sample KS, p > 0.01). The machine is
    shared with other jobs, so up to 3 runs are made and one p > 0.01 passes: with no real difference,
    3 failures in a row happen once in a million runs, while the leaky compares below give p < 1e-40 on
    every run. The 4096-character token makes even a naive `==` (a memcmp) measurable."""
    checker = TokenChecker(token)
    pvalues = []
    for attempt in range(3):
        pvalues.append(ks_pvalue(checker, token, seed=attempt))
        if pvalues[-1] > 0.01:
            break
    assert pvalues[-1] > 0.01, pvalues


def _early_exit(token: str):
    def matches(candidate: str) -> bool:
        if len(candidate) != len(token):
            return False
        for a, b in zip(candidate, token):
            if a != b:
                return False
        return True
    return matches


@pytest.mark.parametrize("token,compare", [(TOKEN, _early_exit(TOKEN)), (LONG_TOKEN, LONG_TOKEN.__eq__)],
                         ids=["per-byte-early-exit", "naive-eq-4096-chars"])
def test_b4_the_timing_probe_detects_a_leaky_compare(token, compare):
    """The same probe must fail against compares that leak where the key differs."""
    checker = TokenChecker(token)
    checker.matches = compare
    assert ks_pvalue(checker, token, seed=0) < 0.01


async def test_b5_two_authorization_headers_are_never_served(build, served_engine):
    client, _ = await build(token="secret")
    for values in (("secret", "wrong"), ("wrong", "secret"), ("Bearer secret", "secret"), ("secret", "")):
        headers = [("Authorization", v) for v in values]
        for method, path, body in (("GET", "/v1/models", None), ("HEAD", "/v1/models", None),
                                   ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
                                   ("POST", "/", {"prompt": "Hi", "max_new_tokens": 2, "use_stream_chat": False})):
            resp = await client.request(method, path, headers=headers, json=body)
            assert resp.status in (400, 401), (values, method, path, resp.status)
            if method != "HEAD":
                assert_error(await resp.json(), resp.status,
                             "authentication_error" if resp.status == 401 else "invalid_request_error")
        for path in ("/ws", "/"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await client.ws_connect(path, headers=headers)
            assert info.value.status in (400, 401)
    assert (await client.get("/v1/models", headers={"Authorization": "secret"})).status == 200
    await assert_inv(served_engine)


async def test_b6_injected_faults_leak_no_token_path_or_repr(build, served_engine, monkeypatch, caplog):
    from protocol import openai

    caplog.set_level(logging.DEBUG)
    secret_token = "tok-" + TOKEN
    client, _ = await build(token=secret_token)
    auth = {"Authorization": f"Bearer {secret_token}"}
    leak = "/home/berth/.cache/model.safetensors <Tokenizer object at 0x7f3a2b1c> sk-live-injected"

    def failing_encode(request):
        raise RuntimeError(leak)
    monkeypatch.setattr(served_engine.tokenizer, "encode_request", failing_encode)
    bodies = []
    for route, body in (("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True}),
                        ("/", {"prompt": "Hi", "use_stream_chat": True})):
        resp = await client.post(route, headers=auth, json=body)
        assert resp.status == 500, route
        bodies.append(await resp.text())
        assert_error(orjson.loads(bodies[-1]), 500, "server_error")
    ws = await client.ws_connect("/ws", headers=auth)
    await ws.send_str(orjson.dumps({"prompt": "Hi"}).decode())
    bodies.append(await ws.receive_str())
    assert_error(orjson.loads(bodies[-1]), 500, "server_error")
    assert await ws.receive_str() == "<EOS>"
    await ws.close()
    monkeypatch.undo()

    def buggy_check(*args):
        raise KeyError(leak)                     # a true bug in a handler: the generic 500
    monkeypatch.setattr(openai, "check_model", buggy_check)
    resp = await client.post("/v1/completions", headers=auth, json={"prompt": "Hi", "max_tokens": 2})
    assert resp.status == 500
    bodies.append(await resp.text())
    for body in bodies:
        for needle in (secret_token, "/home", "0x7f", "sk-live", "object at", "Traceback", "RuntimeError",
                       "KeyError", "safetensors"):
            assert needle not in body, (needle, body)
    assert secret_token not in caplog.text        # the Authorization header is never logged
    await assert_inv(served_engine)


async def test_b7_static_root_refuses_symlinks_out_and_directories(aiohttp_client, served_engine, tmp_path,
                                                                     monkeypatch):
    """The app's own add_static options (follow_symlinks=False, show_index=False), over a root holding
    a symlink to a file outside, a symlink to a directory outside, and a real subdirectory."""
    from server.http import routes

    root, outside = tmp_path / "static", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "app.js").write_text("ok")
    (root / "sub" / "x.js").write_text("x")
    (outside / "secret.txt").write_text("TOP-SECRET")
    (root / "leak.txt").symlink_to(outside / "secret.txt")
    (root / "leakdir").symlink_to(outside, target_is_directory=True)
    monkeypatch.setattr(routes, "STATIC_DIR", root)
    client = await aiohttp_client(make_app(AsyncEngine(served_engine), [NAME]))   # no token: no 401s
    assert await (await client.get("/static/app.js")).text() == "ok"
    for path in ("/static/leak.txt", "/static/leakdir/secret.txt", "/static/sub", "/static/sub/", "/static/",
                 "/static/../outside/secret.txt", "/static/%2e%2e/outside/secret.txt",
                 "/static/sub/../../outside/secret.txt", "/static/leak.txt/"):
        raw = await raw_exchange(client, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status, body = split_response(raw)
        assert status in (403, 404), (path, status)
        assert b"TOP-SECRET" not in body and b"x.js" not in body and b"app.js" not in body, path


async def test_b8_cross_site_origin_is_refused_on_the_root_upgrade_and_static(build, served_engine):
    client, _ = await build(token="secret")
    host = f"{client.server.host}:{client.server.port}"
    auth = {"Authorization": "secret"}
    for origin in ("https://evil.example", "null", f"http://{host}.evil.example", f"https://{host}x"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await client.ws_connect("/", headers={**auth, "Origin": origin})
        assert info.value.status == 403, origin
        for path in ("/", "/static/app.js"):
            resp = await client.get(path, headers={"Origin": origin})
            assert resp.status == 403, (origin, path)
            assert_error(await resp.json(), 403, "permission_error")
    ws = await client.ws_connect("/", headers={**auth, "Origin": f"http://{host}"})
    await ws.close()
    assert (await client.get("/static/app.js", headers={"Origin": f"http://{host}"})).status == 200
    await assert_inv(served_engine)


@pytest.mark.parametrize("bind,spec,want", [
    ("127.0.0.1", None, {"127.0.0.1", "localhost", "::1"}), ("localhost", None, {"127.0.0.1", "localhost", "::1"}),
    ("::1", None, {"127.0.0.1", "localhost", "::1"}), ("0.0.0.0", None, None), ("127.0.0.1", "*", None),
    ("0.0.0.0", "Berth.Example, [fd00::5]", {"berth.example", "fd00::5", "127.0.0.1", "localhost", "::1"})])
def test_b8_allowed_hosts_follow_the_bind_address(bind, spec, want):
    from server.http.limits import parse_allowed_hosts

    assert parse_allowed_hosts(spec, bind) == (None if want is None else frozenset(want))


async def test_b8_unexpected_host_on_a_loopback_bind_is_refused(build, served_engine):
    """DNS rebinding: a page on evil.example re-pointed at 127.0.0.1 sends Host: evil.example. With no
    token set (the default) that would reach the API, so a loopback bind serves loopback names only."""
    from server.http.limits import parse_allowed_hosts

    client, _ = await build(allowed_hosts=parse_allowed_hosts(None, "127.0.0.1"))
    port = client.server.port
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "localhost.evil",
                 "", f"[::2]:{port}"):
        resp = await client.get("/v1/models", headers={"Host": host})
        assert resp.status == 403, host
        assert_error(await resp.json(), 403, "permission_error")
        assert (await client.post("/v1/completions", headers={"Host": host},
                                  json={"prompt": "Hi", "max_tokens": 1})).status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await client.ws_connect("/ws", headers={"Host": host})
        assert info.value.status == 403
    for host in (f"localhost:{port}", "LOCALHOST", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert (await client.get("/v1/models", headers={"Host": host})).status == 200, host
    ws = await client.ws_connect("/ws", headers={"Host": f"localhost:{port}"})
    await ws.close()
    open_bind, _ = await build(allowed_hosts=parse_allowed_hosts(None, "0.0.0.0"))
    assert (await open_bind.get("/v1/models", headers={"Host": "berth.example"})).status == 200
    await assert_inv(served_engine)


# --- C. Overload and backpressure ---------------------------------------------------------------------

async def test_c1_burst_over_the_queue_cap_gets_exactly_one_terminal_response_each(build, served_engine):
    """max_pending=2 and 12 concurrent requests (half streamed): each ends as a complete 200 or as a 429
    JSON with Retry-After; /metrics counts exactly 12 outcomes."""
    client, _ = await build(max_pending=2)
    body = {"prompt": "Count to ten:", "max_tokens": 8, "ignore_eos": True, "temperature": 0}

    async def one(i: int) -> tuple[int, float]:
        stream = i % 2 == 1
        started = time.perf_counter()
        resp = await client.post("/v1/completions", json={**body, "stream": stream,
                                                          "stream_options": {"include_usage": True}})
        latency = time.perf_counter() - started
        if resp.status == 429:
            assert int(resp.headers["Retry-After"]) >= 1
            err = assert_error(await resp.json(), 429, "overloaded_error")
            assert err["param"] is None
            return 429, latency
        assert resp.status == 200, resp.status
        if not stream:
            choice = await resp.json()
            assert choice["usage"]["completion_tokens"] == 8
            assert choice["choices"][0]["finish_reason"] == "length"
            return 200, latency
        payloads = await read_sse(resp)
        assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
        chunks = [orjson.loads(p) for p in payloads[:-1]]
        assert not any("error" in c for c in chunks)
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert [f for f in finishes if f] == ["length"]
        assert chunks[-1]["usage"]["completion_tokens"] == 8
        return 200, latency

    results = await asyncio.gather(*(one(i) for i in range(12)))
    statuses = [s for s, _ in results]
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    assert max(lat for s, lat in results if s == 429) < 2.0      # refused before any engine work
    await assert_inv(served_engine)
    for _ in range(100):          # a handler is counted once the client has read its last byte
        text = await (await client.get("/metrics")).text()
        counted = sum(metric(text, "berth_requests_total", outcome=o, protocol="openai_completions")
                      for o in ("ok", "overloaded") if f'outcome="{o}",protocol="openai_completions"' in text)
        if counted >= 12:
            break
        await asyncio.sleep(0.02)
    assert metric(text, "berth_requests_total", outcome="ok", protocol="openai_completions") == statuses.count(200)
    assert metric(text, "berth_requests_total", outcome="overloaded",
                  protocol="openai_completions") == statuses.count(429)
    await canary(client)


async def test_c4_pipelined_requests_on_one_connection_are_bounded(build, served_engine):
    """aiohttp parks at most MAX_MSG_QUEUE_SIZE parsed requests per connection and stops reading until
    they drain (GHSA-4fvr-rgm6-gqmc); every request is answered in order, then the connection's task ends."""
    from aiohttp.web_protocol import MAX_MSG_QUEUE_SIZE

    client, _ = await build()
    await canary(client)
    baseline = len(asyncio.all_tasks())
    server = client.server.runner.server
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max([peak] + [len(h._messages) for h in server.connections])
            await asyncio.sleep(0)

    watcher = asyncio.ensure_future(watch())
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    raw = await raw_exchange(client, request * 999 + last, timeout=60)
    watcher.cancel()
    assert raw.count(b"HTTP/1.1 200 OK") == 1000
    assert raw.count(b'{"status":"ok"}') == 1000
    assert 0 < peak <= MAX_MSG_QUEUE_SIZE, peak
    for _ in range(100):
        if len(asyncio.all_tasks()) <= baseline:
            break
        await asyncio.sleep(0.02)
    assert len(asyncio.all_tasks()) <= baseline
    await canary(client)
    await assert_inv(served_engine)


async def test_c6_health_stays_fast_while_long_prompts_prefill(build, served_engine):
    """Three 300-token prompts admitted at once (one token budget, one prefill step, seconds on this CPU);
    /health is polled meanwhile. RELIABILITY.md's goal is p99 < 50 ms (about 15 ms measured here); the
    bound is loose for a shared box."""
    client, _ = await build()
    ids = [list(range(1000 + 500 * i, 1000 + 500 * i + 300)) for i in range(3)]
    long = [asyncio.ensure_future(client.post("/v1/completions", json={"prompt": p, "max_tokens": 1}))
            for p in ids]
    latencies = []
    while not all(t.done() for t in long):
        t0 = time.perf_counter()
        assert (await client.get("/health")).status == 200
        latencies.append(time.perf_counter() - t0)
        await asyncio.sleep(0.01)
    for task in long:
        assert (await task).status == 200
    latencies.sort()
    assert latencies[int(0.99 * (len(latencies) - 1))] < 0.5
    await assert_inv(served_engine)
