"""IncrementalDetokenizer: UTF-8 split over byte tokens, stop strings across tokens, flush."""
from pathlib import Path

import pytest

from server.engine.detokenizer import IncrementalDetokenizer

EOS = 256
SMOLLM2 = Path.home() / ".cache/berth/models/SmolLM2-135M-Instruct"


class ByteTokenizer:
    """ids 0..255 are raw bytes, 256 is a special EOS token; records the longest decoded window."""

    def __init__(self):
        self.max_window = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.max_window = max(self.max_window, len(ids))
        text = bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return text if skip_special_tokens or EOS not in ids else text + "<eos>"


def run(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = []
    for token_id in ids:
        deltas.append(detok.add(token_id))
        if detok.stopped:
            break
    return deltas


def test_multibyte_characters_are_never_split():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, tok.encode("Hi "), ())
    deltas = run(detok, tok.encode("é€😀!"))
    assert deltas == ["", "é", "", "", "€", "", "", "", "😀", "!"]
    assert "\ufffd" not in "".join(deltas) and detok.text == "é€😀!"
    assert detok.flush() == ""


def test_long_output_decodes_a_small_window():
    tok = ByteTokenizer()
    text = "naïve café → 日本語 " * 60
    detok = IncrementalDetokenizer(tok, tok.encode("prompt " * 100), ())
    out = "".join(run(detok, tok.encode(text))) + detok.flush()
    assert out == text
    assert tok.max_window < 80


def test_invalid_bytes_are_held_until_flush():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], ())
    assert run(detok, [ord("a"), 0xE2, 0x82]) == ["a", "", ""]
    assert detok.flush() == "\ufffd"
    assert detok.text == "a\ufffd"


def test_special_tokens_skipped_or_kept():
    tok = ByteTokenizer()
    assert run(IncrementalDetokenizer(tok, [], ()), [ord("a"), EOS]) == ["a", ""]
    assert run(IncrementalDetokenizer(tok, [], (), skip_special_tokens=False), [ord("a"), EOS]) == ["a", "<eos>"]


def test_stop_string_across_tokens_is_excluded():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], ("STOP",))
    deltas = run(detok, tok.encode("go STOP more"))
    assert deltas == ["g", "o", " ", "", "", "", ""]
    assert detok.stopped and detok.text == "go "
    assert detok.add(ord("x")) == "" and detok.flush() == ""


def test_held_prefix_released_when_it_diverges():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], ("STOP",))
    assert run(detok, tok.encode("STOoS")) == ["", "", "", "STOo", ""]   # the last "S" may start "STOP"
    assert detok.flush() == "S" and not detok.stopped
    assert detok.text == "STOoS"


def test_held_prefix_released_by_flush():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], ("</end>",))
    assert "".join(run(detok, tok.encode("ok </en"))) == "ok "
    assert detok.flush() == "</en" and not detok.stopped


def test_earliest_stop_wins_and_overlapping_prefixes():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], ("abcd", "bc"))
    run(detok, tok.encode("xabcd"))
    assert detok.stopped and detok.text == "xa"
    detok = IncrementalDetokenizer(tok, [], ("aab",))
    run(detok, tok.encode("aaab"))   # the match starts inside held text
    assert detok.stopped and detok.text == "a"


def test_multibyte_stop_string():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], ("。",))
    run(detok, tok.encode("日本。続"))
    assert detok.stopped and detok.text == "日本"


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").is_file(), reason="SmolLM2 tokenizer not present")
def test_real_tokenizer_matches_full_decode():
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2), local_files_only=True)
    prompt = tok.encode("Say something:")
    text = " Hello, world! Ça va? 日本語 😀 emoji  spaces\n\tand   tabs. The end."
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt, ())
    deltas = run(detok, ids)
    assert not any("\ufffd" in d for d in deltas)
    out = "".join(deltas) + detok.flush()
    assert out == tok.decode(ids, skip_special_tokens=True)
    detok = IncrementalDetokenizer(tok, prompt, ("world",))
    run(detok, ids)
    assert detok.stopped and detok.text == " Hello, "
