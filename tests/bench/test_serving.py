"""The CLI end to end against the fake server (run in a thread with its own loop)."""
from __future__ import annotations

import asyncio
import json
import threading

import pytest
from aiohttp import web

from bench import serving
from bench.workloads import Conversation, LoadPoint, Turn, run_load
from tests.bench.fake_server import TOKEN, make_app


@pytest.fixture
def fake_url():
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app())
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_main_all_methods_sweep(fake_url, tmp_path, capsys):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    code = serving.main(["--base-url", fake_url, "--method", "all", "--num-prompts", "3", "--rounds", "2",
                         "--concurrency", "1,2", "--input-len", "8", "--output-len", "4", "--token", TOKEN,
                         "--slo", "ttft:10000,tpot:10000", "--result-json", str(out), "--plot", str(png),
                         "--tokenizer", str(tmp_path), "--no-progress"])
    assert code == 0
    record = json.loads(out.read_text())
    assert [(p["method"], p["label"]) for p in record["points"]] == [
        (m, c) for m in ("chat", "completions", "eas", "ws") for c in ("c=1", "c=2")]
    assert "token" not in record["config"] and record["config"]["model"] == "fake-model"
    for point in record["points"]:
        m = point["metrics"]
        assert (m["completed"], m["failed"]) == (6, 0)        # 3 conversations x 2 rounds
        assert m["request_goodput"] == pytest.approx(m["request_throughput"])
        assert set(m["round_ttft_median_ms"]) == {"0", "1"}
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "| ws | c=2 |" in printed


def test_main_bad_token_fails(fake_url, tmp_path):
    code = serving.main(["--base-url", fake_url, "--method", "chat", "--num-prompts", "1", "--token", "nope",
                         "--tokenizer", str(tmp_path), "--no-progress"])
    assert code == 1


async def _closed_loop_max_in_flight(concurrency: int, num: int) -> tuple[int, list[int]]:
    in_flight, peak, order = 0, 0, []

    async def run_one(conversation):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0)
        in_flight -= 1
        order.append(conversation.turns[0].prompt_len)
        return []

    conversations = [Conversation([Turn("x", i, 1)]) for i in range(num)]
    await run_load(conversations, run_one, LoadPoint(concurrency=concurrency))
    return peak, sorted(order)


def test_closed_loop_respects_concurrency():
    peak, order = asyncio.run(_closed_loop_max_in_flight(3, 10))
    assert peak == 3 and order == list(range(10))
