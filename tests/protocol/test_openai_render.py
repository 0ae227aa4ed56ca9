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
