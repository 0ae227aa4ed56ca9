import orjson
import pytest

from protocol.errors import ProtocolError
from protocol.openai import (ChatCollector, ChatStreamRenderer, CompletionCollector, CompletionStreamRenderer)
from protocol.sse import DONE, SseDecoder
from protocol.types import Failed, Finished, FinishReason, TokenDelta, TokenLogprob, Usage

SEED_BLADE_CHUNK = ('{"id":"91f9a28a-f949-40fb-b720-08ceeeb2****","choices":[{"finish_reason":"","index":0,'
                    '"logprobs":null,"text":" The"}],"object":"text_completion","usage":{"prompt_tokens":7,'
                    '"completion_tokens":1,"total_tokens":8},"error_info":null}')


def run(renderer, events) -> list:
    frames = []
    for ev in events:
        frames += renderer.on_event(ev)
    frames += renderer.on_end()
    assert frames[-1] == DONE and frames.count(DONE) == 1
    decoded = SseDecoder().feed(b"".join(frames))
    return [orjson.loads(d) for d in decoded[:-1]]


def answer_events(index=0, texts=(" The", " capital", ""), usage=Usage(7, 3, cached_tokens=4),
                  reason=FinishReason.STOP):
    events = [TokenDelta(t, (10 + i,), index=index, num_prompt_tokens=7 if i == 0 else None)
              for i, t in enumerate(texts)]
    return events + [Finished(reason, usage, index=index)]


def test_chat_stream_shape():
    chunks = run(ChatStreamRenderer("rid", "m", 123, 1, include_usage=False), answer_events())
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-rid" for c in chunks)
    assert all(c["model"] == "m" and c["created"] == 123 and "usage" not in c for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[1:3] == [{"content": " The"}, {"content": " capital"}]    # the empty delta is skipped
    assert deltas[3] == {} and chunks[3]["choices"][0]["finish_reason"] == "stop"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:3]] == [None] * 3


def test_chat_stream_usage_chunk_n2():
    events = answer_events(0, usage=Usage(7, 3, 4)) + answer_events(1, usage=Usage(7, 5, 4),
                                                                   reason=FinishReason.LENGTH)
    chunks = run(ChatStreamRenderer("rid", "m", 1, 2, include_usage=True), events)
    assert all("usage" in c for c in chunks) and all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 8, "total_tokens": 15,
                                   "prompt_tokens_details": {"cached_tokens": 4}}
    finals = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks[:-1]
              if c["choices"][0]["finish_reason"]}
    assert finals == {0: "stop", 1: "length"}
    roles = [c["choices"][0]["index"] for c in chunks[:-1] if c["choices"][0]["delta"].get("role")]
    assert roles == [0, 1]


def test_chat_abort_and_role_on_finish_only():
    chunks = run(ChatStreamRenderer("rid", "m", 1, 1, False), [Finished(FinishReason.ABORT, Usage(3, 0))])
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[1]["choices"][0]["finish_reason"] == "abort"


def test_chat_logprobs_chunk():
    lp = TokenLogprob("é", -0.5, 9, top=(("é", -0.5, 9), ("e", float("-inf"), 8)))
    chunks = run(ChatStreamRenderer("rid", "m", 1, 1, False),
                 [TokenDelta("", (9,), logprobs=(lp,)), Finished(FinishReason.STOP, Usage(1, 1))])
    content = chunks[1]["choices"][0]["logprobs"]["content"]
    assert chunks[1]["choices"][0]["delta"] == {"content": ""}
    assert content == [{"token": "é", "logprob": -0.5, "bytes": [195, 169], "top_logprobs": [
        {"token": "é", "logprob": -0.5, "bytes": [195, 169]}, {"token": "e", "logprob": -9999.0, "bytes": [101]}]}]


def test_openai_mid_stream_error_then_done_once():
    renderer = ChatStreamRenderer("rid", "m", 1, 1, True)
    frames = renderer.on_event(TokenDelta("a", (1,)))
    frames += renderer.on_event(Failed(ProtocolError("engine failed", status=500)))
    frames += renderer.on_event(TokenDelta("b", (2,))) + renderer.on_end() + renderer.on_error(ProtocolError("x"))
    decoded = SseDecoder().feed(b"".join(frames))
    assert decoded[-1] == "[DONE]" and decoded.count("[DONE]") == 1
    assert orjson.loads(decoded[-2]) == {"error": {"message": "engine failed", "type": "server_error",
                                                   "param": None, "code": 500}}


def test_completion_openai_stream():
    chunks = run(CompletionStreamRenderer("rid", "m", 5, 1, True, "openai"), answer_events())
    assert all(c["object"] == "text_completion" and c["id"] == "cmpl-rid" for c in chunks)
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == [" The", " capital", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, "stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 10


def test_bladellm_chunks_match_seed_shape():
    chunks = run(CompletionStreamRenderer("91f9", "m", 5, 1, False, "bladellm"), answer_events())
    seed = orjson.loads(SEED_BLADE_CHUNK)
    for chunk in chunks:
        assert set(seed) <= set(chunk)
        assert list(chunk) == ["id", "object", "created", "model", "choices", "usage", "error_info"]
        assert set(chunk["choices"][0]) == set(seed["choices"][0])
        assert set(chunk["usage"]) == set(seed["usage"]) and chunk["error_info"] is None
        assert chunk["id"] == "91f9" and chunk["choices"][0]["logprobs"] is None
    assert [c["choices"][0]["finish_reason"] for c in chunks] == ["", "", "stop"]
    assert [c["choices"][0]["text"] for c in chunks] == [" The", " capital", ""]
    assert [c["usage"] for c in chunks] == [
        {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
        {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
        {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}]


def test_bladellm_error_chunk_then_done():
    renderer = CompletionStreamRenderer("rid", "m", 5, 1, False, "bladellm")
    frames = renderer.on_event(TokenDelta("a", (1,))) + renderer.on_error(ProtocolError("boom", status=503))
    frames += renderer.on_end()
    decoded = SseDecoder().feed(b"".join(frames))
    assert decoded[-1] == "[DONE]" and decoded.count("[DONE]") == 1
    last = orjson.loads(decoded[-2])
    assert last["error_info"]["message"] == "boom" and last["error_info"]["code"] == 503
    assert last["choices"][0]["finish_reason"] == "error"


def test_completion_logprobs_stream():
    lps = (TokenLogprob("ab", -1.0, 1, top=(("ab", -1.0, 1),)), TokenLogprob("c", -2.0, 2))
    chunks = run(CompletionStreamRenderer("rid", "m", 5, 1, False, "openai"),
                 [TokenDelta("x", (0,), logprobs=(TokenLogprob("x", -0.1, 0),)), TokenDelta("abc", (1, 2), logprobs=lps),
                  Finished(FinishReason.LENGTH, Usage(1, 3))])
    assert chunks[1]["choices"][0]["logprobs"] == {"tokens": ["ab", "c"], "token_logprobs": [-1.0, -2.0],
                                                   "top_logprobs": [{"ab": -1.0}, {}], "text_offset": [1, 3]}


@pytest.mark.parametrize("nasty", ["a\0b", "\n\ndata: [DONE]\n\n", "<EOS>", "\r\r\n"])
def test_model_text_keeps_sse_framing(nasty):
    chunks = run(CompletionStreamRenderer("rid", "m", 5, 1, False, "bladellm"),
                 [TokenDelta(nasty, (1,)), Finished(FinishReason.STOP, Usage(1, 1))])
    assert chunks[0]["choices"][0]["text"] == nasty and len(chunks) == 2


def test_chat_collector():
    collector = ChatCollector("rid", "m", 9, 2)
    for ev in answer_events(1, usage=Usage(7, 2, 1)) + answer_events(0, texts=("Hi",), usage=Usage(7, 1, 1)):
        collector.feed(ev)
    body = collector.body()
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-rid" and body["created"] == 9
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "logprobs": None, "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": " The capital"}, "logprobs": None,
         "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
                             "prompt_tokens_details": {"cached_tokens": 1}}


def test_completion_collector_and_failure():
    collector = CompletionCollector("rid", "m", 9, 1)
    collector.feed(TokenDelta("ab", (1,), logprobs=(TokenLogprob("ab", -1.0, 1),)))
    collector.feed(Finished(FinishReason.LENGTH, Usage(2, 1)))
    body = collector.body()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "ab"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["logprobs"]["tokens"] == ["ab"]
    err = ProtocolError("too long", status=400, param="prompt")
    with pytest.raises(ProtocolError) as info:
        CompletionCollector("rid", "m", 9, 1).feed(Failed(err))
    assert info.value is err


def test_event_index_out_of_range_is_a_bug():
    with pytest.raises(ValueError):
        ChatStreamRenderer("rid", "m", 1, 1, False).on_event(TokenDelta("a", (1,), index=1))


# --- tools -------------------------------------------------------------------------------------

from protocol.types import ToolFunction, ToolSpec  # noqa: E402

SPEC = ToolSpec((ToolFunction("get_weather", "Weather", {"type": "object", "properties": {"city": {"type": "string"}}}),))
TOOL_TEXT = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')


def token_events(text, size=5, reason=FinishReason.STOP, index=0):
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    return ([TokenDelta(p, (i,), index=index, num_prompt_tokens=9 if i == 0 else None) for i, p in enumerate(pieces)]
            + [Finished(reason, Usage(9, len(pieces)), index=index)])


def test_chat_collector_tool_calls():
    collector = ChatCollector("rid", "m", 9, 1, tools=SPEC)
    for ev in token_events(TOOL_TEXT):
        collector.feed(ev)
    choice = collector.body()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] == "I will check."
    calls = message["tool_calls"]
    assert [(c["type"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("function", "get_weather", '{"city": "Paris"}'), ("function", "get_weather", '{"city": "Oslo"}')]
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]


@pytest.mark.parametrize("text,reason,content,finish", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>', FinishReason.STOP, None, "tool_calls"),
    ('<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>', FinishReason.LENGTH, None, "length"),
    ("Just text.", FinishReason.STOP, "Just text.", "stop"),
    ("", FinishReason.STOP, "", "stop"),
])
def test_chat_collector_tools_content_and_reason(text, reason, content, finish):
    collector = ChatCollector("rid", "m", 9, 1, tools=SPEC)
    for ev in token_events(text, reason=reason):
        collector.feed(ev)
    choice = collector.body()["choices"][0]
    assert choice["message"]["content"] == content and choice["finish_reason"] == finish
    assert ("tool_calls" in choice["message"]) == (finish != "stop")


def test_chat_stream_tool_calls_shape():
    chunks = run(ChatStreamRenderer("rid", "m", 1, 1, False, tools=SPEC), token_events(TOOL_TEXT, size=3))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    content = "".join(d.get("content", "") for d in deltas)
    assert content == "I will check."
    tool_deltas = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert all(len(t) == 1 for t in tool_deltas)
    starts = [t[0] for t in tool_deltas if "id" in t[0]]
    assert [(s["index"], s["type"], s["function"]) for s in starts] == [
        (0, "function", {"name": "get_weather", "arguments": ""}), (1, "function", {"name": "get_weather", "arguments": ""})]
    for t in tool_deltas:
        if "id" not in t[0]:
            assert set(t[0]) == {"index", "function"} and list(t[0]["function"]) == ["arguments"]
    args = ["".join(t[0]["function"]["arguments"] for t in tool_deltas if t[0]["index"] == k) for k in (0, 1)]
    assert args == ['{"city": "Paris"}', '{"city": "Oslo"}']
    assert len(tool_deltas) > 4                                # arguments stream in pieces
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and deltas[-1] == {}


def test_chat_stream_tool_calls_with_the_openai_sdk():
    pytest.importorskip("openai")
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    chunks = run(ChatStreamRenderer("rid", "m", 1, 1, True, tools=SPEC), token_events(TOOL_TEXT, size=4))
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    choice = state.get_final_completion().choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I will check."
    assert [(c.function.name, orjson.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)


def test_chat_stream_with_tools_but_plain_text():
    text = "Hello <b>world</b>\n"
    chunks = run(ChatStreamRenderer("rid", "m", 1, 1, False, tools=SPEC), token_events(text, size=2))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks)


def test_chat_stream_tools_logprobs_ride_on_content():
    lp = lambda t, i: (TokenLogprob(t, -0.5, i),)  # noqa: E731
    events = [TokenDelta("Hi", (1,), logprobs=lp("Hi", 1)), TokenDelta(" <tool", (2,), logprobs=lp(" <tool", 2)),
              TokenDelta("bar>", (3,), logprobs=lp("bar>", 3)),
              TokenDelta('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>', (4,), logprobs=lp("x", 4)),
              Finished(FinishReason.STOP, Usage(1, 4))]
    chunks = run(ChatStreamRenderer("rid", "m", 1, 1, False, tools=SPEC), events)
    content = [c["choices"][0] for c in chunks if c["choices"][0]["delta"].get("content")]
    assert [c["delta"]["content"] for c in content] == ["Hi", " <toolbar>"]
    assert [[t["token"] for t in c["logprobs"]["content"]] for c in content] == [["Hi"], [" <tool", "bar>"]]
    tool = [c["choices"][0] for c in chunks if "tool_calls" in c["choices"][0]["delta"]]
    assert tool and all(c["logprobs"] is None for c in tool)
