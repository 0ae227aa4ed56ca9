import orjson
import pytest
from hypothesis import given, settings, strategies as st

from protocol.sse import DONE, SseDecoder, encode_event


def feed_bytewise(decoder, data: bytes) -> list[str]:
    out = []
    for i in range(len(data)):
        out += decoder.feed(data[i:i + 1])
    return out


def test_dict_event_is_one_data_line():
    frame = encode_event({"text": "a\nb\r\nc", "x": "é"})
    assert frame.startswith(b"data: {") and frame.endswith(b"}\n\n")
    assert frame.count(b"\n") == 2
    assert orjson.loads(frame[6:-2]) == {"text": "a\nb\r\nc", "x": "é"}


def test_multiline_str_becomes_several_data_lines():
    assert encode_event("one\ntwo\r\nthree\rfour") == b"data: one\ndata: two\ndata: three\ndata: four\n\n"
    assert SseDecoder().feed(encode_event("one\ntwo\r\nthree")) == ["one\ntwo\nthree"]


def test_bytes_payload_and_done():
    assert encode_event(b"[DONE]") == DONE
    assert SseDecoder().feed(DONE) == ["[DONE]"]


def test_stream_fed_one_byte_at_a_time_with_multibyte_utf8():
    events = [{"text": "héllo 世界 🎉"}, "plain\nmulti", {"n": 1}]
    data = b"".join(encode_event(e) for e in events) + DONE
    decoded = feed_bytewise(SseDecoder(), data)
    assert [orjson.loads(decoded[0]), decoded[1], orjson.loads(decoded[2]), decoded[3]] == events + ["[DONE]"]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_line_endings(ending):
    raw = b"data: a" + ending + b"data: b" + ending + ending + b"data: c" + ending + ending
    assert SseDecoder().feed(raw) == ["a\nb", "c"]
    assert feed_bytewise(SseDecoder(), raw) == ["a\nb", "c"]


def test_crlf_split_between_chunks_is_one_line_end():
    decoder = SseDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n\r") == ["a"]        # CR LF = end of line, then CR = blank line
    assert decoder.feed(b"\ndata: b\n\n") == ["b"]   # this LF pairs with the CR before it


def test_comments_other_fields_and_no_space():
    raw = b": keep-alive\nevent: update\nid: 7\nretry: 100\nunknown\ndata:x\ndata:  y\n\n"
    assert SseDecoder().feed(raw) == ["x\n y"]


def test_event_without_data_is_not_dispatched_and_empty_data_is():
    assert SseDecoder().feed(b"event: ping\n\n: c\n\n") == []
    assert SseDecoder().feed(b"data\n\n") == [""]


def test_bom_is_dropped_even_when_split():
    decoder = SseDecoder()
    assert decoder.feed(b"\xef\xbb") == []
    assert decoder.feed(b"\xbfdata: 1\n\n") == ["1"]


def test_incomplete_event_is_held_back():
    decoder = SseDecoder()
    assert decoder.feed(b"data: partial\n") == []
    assert decoder.feed(b"\n") == ["partial"]


def test_model_text_cannot_break_framing():
    nasty = "a\0b\n\ndata: [DONE]\n\nc<EOS>\r"
    frames = encode_event({"text": nasty}) + DONE
    decoded = feed_bytewise(SseDecoder(), frames)
    assert len(decoded) == 2 and decoded[1] == "[DONE]"
    assert orjson.loads(decoded[0])["text"] == nasty


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(), min_size=1, max_size=5), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_roundtrip_any_split(texts, cuts):
    data = b"".join(encode_event({"t": t}) for t in texts)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    decoder, out = SseDecoder(), []
    for a, b in zip(points, points[1:]):
        out += decoder.feed(data[a:b])
    assert [orjson.loads(o)["t"] for o in out] == texts
