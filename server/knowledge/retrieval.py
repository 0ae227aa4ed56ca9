"""Keyword retrieval over a store: the word list, the CJK list when the question has CJK text, fused.

Fusion is reciprocal rank fusion (Cormack et al. 2009): score = sum over lists of 1 / (60 + rank), keyed
on chunk_id, so the two lists' incomparable scores (a word BM25 and a bigram BM25) never meet. When only
one list has hits, its own ranking and scores pass through unchanged (SQLite: -bm25(); PostgreSQL:
ts_rank_cd; higher is better either way), so Hit.score is comparable only within one answer.
"""
from __future__ import annotations

from server.knowledge.query import parse_query
from server.knowledge.store import Store
from server.knowledge.types import Hit

RRF_K = 60
MAX_TOP_K = 100


def retrieve(store: Store, question: str, top_k: int) -> list[Hit]:
    top_k = max(1, min(top_k, MAX_TOP_K))
    query = parse_query(question)
    if query.is_empty:
        return []
    limit = max(2 * top_k, 10)   # each list a little deeper than asked, so fusion has something to reorder
    lists = [store.search_words(query.words, limit), store.search_grams(query.grams, limit)]
    return fuse([hits for hits in lists if hits], top_k)


def fuse(lists: list[list[Hit]], top_k: int) -> list[Hit]:
    if not lists:
        return []
    if len(lists) == 1:
        return lists[0][:top_k]
    scores: dict[str, float] = {}
    first_seen: dict[str, Hit] = {}
    for hits in lists:
        for hit in hits:
            scores[hit.chunk_id] = scores.get(hit.chunk_id, 0.0) + 1.0 / (RRF_K + hit.rank)
            first_seen.setdefault(hit.chunk_id, hit)
    best = sorted(scores, key=lambda chunk_id: -scores[chunk_id])[:top_k]
    return [Hit(chunk_id, first_seen[chunk_id].doc_name, first_seen[chunk_id].text, scores[chunk_id], rank)
            for rank, chunk_id in enumerate(best, 1)]
