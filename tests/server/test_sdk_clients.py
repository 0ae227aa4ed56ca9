"""The clients that structured outputs and tools exist for, run unmodified against a live `berth serve`
(tests/sdk_clients/*.py; each prints one JSON line that the test checks): the OpenAI SDK's .parse()
with a Pydantic model, streamed tool calls through the SDK, LangChain's with_structured_output and
bind_tools(tool_choice=...), and an openai-agents agent calling a function tool."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import LiveServer

CLIENTS = Path(__file__).resolve().parent.parent / "sdk_clients"
TOKEN = "sdk-token"
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server():
    live = LiveServer("--token", TOKEN, "--max-new-tokens", "256").wait_ready()
    yield live
    live.stop()


def run_client(server, name: str) -> dict:
    env = {**os.environ, "BERTH_URL": server.url, "BERTH_TOKEN": TOKEN, "BERTH_MODEL": MODEL,
           "OPENAI_AGENTS_DISABLE_TRACING": "1", "LANGCHAIN_TRACING_V2": "false"}
    proc = subprocess.run([sys.executable, str(CLIENTS / name)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_openai_sdk_parse_with_a_pydantic_model(server):
    out = run_client(server, "openai_parse.py")
    assert out["finish_reason"] == "stop"
    event = out["parsed"]            # .parse() validated it against the model already
    assert set(event) == {"name", "date", "participants"} and len(event["participants"]) <= 3


def test_openai_sdk_streamed_tool_calls(server):
    out = run_client(server, "openai_stream_tools.py")
    assert out["finish_reason"] == "tool_calls" and out["calls"]
    for call in out["calls"] + out["helper_calls"]:
        assert call["id"].startswith("call_") and call["name"] == "get_weather"
        args = json.loads(call["arguments"])
        assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    # greedy: the SDK's accumulator sees the same calls as the hand-rolled one
    assert [(c["name"], c["arguments"]) for c in out["calls"]] == \
           [(c["name"], c["arguments"]) for c in out["helper_calls"]]


def test_langchain_structured_output_and_forced_tool(server):
    out = run_client(server, "langchain_clients.py")
    assert set(out["joke"]) == {"setup", "punchline"}
    assert out["tool_calls"] and all(c["name"] == "multiply" for c in out["tool_calls"])
    assert all(isinstance(c["args"]["a"], int) and isinstance(c["args"]["b"], int) for c in out["tool_calls"])


def test_openai_agents_agent_calls_its_function_tool(server):
    out = run_client(server, "agents_tool.py")
    assert len(out["tool_calls"]) == 1                       # parallel_tool_calls=False: one call
    assert out["final_output"] == f"The weather in {out['tool_calls'][0]} is sunny, 21 degrees."
