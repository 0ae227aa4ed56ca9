"""Later rounds reuse the KV blocks of earlier ones: cached_tokens is reported and only new tokens prefill."""
from __future__ import annotations

import orjson

from protocol.types import Finished
from server.http import keys
from tests.conftest import wait_idle


async def test_openai_usage_reports_cached_prompt_tokens(make_client, served_engine):
    client = await make_client(served_engine)
    messages = [{"role": "system", "content": "You are a geography tutor who answers in one sentence. " * 4},
                {"role": "user", "content": "What is the capital of Canada?"}]
    body = {"messages": messages, "temperature": 0, "max_tokens": 4}
    first = await (await client.post("/v1/chat/completions", json=body)).json()
    second = await (await client.post("/v1/chat/completions", json=body)).json()
    prompt_tokens = second["usage"]["prompt_tokens"]
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens"] == prompt_tokens
    block = served_engine.block_manager.block_size
    assert cached == (prompt_tokens - 1) // block * block        # every full block but the last token's
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]


async def test_websocket_second_round_reuses_first_rounds_blocks(make_client, served_engine):
    client = await make_client(served_engine)
    engine = client.app[keys.STATE].engine
    usages: list = []
    original = engine.generate

    async def recording(request):
        async for event in original(request):
            if isinstance(event, Finished):
                usages.append(event.usage)
            yield event
    engine.generate = recording
    ws = await client.ws_connect("/ws")
    for prompt in ("What is the capital of Canada?", "What is the capital of France?"):
        await ws.send_str(orjson.dumps({"prompt": prompt, "temperature": 0, "max_new_tokens": 12,
                                        "system_prompt": "You are a helpful assistant."}).decode())
        while await ws.receive_str() != "<EOS>":
            pass
    await ws.close()
    await wait_idle(served_engine)
    first, second = usages
    # round 2's prompt holds round 1's prompt and answer: all their full blocks come from the cache
    assert second.prompt_tokens > first.prompt_tokens + first.completion_tokens
    assert second.cached_tokens >= (first.prompt_tokens // 16) * 16
    assert second.cached_tokens > 0
