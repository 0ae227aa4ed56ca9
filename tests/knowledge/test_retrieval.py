"""Query terms from free text, and reciprocal rank fusion (no store needed)."""
from __future__ import annotations

from server.knowledge import Hit
from server.knowledge.query import MAX_WORDS, cjk_bigrams, parse_query
from server.knowledge.retrieval import RRF_K, fuse
from server.knowledge.sqlite_store import fts_query


def test_words_are_lowercased_alphanumeric_runs_without_stopwords_or_repeats():
    query = parse_query('What is the "capital" of CANADA? NEAR(x*) canada -OR- 42')
    assert query.words == ("capital", "canada", "near", "x", "42") and query.grams == ()


def test_cjk_text_becomes_bigrams_and_mixed_text_both():
    assert parse_query("故宫在哪里").grams == ("故宫", "宫在", "在哪", "哪里")
    query = parse_query("Where is 嘉峪关? 猫")
    assert query.words == ()   # "where", "is" are stopwords
    assert query.grams == ("嘉峪", "峪关", "猫")
    assert cjk_bigrams("北京 北京是") == ["北京", "北京", "京是"]   # repeats kept: term frequency


def test_queries_of_stopwords_and_punctuation_are_empty():
    assert parse_query("what is the ... ?!").is_empty and parse_query("").is_empty


def test_terms_are_capped():
    assert len(parse_query(" ".join(f"term{i}" for i in range(100))).words) == MAX_WORDS


def test_fts_terms_are_quoted():
    assert fts_query(("a", 'b"c')) == '"a" OR "b""c"'


def make_hits(*chunk_ids: str) -> list[Hit]:
    return [Hit(chunk_id, "doc", chunk_id, 10.0 - rank, rank) for rank, chunk_id in enumerate(chunk_ids, 1)]


def test_one_list_passes_through_with_its_own_scores():
    hits = make_hits("d:0", "d:1", "d:2")
    assert fuse([hits], 2) == hits[:2]
    assert fuse([], 3) == []


def test_two_lists_fuse_by_reciprocal_rank():
    fused = fuse([make_hits("a:0", "b:0", "c:0"), make_hits("b:0", "d:0")], 3)
    assert [h.chunk_id for h in fused] == ["b:0", "a:0", "d:0"]
    assert [h.rank for h in fused] == [1, 2, 3]
    assert fused[0].score == 1 / (RRF_K + 2) + 1 / (RRF_K + 1)
