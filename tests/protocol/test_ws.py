import json

import orjson
import pytest

from protocol.errors import ProtocolError
from protocol.ws import (EOS, Cancel, SessionState, SetSystemPrompt, WsGenerate, parse_ws_message,
                         render_error, render_text)

SYSTEM = "Act like you are programmer with 5+ years of experience."
SEED_PROMPTS = ["Please write a sorting algorithm in Python.", "Please convert the programming language to Java.",
                "Please introduce yourself.", "Please summarize the dialogue above."]


def seed_on_open_2_messages() -> list[bytes]:
    """The exact byte messages the seed's on_open_2 sends."""
    params = {"system_prompt": SYSTEM}
    messages = [json.dumps(params, ensure_ascii=False).encode("utf8")]
    for prompt in SEED_PROMPTS:
        params["prompt"] = prompt
        messages.append(json.dumps(params, ensure_ascii=False).encode("utf8"))
    return messages


def test_seed_multi_round_sequence():
    session = SessionState()
    messages = seed_on_open_2_messages()
    assert isinstance(parse_ws_message(messages[0], session, "r0"), SetSystemPrompt)
    assert session.system_prompt == SYSTEM and session.history == []
    for i, (raw, prompt) in enumerate(zip(messages[1:], SEED_PROMPTS)):
        action = parse_ws_message(raw, session, f"r{i + 1}")
        assert isinstance(action, WsGenerate) and action.stream and action.prompt == prompt
        req = action.request
        assert req.request_id == f"r{i + 1}" and req.cap_max_tokens
        assert req.messages[0] == {"role": "system", "content": SYSTEM}
        assert req.messages[-1] == {"role": "user", "content": prompt}
        assert len(req.messages) == 2 + 2 * i       # system + previous rounds + this prompt
        session.commit(prompt, f"answer {i}")
    assert session.history == [[p, f"answer {i}"] for i, p in enumerate(SEED_PROMPTS)]


def test_seed_on_open_1_and_3():
    session = SessionState()
    action = parse_ws_message(json.dumps({"prompt": "Show me a golang code example: ", "temperature": 0.9,
                                          "top_p": 0.1, "top_k": 30, "max_new_tokens": 2048,
                                          "do_sample": True}).encode(), session, "r")
    assert isinstance(action, WsGenerate) and action.stream
    p = action.request.params
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.9, 0.1, 30, 2048)
    action = parse_ws_message(json.dumps({"prompt": "MNN?", "use_stream_chat": False, "langchain": True}),
                              session, "r")
    assert not action.stream and action.langchain
    assert action.request.params.temperature == 0.95      # EAS defaults


def test_history_replaces_session_history():
    session = SessionState(system_prompt="s", history=[["old", "a"]])
    action = parse_ws_message('{"prompt": "p", "history": [["q", "a"]]}', session, "r")
    assert session.history == [["q", "a"]]
    assert [m["content"] for m in action.request.messages] == ["s", "q", "a", "p"]
    assert isinstance(parse_ws_message('{"history": []}', session, "r"), SetSystemPrompt)
    assert session.history == [] and session.system_prompt == "s"


def test_cancel():
    assert isinstance(parse_ws_message('{"action": "cancel"}', SessionState(), "r"), Cancel)


@pytest.mark.parametrize("data,param", [
    ("{not json", None), (b"\xff\xfe", None), ("[1]", None), ('"hi"', None), ("{}", "prompt"),
    ('{"prompt": ""}', "prompt"), ('{"prompt": 3}', "prompt"), ('{"action": "explode"}', "action"),
    ('{"prompt": "x", "history": [["a"]]}', "history"), ('{"prompt": "x", "temperature": NaN}', None),
    ('{"prompt": "x", "temperature": -1}', "temperature"), ('{"prompt": "x", "max_new_tokens": "9"}', "max_new_tokens"),
])
def test_bad_messages(data, param):
    with pytest.raises(ProtocolError) as info:
        parse_ws_message(data, SessionState(), "r")
    assert info.value.status == 400 and info.value.param == param
    if param == "prompt" and data == "{}":
        assert "prompt is required" in info.value.message


def test_bad_message_leaves_session_unchanged():
    session = SessionState(system_prompt="keep", history=[["q", "a"]])
    with pytest.raises(ProtocolError):
        parse_ws_message('{"system_prompt": "new", "history": [], "top_p": 7}', session, "r")
    assert session == SessionState(system_prompt="keep", history=[["q", "a"]])


def test_render_error_is_json_text():
    text = render_error(ProtocolError("bad", param="prompt"))
    assert orjson.loads(text) == {"error": {"message": "bad", "type": "invalid_request_error",
                                            "param": "prompt", "code": 400}}


@pytest.mark.parametrize("text,frames", [("", []), ("hi", ["hi"]), (EOS, ["<EO", "S>"]), ("<EOS> ", ["<EOS> "]),
                                         ("a\0b", ["a\0b"])])
def test_render_text_never_sends_bare_eos(text, frames):
    assert render_text(text) == frames
    assert EOS not in render_text(text) and "".join(render_text(text)) == text
