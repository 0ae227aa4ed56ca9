"""Soak test of a running berth server: N mixed streams for M minutes, then a leak check.

    python -m bench.soak --url http://127.0.0.1:8000 --streams 64 --minutes 10 --disconnect 0.1

Mix: 50% OpenAI SSE, 25% EAS NUL stream, 25% multi-round WebSocket (3 rounds); a fraction of requests
hang up after their first chunk. Reports requests by outcome, "lost" ones (no terminal event: no [DONE],
no final NUL frame, no <EOS>), e2e p50/p99, RSS at start and end (/metrics process collector) and KV blocks
still used after quiesce. Loopback only; bounded by --minutes and --max-requests. Exit 1 on loss or leak.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import time

import aiohttp
import orjson

PROMPTS = ["Tell me a story about a fox.", "What is the capital of Canada?", "List three colours.",
           "Explain rain to a child.", "Write a haiku about the sea."]


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _mib(metrics: dict[str, float]) -> float:
    return round(metrics.get("process_resident_memory_bytes", 0) / 2**20, 1)


def rss_drift(series: list[tuple[float, float]], warmup_s: float) -> dict[str, float | None]:
    """RSS after warm-up: range, and drift as the least-squares slope in % of the mean per hour
    (the allocator makes RSS swing by tens of MiB from sample to sample, so two end points mislead)."""
    warm = [(t, v) for t, v in series if t >= warmup_s]
    if len(warm) < 3:
        return {"rss_mib_warm_min": None, "rss_mib_warm_max": None, "rss_drift_pct_per_hour": None}
    n = len(warm)
    mean_t, mean_v = sum(t for t, _ in warm) / n, sum(v for _, v in warm) / n
    slope = (sum((t - mean_t) * (v - mean_v) for t, v in warm)
             / sum((t - mean_t) ** 2 for t, _ in warm))                      # MiB per second
    return {"rss_mib_warm_min": min(v for _, v in warm), "rss_mib_warm_max": max(v for _, v in warm),
            "rss_drift_pct_per_hour": round(slope * 3600 / mean_v * 100, 2)}


class Soak:
    def __init__(self, args):
        self.args = args
        self.headers = {"Authorization": args.token} if args.token else {}
        self.outcomes: collections.Counter = collections.Counter()
        self.latencies: list[float] = []
        self.num_started = 0
        self.rng = random.Random(args.seed)
        self.rss: list[tuple[float, float]] = []      # (seconds since start, MiB) under load

    async def metrics(self, session) -> dict[str, float]:
        async with session.get(self.args.url + "/metrics", headers=self.headers) as resp:
            return parse_metrics(await resp.text())

    def hang_up(self) -> bool:
        return self.rng.random() < self.args.disconnect

    async def sse(self, session) -> str:
        body = {"messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}], "stream": True,
                "max_tokens": self.args.max_tokens}
        hang_up = self.hang_up()
        async with session.post(self.args.url + "/v1/chat/completions", json=body, headers=self.headers) as r:
            if r.status != 200:
                return f"http_{r.status}"
            tail = b""
            async for chunk in r.content.iter_any():
                if hang_up:
                    return "disconnected"
                tail = (tail + chunk)[-64:]
            if b'"error"' in tail:
                return "stream_error"
            return "ok" if tail.endswith(b"data: [DONE]\n\n") else "lost"

    async def nul(self, session) -> str:
        body = {"prompt": self.rng.choice(PROMPTS), "max_new_tokens": self.args.max_tokens}
        hang_up = self.hang_up()
        async with session.post(self.args.url + "/", json=body, headers=self.headers) as r:
            if r.status != 200:
                return f"http_{r.status}"
            last = b""
            async for chunk in r.content.iter_any():
                if hang_up:
                    return "disconnected"
                last = (last + chunk)[-4096:]
            frames = last.split(b"\0")
            if frames[-1] != b"" or len(frames) < 2:
                return "lost"
            return "stream_error" if b'"error"' in frames[-2] else "ok"

    async def ws(self, session) -> str:
        hang_up = self.hang_up()
        async with session.ws_connect(self.args.url + "/ws", headers=self.headers) as ws:
            for _ in range(3):
                await ws.send_str(orjson.dumps({"prompt": self.rng.choice(PROMPTS),
                                                "max_new_tokens": self.args.max_tokens}).decode())
            num_eos, error = 0, False
            while num_eos < 3:
                msg = await ws.receive(timeout=120)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    return "lost"
                if hang_up:
                    return "disconnected"
                num_eos += msg.data == "<EOS>"
                error |= msg.data.startswith('{"error"')
            return "stream_error" if error else "ok"

    async def worker(self, session, deadline: float) -> None:
        while time.monotonic() < deadline and self.num_started < self.args.max_requests:
            self.num_started += 1
            kind = self.rng.choices([self.sse, self.nul, self.ws], weights=[2, 1, 1])[0]
            started = time.monotonic()
            try:
                outcome = await asyncio.wait_for(kind(session), self.args.request_timeout)
            except asyncio.TimeoutError:
                outcome = "timeout"
            except (aiohttp.ClientError, ConnectionError) as exc:
                outcome = f"client_error_{type(exc).__name__}"
            self.outcomes[f"{kind.__name__}:{outcome}"] += 1
            if outcome == "ok":
                self.latencies.append(time.monotonic() - started)

    async def quiesce(self, session) -> dict[str, float]:
        for _ in range(300):
            m = await self.metrics(session)
            if not (m.get("berth_num_requests_running") or m.get("berth_num_requests_waiting")
                    or m.get("berth_num_requests_pending")):
                return m
            await asyncio.sleep(0.1)
        return m

    async def sample_rss(self, session, t0: float) -> None:
        """RSS every --sample-every seconds while the load runs: the drift after warm-up is the figure."""
        while True:
            await asyncio.sleep(self.args.sample_every)
            m = await self.metrics(session)
            self.rss.append((round(time.monotonic() - t0, 1), _mib(m)))

    async def run(self) -> dict:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            start = await self.metrics(session)
            t0 = time.monotonic()
            deadline = t0 + self.args.minutes * 60
            sampler = asyncio.ensure_future(self.sample_rss(session, t0))
            await asyncio.gather(*(self.worker(session, deadline) for _ in range(self.args.streams)))
            sampler.cancel()
        # a fresh, non-pooled connection: the load's keep-alive sockets are closed by now, so the fd
        # count can return to its baseline
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            end = await self.quiesce(session)
        lat = sorted(self.latencies)
        pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None)
        return {"requests": sum(self.outcomes.values()), "outcomes": dict(sorted(self.outcomes.items())),
                "lost": sum(v for k, v in self.outcomes.items() if k.endswith((":lost", ":timeout"))),
                "leaked_blocks": end.get("berth_kv_blocks_used"),
                "rss_mib_start": _mib(start), "rss_mib_end": _mib(end), **rss_drift(self.rss, self.args.warmup * 60),
                "rss_mib_series": self.rss,
                "open_fds_start": start.get("process_open_fds"), "open_fds_end": end.get("process_open_fds"),
                "e2e_p50_s": pct(0.5), "e2e_p99_s": pct(0.99)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--token", default=None)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--minutes", type=float, default=1.0)
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--disconnect", type=float, default=0.1, help="fraction of requests that hang up early")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-every", type=float, default=15.0, help="seconds between RSS samples")
    p.add_argument("--warmup", type=float, default=2.0, help="minutes before RSS drift is measured")
    p.add_argument("--out", default=None, help="write the report as JSON here too")
    args = p.parse_args(argv)
    if not args.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        p.error("the soak runs against a loopback server only")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(Soak(args).run())
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if report["lost"] or report["leaked_blocks"] else 0


if __name__ == "__main__":
    sys.exit(main())
