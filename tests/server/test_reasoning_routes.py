"""Reasoning output on the chat routes: --reasoning-parser detection from a chat template, and
reasoning_content / delta.reasoning_content with the default model (its answers never close a block,
so with the deepseek_r1 split the whole answer is reasoning and content stays empty)."""
from __future__ import annotations

import json
import shutil

from protocol.reasoning import ReasoningConfig
from protocol.sse import SseDecoder
from tests.conftest import CANADA, wait_idle

GREEDY = {"messages": CANADA, "temperature": 0, "max_tokens": 16}
R1_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'].split('</think>')[-1] }}"
               "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


def test_auto_detects_the_split_from_the_chat_template(default_gguf_model, tmp_path):
    from server.cli import _reasoning
    from server.engine.tokenizer import Tokenizer

    folder = tmp_path / "r1"
    shutil.copytree(default_gguf_model, folder, symlinks=True)
    (folder / "chat_template.jinja").write_text(R1_TEMPLATE)

    class Served:                       # what _reasoning reads: AsyncEngine.engine.tokenizer
        def __init__(self, path):
            self.engine = type("E", (), {"tokenizer": Tokenizer(path)})()

    assert _reasoning("auto", Served(folder)) == ReasoningConfig(starts_inside=True)
    assert _reasoning("auto", Served(default_gguf_model)) is None          # SmolLM2 does not reason
    assert _reasoning("qwen3", Served(default_gguf_model)) == ReasoningConfig(starts_inside=False)
    assert _reasoning("none", Served(folder)) is None


async def test_chat_answers_split_into_reasoning_content(aiohttp_client, served_engine):
    from server.async_engine import AsyncEngine
    from server.http.app import make_app

    plain_app = make_app(AsyncEngine(served_engine), ["SmolLM2-135M-Instruct"])
    plain = await (await (await aiohttp_client(plain_app)).post("/v1/chat/completions", json=GREEDY)).json()
    text = plain["choices"][0]["message"]["content"]
    app = make_app(AsyncEngine(served_engine), ["SmolLM2-135M-Instruct"], reasoning=ReasoningConfig(True))
    client = await aiohttp_client(app)
    body = await (await client.post("/v1/chat/completions", json=GREEDY)).json()
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == text.lstrip("\n") and message["content"] == ""
    assert body["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]     # max_tokens counts both
    resp = await client.post("/v1/chat/completions", json={**GREEDY, "stream": True})
    decoder, chunks = SseDecoder(), []
    async for data in resp.content.iter_any():
        chunks += [json.loads(p) for p in decoder.feed(data) if p != "[DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert not "".join(d.get("content") or "" for d in deltas)
    constrained = await (await client.post("/v1/chat/completions", json={
        **GREEDY, "structured_outputs": {"choice": ["yes", "no"]}})).json()
    assert constrained["choices"][0]["message"]["content"] in ("yes", "no")       # a grammar answer is content
    assert "reasoning_content" not in constrained["choices"][0]["message"]
    eas = await (await client.post("/", json={"prompt": "What is the capital of Canada?", "temperature": 0,
                                              "max_new_tokens": 16, "use_stream_chat": False})).json()
    assert eas["response"]                                                  # EAS keeps the whole text
    await wait_idle(served_engine)
