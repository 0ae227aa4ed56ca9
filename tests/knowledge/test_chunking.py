"""Chunking: token bounds, overlap, sentence boundaries, CJK."""
from __future__ import annotations

import pytest

from server.knowledge.chunking import chunk_text, estimate_tokens, split_sentences


def count_words(text: str) -> int:
    return len(text.split())


def numbered_sentences(n: int) -> list[str]:
    return [f"Sentence number {i} says something short." for i in range(n)]   # 6 words each


@pytest.mark.parametrize("text", [
    "One. Two! Three? Four.\nFive\n\nSix.",
    "中文句子。第二句！第三句？最后",
    "Version 3.14 is not a boundary. e.g. this is.",
    "",
    "no boundary at all",
])
def test_sentences_join_back_to_the_text(text):
    assert "".join(split_sentences(text)) == text


def test_sentence_boundaries():
    assert split_sentences("One. Two! Three? Pi is 3.14 here.\nNext line") == \
        ["One. ", "Two! ", "Three? ", "Pi is 3.14 here.\n", "Next line"]
    assert split_sentences("北京是首都。上海很大！你去过吗？好") == ["北京是首都。", "上海很大！", "你去过吗？", "好"]


@pytest.mark.parametrize("count_tokens", [count_words, estimate_tokens])
@pytest.mark.parametrize("chunk_tokens, chunk_overlap", [(20, 0), (20, 8), (64, 16), (7, 3)])
def test_chunks_stay_within_the_token_bound_and_keep_every_sentence(count_tokens, chunk_tokens, chunk_overlap):
    sentences = numbered_sentences(40)
    chunks = chunk_text(" ".join(sentences), count_tokens, chunk_tokens, chunk_overlap)
    assert chunks and all(count_tokens(chunk) <= chunk_tokens for chunk in chunks)
    joined = " ".join(chunks)
    assert all(f"number {i} " in joined for i in range(40))


def test_chunks_end_on_sentence_boundaries():
    chunks = chunk_text(" ".join(numbered_sentences(40)), count_words, 20, 0)
    assert all(chunk.endswith("short.") for chunk in chunks)
    assert all(count_words(chunk) == 18 for chunk in chunks[:-1])   # three whole sentences fit, a fourth does not


def test_consecutive_chunks_overlap_by_whole_sentences():
    sentences = numbered_sentences(20)
    chunks = chunk_text(" ".join(sentences), count_words, 20, 7)
    for previous, chunk in zip(chunks, chunks[1:]):
        last_sentence = previous[previous.rfind("Sentence"):]
        assert chunk.startswith(last_sentence)
    assert chunk_text(" ".join(sentences), count_words, 20, 0)[1].startswith("Sentence number 3 ")


def test_overlap_falls_back_to_the_tail_of_a_long_sentence():
    text = " ".join(f"w{i}" for i in range(15)) + ". " + " ".join(f"x{i}" for i in range(10)) + "."
    chunks = chunk_text(text, count_words, 16, 4)
    assert chunks[1] == "w11 w12 w13 w14. " + " ".join(f"x{i}" for i in range(10)) + "."
    text = " ".join(f"w{i}" for i in range(15)) + ". " + " ".join(f"x{i}" for i in range(15)) + "."
    assert chunk_text(text, count_words, 16, 4)[1].startswith("w14. x0")   # the overlap shrinks to fit


def test_a_sentence_longer_than_a_chunk_is_split_on_spaces():
    words = [f"word{i}" for i in range(100)]
    chunks = chunk_text(" ".join(words), count_words, 10, 0)
    assert [c.split() for c in chunks] == [words[i:i + 10] for i in range(0, 100, 10)]


def test_a_run_without_spaces_is_split_by_characters():
    chunks = chunk_text("x" * 1000, estimate_tokens, 50, 0)
    assert "".join(chunks) == "x" * 1000
    assert all(estimate_tokens(c) <= 50 for c in chunks) and len(chunks) == 5


def test_chinese_chunks_on_its_own_punctuation():
    sentences = [f"这是第{i}个句子，讲一个很短的故事。" for i in range(30)]   # 15 or 16 characters
    chunks = chunk_text("".join(sentences), estimate_tokens, 50, 0)
    assert len(chunks) > 5
    assert all(estimate_tokens(c) <= 50 and c.endswith("。") for c in chunks)
    assert "".join(chunks) == "".join(sentences)


def test_chinese_overlap_and_long_unpunctuated_text():
    text = "".join(f"第{i}句话在这里。" for i in range(40))
    chunks = chunk_text(text, estimate_tokens, 40, 10)
    assert all(chunk.startswith(prev[prev.rfind("第", 0, len(prev) - 1):]) for prev, chunk in zip(chunks, chunks[1:]))
    long_run = "北京是中华人民共和国的首都" * 40
    chunks = chunk_text(long_run, estimate_tokens, 64, 0)
    assert all(estimate_tokens(c) <= 64 for c in chunks) and "".join(chunks) == long_run


def test_estimate_counts_cjk_characters_and_quarter_words():
    assert estimate_tokens("") == 0
    assert estimate_tokens("北京") == 2
    assert estimate_tokens("abcd") == 1 and estimate_tokens("abcde") == 2
    assert estimate_tokens("北京 abcd") == 2 + 2


@pytest.mark.parametrize("chunk_tokens, chunk_overlap", [(0, 0), (10, 10), (10, -1)])
def test_bad_sizes_are_refused(chunk_tokens, chunk_overlap):
    with pytest.raises(ValueError):
        chunk_text("text", count_words, chunk_tokens, chunk_overlap)


def test_whitespace_only_text_has_no_chunks():
    assert chunk_text(" \n\n \t", count_words, 10, 2) == []
