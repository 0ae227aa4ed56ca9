import pytest

from protocol.errors import ProtocolError
from protocol.openai import check_model, parse_chat_request, parse_completion_request, render_models


def error_of(fn, body) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn(body, "rid")
    return info.value


@pytest.mark.parametrize("body", [[], "x", 42, None, ["messages"]])
@pytest.mark.parametrize("fn", [parse_chat_request, parse_completion_request])
def test_non_object_body_is_400(fn, body):
    assert error_of(fn, body).status == 400


def test_seed_chat_content_parts_are_joined():
    body = {"model": "m", "max_completion_tokens": 2048, "stream": True, "messages": [
        {"role": "system", "content": [{"type": "text", "text": "You are helpful."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "the capital?"}]}]}
    parsed = parse_chat_request(body, "rid")
    assert parsed.request.messages == [{"role": "system", "content": "You are helpful."},
                                       {"role": "user", "content": "What is\nthe capital?"}]
    assert parsed.stream and parsed.model == "m" and parsed.flavour == "openai" and not parsed.include_usage
    assert parsed.request.params.max_tokens == 2048 and parsed.request.request_id == "rid"
    assert parsed.request.prompt is None and not parsed.request.cap_max_tokens


def test_chat_roles_and_options():
    body = {"messages": [{"role": "developer", "content": "d"}, {"role": "user", "content": "u"},
                         {"role": "assistant", "content": None}, {"role": "user", "content": "again"}],
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2}
    parsed = parse_chat_request(body, "rid")
    assert [m["role"] for m in parsed.request.messages] == ["system", "user", "assistant", "user"]
    assert parsed.request.messages[2]["content"] == ""
    assert parsed.include_usage and parsed.model is None
    assert parsed.request.params.logprobs and parsed.request.params.top_logprobs == 2


@pytest.mark.parametrize("body,param", [
    ({}, "messages"), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages"), ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"content": "x"}]}, "messages"), ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "true"}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "model": 3}, "model"),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": []}, "stream_options"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": float("nan")}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**30}, "max_tokens"),
])
def test_chat_errors_name_the_field(body, param):
    err = error_of(parse_chat_request, body)
    assert err.status == 400 and err.param == param and param in err.message


def test_completion_bladellm_seed_request():
    parsed = parse_completion_request({"prompt": "What is the capital of Canada?", "stream": "true"}, "rid")
    assert parsed.stream and parsed.flavour == "bladellm" and parsed.model is None
    assert parsed.request.prompt == "What is the capital of Canada?" and parsed.request.messages is None


@pytest.mark.parametrize("body,stream,flavour", [
    ({"model": "m", "prompt": "x"}, False, "openai"),
    ({"model": "m", "prompt": "x", "stream": True}, True, "openai"),
    ({"model": "m", "prompt": "x", "stream": "false"}, False, "bladellm"),
    ({"model": "m", "prompt": "x", "stream": "TRUE"}, True, "bladellm"),
    ({"prompt": "x", "stream": False}, False, "bladellm"),
])
def test_completion_stream_and_flavour(body, stream, flavour):
    parsed = parse_completion_request(body, "rid")
    assert (parsed.stream, parsed.flavour) == (stream, flavour)


@pytest.mark.parametrize("prompt,text,ids", [
    ("hi", "hi", None), (["hi"], "hi", None), ([1, 2, 3], None, [1, 2, 3]), ([[4, 5]], None, [4, 5]), ([0], None, [0]),
])
def test_completion_prompt_forms(prompt, text, ids):
    req = parse_completion_request({"model": "m", "prompt": prompt}, "rid").request
    assert (req.prompt, req.prompt_token_ids) == (text, ids)


@pytest.mark.parametrize("prompt", ["", [], [""], [[]], [-1], [2**63], [1, "a"], [1.5], [True], None, 5,
                                    {"a": 1}, [[1, -1]], ["a", "b"], [[1], [2]], ["a", [1]]])
def test_completion_bad_prompt(prompt):
    err = error_of(parse_completion_request, {"model": "m", "prompt": prompt})
    assert err.status == 400 and err.param == "prompt" and "prompt" in err.message


def test_batched_prompts_message():
    err = error_of(parse_completion_request, {"prompt": ["a", "b"]})
    assert "batched prompts are not supported" in err.message


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "best_of": 1000}, "best_of"), ({"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt": "x", "echo": True}, "echo"), ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": "x", "n": 10**6}, "n"), ({"prompt": "x", "stream": 1}, "stream"),
])
def test_completion_unsupported_and_caps(body, param):
    err = error_of(parse_completion_request, body)
    assert err.status == 400 and err.param == param


def test_check_model():
    served = ["smollm2", "alias"]
    assert check_model(None, served) == "smollm2"
    assert check_model("alias", served) == "alias"
    assert check_model("/model_dir/", served) == "/model_dir/"
    assert check_model("/model_dir", served) == "/model_dir"
    with pytest.raises(ProtocolError) as info:
        check_model("Qwen2.5-7B-Instruct", served)
    err = info.value
    assert err.status == 404 and err.param == "model" and err.type == "not_found_error"
    assert err.message == 'The model "Qwen2.5-7B-Instruct" does not exist.'
    assert err.to_dict()["error"]["code"] == 404


def test_render_models():
    body = render_models(["smollm2"], 8192, 1700000000)
    assert body == {"object": "list", "data": [{"id": "smollm2", "object": "model", "created": 1700000000,
                                                "owned_by": "berth", "max_model_len": 8192}]}


USER = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_structured_outputs_become_the_constraint():
    from protocol.types import Constraint

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    parsed = parse_chat_request({"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}, "r")
    assert parsed.request.constraint == Constraint("json", schema) and parsed.tools is None
    assert parsed.request.tools is None
    parsed = parse_chat_request({"messages": USER, "guided_choice": ["a", "b"]}, "r")
    assert parsed.request.constraint == Constraint("choice", ("a", "b"))
    parsed = parse_completion_request({"prompt": "hi", "response_format": {"type": "json_object"}}, "r")
    assert parsed.request.constraint == Constraint("json", {"type": "object"})
    parsed = parse_completion_request({"prompt": "hi", "structured_outputs": {"regex": "[0-9]+"}}, "r")
    assert parsed.request.constraint == Constraint("regex", "[0-9]+")
    assert parse_chat_request({"messages": USER, "response_format": {"type": "text"}}, "r").request.constraint is None


def test_tools_auto_required_named_none():
    from protocol.types import Constraint

    parsed = parse_chat_request({"messages": USER, "tools": [WEATHER]}, "r")
    assert parsed.tools.choice == "auto" and parsed.request.constraint is None
    assert parsed.request.tools == parsed.tools.tools and parsed.request.tools[0].name == "get_weather"
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    parsed = parse_chat_request({"messages": USER, "tools": [strict]}, "r")
    assert parsed.request.constraint == Constraint("tools", parsed.tools)
    parsed = parse_chat_request({"messages": USER, "tools": [WEATHER], "tool_choice": "required"}, "r")
    assert parsed.request.constraint == Constraint("tools", parsed.tools) and parsed.tools.choice == "required"
    parsed = parse_chat_request({"messages": USER, "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}}, "r")
    assert (parsed.tools.choice, parsed.tools.name) == ("named", "get_weather")
    assert parsed.request.constraint.kind == "tools"
    parsed = parse_chat_request({"messages": USER, "tools": [WEATHER], "tool_choice": "none", "n": 2}, "r")
    assert parsed.tools is None and parsed.request.tools is None and parsed.request.constraint is None
    parsed = parse_chat_request({"messages": USER, "tools": [WEATHER], "response_format": {"type": "json_object"}}, "r")
    assert parsed.request.constraint.kind == "json" and parsed.tools.choice == "auto"


def test_tool_messages_are_kept():
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "extra": 1,
                                              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": [{"type": "text", "text": "18C"}], "tool_call_id": "call_1", "name": "get_weather"},
        {"role": "tool", "content": "ok", "tool_call_id": "call_2"},
        {"role": "assistant", "content": "Warm.", "tool_calls": []},
    ]
    parsed = parse_chat_request({"messages": messages, "tools": [WEATHER]}, "r")
    assert parsed.request.messages == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "18C", "tool_call_id": "call_1", "name": "get_weather"},
        {"role": "tool", "content": "ok", "tool_call_id": "call_2"},
        {"role": "assistant", "content": "Warm."},
    ]


@pytest.mark.parametrize("message", [
    {"role": "assistant", "tool_calls": "x"},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    {"role": "assistant", "tool_calls": [{"id": "c", "type": "x", "function": {"name": "f", "arguments": "{}"}}]},
    {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]},
    {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}]},
    {"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]},
    {"role": "assistant", "tool_calls": ["c"]},
    {"role": "tool", "content": "x"},
    {"role": "tool", "content": "x", "tool_call_id": 3},
    {"role": "tool", "content": "x", "tool_call_id": "c", "name": 3},
    {"role": "tool", "tool_call_id": "c"},
])
def test_bad_tool_messages(message):
    err = error_of(parse_chat_request, {"messages": [{"role": "user", "content": "hi"}, message]})
    assert err.status == 400 and err.param == "messages"


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}}, "guided_json"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "n": 2}, "n"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True}}], "guided_regex": "a"}, "tools"),
])
def test_bad_structured_and_tool_fields(body, param):
    err = error_of(parse_chat_request, {"messages": USER, **body})
    assert err.status == 400 and err.param == param and param in err.message


def test_completions_take_constraints_but_not_tools():
    err = error_of(parse_completion_request, {"prompt": "hi", "tools": [WEATHER]})
    assert err.param == "tools" and "chat" in err.message
    err = error_of(parse_completion_request, {"prompt": "hi", "guided_choice": "a"})
    assert err.param == "guided_choice"
    assert parse_completion_request({"prompt": "hi", "tools": []}, "r").request.constraint is None


def test_harmless_values_of_those_fields_are_accepted():
    parsed = parse_chat_request({"messages": USER, "response_format": {"type": "text"}, "tools": [],
                                 "tool_choice": "none"}, "r")
    assert parsed.tools is None and parsed.request.constraint is None and parsed.request.tools is None
