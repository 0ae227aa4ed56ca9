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


import pytest as _pytest  # noqa: E402


@_pytest.mark.parametrize("field, value", [
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
    ("tools", [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]),
    ("tool_choice", "required"),
    ("functions", [{"name": "f"}]),
    ("guided_json", {"type": "object"}),
    ("guided_choice", ["a", "b"]),
    ("structured_outputs", {"choice": ["a"]}),
])
def test_fields_berth_cannot_honour_yet_get_a_400_naming_them(field, value):
    from protocol.errors import ProtocolError
    from protocol.openai import parse_chat_request

    body = {"messages": [{"role": "user", "content": "hi"}], field: value}
    with _pytest.raises(ProtocolError) as err:
        parse_chat_request(body, "r")
    assert err.value.status == 400 and err.value.param == field and field in str(err.value)


def test_harmless_values_of_those_fields_are_accepted():
    from protocol.openai import parse_chat_request, parse_completion_request

    parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "text"},
                        "tools": [], "tool_choice": "none"}, "r")
    from protocol.errors import ProtocolError
    with _pytest.raises(ProtocolError, match="response_format"):
        parse_completion_request({"prompt": "hi", "response_format": {"type": "json_object"}}, "r")
