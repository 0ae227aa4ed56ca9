import pytest
from hypothesis import given, settings, strategies as st

from protocol.nul import NulDecoder, encode_frame


def test_frame_has_exactly_one_nul_even_if_text_holds_nul():
    frame = encode_frame({"response": "a\0b", "history": [["\0", "é"]]})
    assert frame.endswith(b"\0") and frame.count(b"\0") == 1


def test_one_byte_at_a_time_multibyte():
    objs = [{"response": "世界🎉"}, {"response": "x\0y\n\ndata: [DONE]\n\n<EOS>"}, {}]
    data = b"".join(encode_frame(o) for o in objs)
    decoder, out = NulDecoder(), []
    for i in range(len(data)):
        out += decoder.feed(data[i:i + 1])
    assert out == objs and decoder.pending == b""


def test_split_frames_and_empty_frames():
    decoder = NulDecoder()
    assert decoder.feed(b'{"a":1}\0\0{"b"') == [{"a": 1}]
    assert decoder.pending == b'{"b"'
    assert decoder.feed(b':2}\0') == [{"b": 2}]


def test_non_object_frame_raises():
    with pytest.raises(ValueError):
        NulDecoder().feed(b"[1]\0")
    with pytest.raises(ValueError):
        NulDecoder().feed(b"{bad\0")


def test_seed_client_split_matches():
    """The seed client splits on NUL and json-loads each non-empty chunk."""
    import json
    data = encode_frame({"response": "a", "history": [["p", "a"]]}) + encode_frame({"response": "ab"})
    assert [json.loads(c) for c in data.split(b"\0") if c] == [{"response": "a", "history": [["p", "a"]]},
                                                              {"response": "ab"}]


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(), min_size=1, max_size=5), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_roundtrip_any_split(texts, cuts):
    data = b"".join(encode_frame({"t": t}) for t in texts)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    decoder, out = NulDecoder(), []
    for a, b in zip(points, points[1:]):
        out += decoder.feed(data[a:b])
    assert [o["t"] for o in out] == texts
