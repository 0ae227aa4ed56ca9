"""Text into overlapping chunks of at most `chunk_tokens` tokens, cut at sentence boundaries.

Sentences end at . ! ? (followed by a space or the end), at 。！？ (no space needed: Chinese and Japanese
have none) and at line breaks. A sentence longer than a chunk is cut at spaces, and a run with no
spaces (a long CJK sentence, a URL) by characters. A chunk's size is the sum of its pieces' token
counts: that never undercounts the estimate below, and a BPE tokenizer's count of the joined text
rarely exceeds it. Consecutive chunks share up to `chunk_overlap` tokens: whole trailing sentences of
the previous chunk, or the tail of its last sentence when even that one is too long.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable

from server.knowledge.query import CJK_RUN

CountTokens = Callable[[str], int]

_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?:\s+|$)|[。！？]+[”’」』）)]*\s*|\n\s*")
_WORD = re.compile(r"\S+\s*|\s+")


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate: one token per CJK character, one per 4 other characters."""
    num_cjk = sum(len(run) for run in CJK_RUN.findall(text))
    return num_cjk + math.ceil((len(text) - num_cjk) / 4)


def split_sentences(text: str) -> list[str]:
    """Pieces that join back to `text`, each ending at a sentence boundary (the last may not)."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if match.end() > start:
            pieces.append(text[start:match.end()])
            start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def chunk_text(text: str, count_tokens: CountTokens = estimate_tokens, chunk_tokens: int = 256,
               chunk_overlap: int = 32) -> list[str]:
    """The chunks of `text`, stripped, none empty; each at most `chunk_tokens` tokens (summed over pieces)."""
    check_chunk_sizes(chunk_tokens, chunk_overlap)
    chunks: list[str] = []
    window: list[tuple[str, int]] = []   # (piece, num_tokens) of the chunk being built; never only overlap
    num_tokens = 0
    for piece in _pieces(text, count_tokens, chunk_tokens):
        if window and num_tokens + piece[1] > chunk_tokens:
            chunks.append("".join(p for p, _ in window))
            window = _overlap(window, count_tokens, chunk_overlap)
            num_tokens = sum(n for _, n in window)
            while window and num_tokens + piece[1] > chunk_tokens:
                num_tokens -= window.pop(0)[1]
        window.append(piece)
        num_tokens += piece[1]
    if window:
        chunks.append("".join(p for p, _ in window))
    return [chunk.strip() for chunk in chunks if chunk.strip()]


def check_chunk_sizes(chunk_tokens: int, chunk_overlap: int) -> None:
    if chunk_tokens < 1 or not 0 <= chunk_overlap < chunk_tokens:
        raise ValueError(f"need chunk_tokens >= 1 and 0 <= chunk_overlap < chunk_tokens, got "
                         f"{chunk_tokens} and {chunk_overlap}")


def _pieces(text: str, count_tokens: CountTokens, max_tokens: int):
    """(piece, num_tokens) with every piece at most `max_tokens`: sentences, else words, else characters."""
    for sentence in split_sentences(text):
        num_tokens = count_tokens(sentence)
        if num_tokens <= max_tokens:
            yield sentence, num_tokens
            continue
        for word in _WORD.findall(sentence):
            num_tokens = count_tokens(word)
            if num_tokens <= max_tokens:
                yield word, num_tokens
            else:
                yield from _split_chars(word, count_tokens, max_tokens)


def _split_chars(text: str, count_tokens: CountTokens, max_tokens: int):
    """Longest prefixes of at most `max_tokens`, by binary search over a window of 8 characters per token."""
    start = 0
    while start < len(text):
        lo, hi = start + 1, min(len(text), start + 8 * max_tokens)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count_tokens(text[start:mid]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        yield text[start:lo], count_tokens(text[start:lo])
        start = lo


def _overlap(window: list[tuple[str, int]], count_tokens: CountTokens, max_tokens: int) -> list[tuple[str, int]]:
    """The trailing pieces of `window` that fit in `max_tokens`; if none does, the tail of the last one."""
    tail, total = [], 0
    for piece, num_tokens in reversed(window):
        if total + num_tokens > max_tokens:
            break
        tail.insert(0, (piece, num_tokens))
        total += num_tokens
    if tail or not window or max_tokens == 0:
        return tail
    words = [(w, count_tokens(w)) for w in _WORD.findall(window[-1][0])]
    if len(words) == 1:   # no spaces: take characters
        words = [(c, count_tokens(c)) for c in window[-1][0][-max_tokens * 8:]]
    return _overlap(words, count_tokens, max_tokens) if len(words) > 1 else []
