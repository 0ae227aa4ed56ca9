"""Structured outputs and tools through every route, in-process against the default model."""
from __future__ import annotations

import json

import jsonschema
import orjson

from protocol.sse import SseDecoder
from tests.conftest import wait_idle

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                         "country": {"type": "string", "maxLength": 20},
                                         "population": {"type": "integer", "minimum": 0}},
        "required": ["city", "country"], "additionalProperties": False}
ASK = [{"role": "user", "content": "What is the capital of Canada? Answer in JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}
GREEDY = {"temperature": 0, "max_tokens": 120}


async def chunks(resp) -> list[dict]:
    decoder, out = SseDecoder(), []
    async for data in resp.content.iter_any():
        out += [json.loads(p) for p in decoder.feed(data) if p != "[DONE]"]
    return out


async def test_json_schema_answer_validates_streamed_and_not(make_client, served_engine):
    client = await make_client(served_engine)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    body = await (await client.post("/v1/chat/completions",
                                    json={"messages": ASK, "response_format": fmt, **GREEDY})).json()
    text = body["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(text), CITY)
    assert body["choices"][0]["finish_reason"] == "stop"
    resp = await client.post("/v1/chat/completions", json={"messages": ASK, "response_format": fmt, "stream": True,
                                                          **GREEDY})
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in await chunks(resp) if c["choices"])
    assert streamed == text


async def test_json_object_and_vllm_extra_bodies(make_client, served_engine):
    client = await make_client(served_engine)
    body = await (await client.post("/v1/chat/completions", json={
        "messages": ASK, "response_format": {"type": "json_object"}, **GREEDY})).json()
    assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)
    body = await (await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Is the sky blue?"}],
        "structured_outputs": {"choice": ["yes", "no"]}, **GREEDY})).json()
    assert body["choices"][0]["message"]["content"] in ("yes", "no")
    body = await (await client.post("/v1/completions", json={
        "model": "SmolLM2-135M-Instruct", "prompt": "The year the Eiffel tower was built:",
        "guided_regex": "[0-9]{4}", **GREEDY})).json()
    assert len(body["choices"][0]["text"]) == 4 and body["choices"][0]["text"].isdigit()
    body = await (await client.post("/v1/completions", json={
        "model": "SmolLM2-135M-Instruct", "prompt": "A color:", "temperature": 0.8, "seed": 3, "max_tokens": 20,
        "guided_json": {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}},
                        "required": ["color"], "additionalProperties": False}})).json()
    assert json.loads(body["choices"][0]["text"])["color"] in ("red", "blue")


async def test_required_and_named_tool_choice_return_tool_calls(make_client, served_engine):
    client = await make_client(served_engine)
    ask = [{"role": "user", "content": "What's the weather in Paris?"}]
    body = await (await client.post("/v1/chat/completions", json={
        "messages": ask, "tools": [WEATHER, CLOCK], "tool_choice": "required", "parallel_tool_calls": False,
        **GREEDY})).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    jsonschema.validate(json.loads(call["function"]["arguments"]), schema[call["function"]["name"]])
    named = {"type": "function", "function": {"name": "get_time"}}
    resp = await client.post("/v1/chat/completions", json={"messages": ask, "tools": [WEATHER, CLOCK],
                                                          "tool_choice": named, "stream": True, **GREEDY})
    deltas = [d for c in await chunks(resp) if c["choices"]
              for d in c["choices"][0]["delta"].get("tool_calls") or []]
    first = deltas[0]
    assert first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "get_time", "arguments": ""}
    args = "".join(d["function"].get("arguments", "") for d in deltas if d["index"] == 0)
    jsonschema.validate(json.loads(args), CLOCK["function"]["parameters"])


async def test_tool_history_renders_and_the_model_answers(make_client, served_engine):
    client = await make_client(served_engine)
    messages = [{"role": "user", "content": "What's the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"}]
    resp = await client.post("/v1/chat/completions", json={"messages": messages, "tools": [WEATHER],
                                                          "tool_choice": "none", **GREEDY})
    assert resp.status == 200
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] and body["usage"]["prompt_tokens"] > 40
    assert "tool_calls" not in body["choices"][0]["message"]


async def test_bad_constraints_and_tools_are_400s_naming_the_field(make_client, served_engine):
    client = await make_client(served_engine)
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "nope"}}},
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
         "response_format"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_stock"}}},
         "tool_choice"),
        ({"tools": [WEATHER], "n": 2}, None),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ]
    for extra, field in cases:
        resp = await client.post("/v1/chat/completions", json={"messages": ASK, **GREEDY, **extra})
        body = await resp.json()
        assert resp.status == 400, (extra, body)
        if field is not None:
            assert body["error"]["param"] == field, body
        for stream in (True,):   # a grammar error raised by the engine is still an HTTP 400 when streaming
            resp = await client.post("/v1/chat/completions", json={"messages": ASK, **GREEDY, **extra,
                                                                  "stream": stream})
            assert resp.status == 400
    await wait_idle(served_engine)


async def test_eas_route_and_websocket_take_response_format(make_client, served_engine):
    client = await make_client(served_engine)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    body = await (await client.post("/", json={"prompt": "Capital of Canada, as JSON?", "use_stream_chat": False,
                                               "response_format": fmt, "temperature": 0,
                                               "max_new_tokens": 120})).json()
    jsonschema.validate(json.loads(body["response"]), CITY)
    assert body["history"][-1] == ["Capital of Canada, as JSON?", body["response"]]
    ws = await client.ws_connect("/ws")
    await ws.send_str(orjson.dumps({"prompt": "Capital of France, as JSON?", "temperature": 0,
                                    "max_new_tokens": 120, "response_format": fmt}).decode())
    parts = []
    while (msg := await ws.receive_str()) != "<EOS>":
        parts.append(msg)
    await ws.close()
    jsonschema.validate(json.loads("".join(parts)), CITY)     # frames carry the answer's increments
    await wait_idle(served_engine)
