import json

import orjson
import pytest

from protocol.eas import MAX_HISTORY_PAIRS, EasCollector, EasStreamRenderer, parse_eas_request
from protocol.errors import ProtocolError
from protocol.nul import NulDecoder
from protocol.types import Failed, Finished, FinishReason, TokenDelta, Usage

SEED_JSON = {"max_new_tokens": 4096, "use_stream_chat": False, "prompt": "What is the capital of Canada?",
             "system_prompt": "Act like you are a knowledgeable assistant.",
             "history": [["Can you tell me what's the capital of France?", "The capital of France is Paris."]],
             "temperature": 0.8, "top_k": 10, "top_p": 0.8, "do_sample": True, "use_cache": True}


def parse(body, content_type="application/json"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_eas_request(raw, content_type, "rid")


def error_of(body, content_type="application/json") -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse(body, content_type)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_string_request(content_type):
    req = parse(b"what is the capital of Canada?\n", content_type)
    assert req.prompt == "what is the capital of Canada?" and not req.stream and req.history == []
    assert req.request.messages == [{"role": "user", "content": "what is the capital of Canada?"}]
    p = req.request.params
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens) == (0.95, 30, 0.8, 2048)
    assert req.request.cap_max_tokens


def test_bare_json_string_is_the_prompt():
    assert parse(b'"hello \\u00e9"').prompt == "hello é"


def test_structured_seed_request():
    req = parse(SEED_JSON)
    assert not req.stream and req.prompt == SEED_JSON["prompt"] and req.history == SEED_JSON["history"]
    assert req.request.messages == [
        {"role": "system", "content": SEED_JSON["system_prompt"]},
        {"role": "user", "content": SEED_JSON["history"][0][0]},
        {"role": "assistant", "content": SEED_JSON["history"][0][1]},
        {"role": "user", "content": SEED_JSON["prompt"]}]
    p = req.request.params
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p) == (4096, 0.8, 10, 0.8)


def test_structured_defaults_stream_and_any_content_type():
    req = parse(b'{"prompt": "hi"}', "application/x-www-form-urlencoded")
    assert req.stream and req.request.messages == [{"role": "user", "content": "hi"}]
    assert req.request.params.max_tokens == 2048
    assert not parse({"prompt": "hi", "use_stream_chat": "false"}).stream
    assert parse({"prompt": "hi", "use_stream_chat": "true", "langchain": True}).langchain
    assert parse({"prompt": "hi", "do_sample": False}).request.params.is_greedy


@pytest.mark.parametrize("body,content_type", [
    (b"\xff\xfe bad", None), (b"\xc3", "application/json"), (b"[1, 2]", None), (b"42", "application/json"),
    (b"null", None), (b"true", None), (b"", None), (b"  \n", None), (b'""', None), (b"{bad json", None),
    (b"not json", "application/json"), (b"[" * 100_000, "application/json"),
])
def test_bad_bodies(body, content_type):
    error_of(body, content_type)


@pytest.mark.parametrize("body,param", [
    ({}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": 5}, "prompt"), ({"prompt": "x", "system_prompt": 1},
                                                                           "system_prompt"),
    ({"prompt": "x", "history": [["a"]]}, "history"), ({"prompt": "x", "history": [[1, 2]]}, "history"),
    ({"prompt": "x", "history": {"a": "b"}}, "history"), ({"prompt": "x", "history": "ab"}, "history"),
    ({"prompt": "x", "history": [["a", "b", "c"]]}, "history"), ({"prompt": "x", "history": ["ab"]}, "history"),
    ({"prompt": "x", "history": [["a", "b"]] * (MAX_HISTORY_PAIRS + 1)}, "history"),
    ({"prompt": "x", "use_stream_chat": "maybe"}, "use_stream_chat"), ({"prompt": "x", "use_cache": 1}, "use_cache"),
    ({"prompt": "x", "langchain": "yes"}, "langchain"), ({"prompt": "x", "temperature": 101}, "temperature"),
    ({"prompt": "x", "max_new_tokens": 1.5}, "max_new_tokens"), ({"prompt": "x", "top_k": "30"}, "top_k"),
    ({"prompt": "x", "n": 2}, "n"),
])
def test_structured_errors_name_the_field(body, param):
    err = error_of(orjson.dumps(body))
    assert err.param == param and param in err.message


@pytest.mark.parametrize("raw", [b'{"prompt": "x", "temperature": 1e999}', b'{"prompt": "x", "top_p": NaN}',
                                 b'{"prompt": "x", "temperature": Infinity}'])
def test_non_finite_json_numbers_are_400(raw):
    assert error_of(raw).status == 400


def test_history_accepts_seed_default_empty_pair_and_null():
    assert parse({"prompt": "x", "history": [[]]}).history == []
    assert parse({"prompt": "x", "history": None}).history == []


def collect_stream(renderer, events) -> list[dict]:
    frames = []
    for ev in events:
        frames += renderer.on_event(ev)
    frames += renderer.on_end()
    data = b"".join(frames)
    assert data.endswith(b"\0")
    return NulDecoder().feed(data)


def test_stream_frames_are_cumulative():
    history = [["q", "a"]]
    events = [TokenDelta("Ott", (1,)), TokenDelta("", (2,)), TokenDelta("awa", (3,)),
              Finished(FinishReason.STOP, Usage(3, 3))]
    frames = collect_stream(EasStreamRenderer("capital?", history), events)
    assert frames == [{"response": "Ott", "history": [["q", "a"], ["capital?", "Ott"]]},
                      {"response": "Ottawa", "history": [["q", "a"], ["capital?", "Ottawa"]]}]
    assert history == [["q", "a"]]


def test_stream_fast_frame_equals_plain_encoding():
    renderer = EasStreamRenderer('p"\0é', [])
    (frame,) = renderer.on_event(TokenDelta('a"\n\0<EOS>', (1,)))
    assert frame == orjson.dumps({"response": 'a"\n\0<EOS>', "history": [['p"\0é', 'a"\n\0<EOS>']]}) + b"\0"
    assert frame.count(b"\0") == 1


def test_stream_empty_answer_still_gets_one_frame():
    assert collect_stream(EasStreamRenderer("p", []), [Finished(FinishReason.LENGTH, Usage(1, 0))]) == [
        {"response": "", "history": [["p", ""]]}]


def test_stream_error_frame():
    renderer = EasStreamRenderer("p", [])
    frames = renderer.on_event(TokenDelta("x", (1,))) + renderer.on_event(Failed(ProtocolError("boom", status=500)))
    frames += renderer.on_end()
    decoded = NulDecoder().feed(b"".join(frames))
    assert decoded[-1] == {"error": {"message": "boom", "type": "server_error", "param": None, "code": 500}}
    assert len(decoded) == 2


def test_collector():
    collector = EasCollector("p", [["q", "a"]])
    for ev in [TokenDelta("Hel", (1,)), TokenDelta("lo", (2,)), Finished(FinishReason.STOP, Usage(1, 2))]:
        collector.feed(ev)
    assert collector.body() == {"response": "Hello", "history": [["q", "a"], ["p", "Hello"]]}
    with pytest.raises(ProtocolError):
        EasCollector("p", []).feed(Failed(ProtocolError("x")))
