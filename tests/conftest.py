"""Shared fixtures: the real default model (fetched and converted once), engines over it, app clients."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import server  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CANADA = [{"role": "user", "content": "What is the capital of Canada?"}]

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def default_model() -> str:
    """The default model as an fp32 HF folder dequantised from its GGUF: the oracle tests compare the
    engine with transformers on it (berth serves the GGUF itself natively: default_gguf_model)."""
    from server.model_store import resolve_model

    return str(resolve_model("default", dequantize=True))


@pytest.fixture(scope="session")
def default_gguf_model() -> str:
    """The default model as `berth serve` loads it: the GGUF's sidecar folder (native quant types)."""
    from server.model_store import resolve_model

    return str(resolve_model("default"))


@pytest.fixture(scope="session")
def hf_engine(default_model):
    from server.engine.hf_engine import HFEngine

    return HFEngine(default_model, torch.float32)


@pytest.fixture(scope="session")
def served_engine(default_model):
    """The engine `berth serve` picks by default for the default model, in fp32 for exact comparisons."""
    from server.config import EngineConfig
    from server.engine.factory import build_engine

    return build_engine(EngineConfig(dtype="float32", kv_cache_gib=0.5, max_model_len=2048), default_model)


async def wait_idle(engine, timeout: float = 10.0) -> None:
    """Wait until the sync engine has nothing running or waiting (aborts land within a step)."""
    deadline = time.monotonic() + timeout
    while engine.has_unfinished():
        assert time.monotonic() < deadline, "engine still has unfinished requests"
        await asyncio.sleep(0.02)


async def read_sse_then_close(resp, num_events: int) -> None:
    """Read num_events SSE events of a streaming response, then hang up (a client going away)."""
    from protocol.sse import SseDecoder

    decoder, seen = SseDecoder(), 0
    async for chunk in resp.content.iter_any():
        seen += len(decoder.feed(chunk))
        if seen >= num_events:
            break
    resp.close()


@pytest.fixture
def make_client(aiohttp_client):
    """make_client(sync_engine, token=None) -> aiohttp test client over a fresh app and AsyncEngine."""
    from server.async_engine import AsyncEngine
    from server.http.app import make_app

    async def make(engine, token: str | None = None, **kw):
        app = make_app(AsyncEngine(engine, **kw), ["SmolLM2-135M-Instruct"], token=token)
        return await aiohttp_client(app)
    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`berth serve` in a subprocess (the way users run it)."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "server.cli", "serve", "--model", "default", "--host", "127.0.0.1",
               "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 180.0) -> "LiveServer":
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"berth serve exited: {self.proc.stdout.read()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("berth serve did not become ready")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


KNOWLEDGE_DIR = ROOT / "tests" / "data" / "knowledge"


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    """berth serve with a token, a 48-token cap and a knowledge base of tests/data/knowledge (private db)."""
    db = tmp_path_factory.mktemp("live-kb") / "knowledge.sqlite3"
    server = LiveServer("--token", "test-token", "--max-new-tokens", "48", "--knowledge", str(KNOWLEDGE_DIR),
                        "--knowledge-db", str(db)).wait_ready()
    yield server
    server.stop()
