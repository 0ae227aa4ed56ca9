"""A free-text question as search terms that every store can use safely.

Only letters and digits survive: `words` are the \\w+ runs outside CJK text, lowercased, English
stopwords dropped; `grams` are the character bigrams of each CJK run. Chinese and Japanese have no
spaces to split words on, so overlapping 2-character substrings stand in for words, as in Lucene's
CJKAnalyzer; the stores index the same bigrams of every chunk (cjk_bigrams). NOTE: bigrams, not
trigrams: most Chinese words are two characters, so a question and its answer often share no
trigram at all ("故宫在哪里" vs "故宫位于北京的中心"). A lone CJK character stays a unigram.
No user character ever reaches a store's query syntax unquoted, and a question of stopwords and
punctuation only has no terms (retrieve returns []).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MAX_QUERY_CHARS = 4000
MAX_WORDS = 32
MAX_GRAMS = 64

# Han (with extensions and compatibility ideographs), hiragana and katakana. Hangul is left out:
# Korean separates its words with spaces, so the word index handles it.
CJK_RUN = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]+")
_WORD = re.compile(r"\w+")

STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing don down during each few for from further had has have having he
her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor
not now of off on once only or other our ours ourselves out over own s same she should so some such t than
that the their theirs them themselves then there these they this those through to too under until up very
was we were what when where which while who whom why will with would you your yours yourself yourselves
tell please explain describe give know
""".split())


@dataclass(frozen=True, slots=True)
class Query:
    words: tuple[str, ...]   # for the word index (BM25 / tsvector)
    grams: tuple[str, ...]   # for the CJK index (bigrams)

    @property
    def is_empty(self) -> bool:
        return not self.words and not self.grams


def parse_query(text: str) -> Query:
    text = text[:MAX_QUERY_CHARS]
    words = _unique(w for w in _WORD.findall(CJK_RUN.sub(" ", text.lower())) if w not in STOPWORDS)
    grams = _unique(cjk_bigrams(text))
    return Query(tuple(words[:MAX_WORDS]), tuple(grams[:MAX_GRAMS]))


def cjk_bigrams(text: str) -> list[str]:
    """The overlapping character pairs of every CJK run in `text`, in order, repeats kept (term frequency)."""
    return [run[i:i + 2] if len(run) > 1 else run for run in CJK_RUN.findall(text)
            for i in range(max(1, len(run) - 1))]


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))
