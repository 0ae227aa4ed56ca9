"""Streamed tool calls through the OpenAI SDK: the deltas are accumulated as the SDK docs show."""
import json
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ["BERTH_URL"] + "/v1", api_key=os.environ["BERTH_TOKEN"])
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a given city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}]
stream = client.chat.completions.create(
    model=client.models.list().data[0].id,
    messages=[{"role": "user", "content": "What's the weather like in Paris today?"}],
    tools=tools, tool_choice="required", stream=True, temperature=0)
calls: dict[int, dict] = {}
finish_reason = None
for chunk in stream:
    choice = chunk.choices[0]
    for delta in choice.delta.tool_calls or []:
        call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
        if delta.id:
            call["id"] = delta.id
        if delta.function and delta.function.name:
            call["name"] = delta.function.name
        if delta.function and delta.function.arguments:
            call["arguments"] += delta.function.arguments
    finish_reason = choice.finish_reason or finish_reason

# the SDK's own accumulator (client.chat.completions.stream) must agree
with client.chat.completions.stream(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "What's the weather like in Paris today?"}],
        tools=tools, tool_choice="required", temperature=0) as s:
    final = s.get_final_completion()
helper_calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                for c in final.choices[0].message.tool_calls or []]
print(json.dumps({"calls": [calls[k] for k in sorted(calls)], "finish_reason": finish_reason,
                  "helper_calls": helper_calls}))
