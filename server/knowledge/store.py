"""The contract every store keeps (SQLite FTS5 embedded, PostgreSQL for replicas), and the per-thread
connections both use.

Both stores have the same two tables:

    knowledge_documents(doc_id PK, name UNIQUE, num_chunks, num_bytes, added_at)
    knowledge_chunks(chunk_id UNIQUE = "{doc_id}:{idx}", doc_id, idx, text)   + a word index and a CJK index

A store only ranks: `search_words` by its keyword relevance (BM25, ts_rank_cd), `search_grams` by CJK
substrings. Merging the two lists is the retriever's job (retrieval.fuse). Every method may be called from
any thread: each thread gets its own connection.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Generic, TypeVar

from server.knowledge.types import DocumentInfo, Hit

C = TypeVar("C")


class Store(ABC):
    """A backend's SQL differs in its writes and its ranking (_match); the reads are shared. A subclass
    sets `connections` (ThreadConnections) and names its word and CJK indexes (a table or a column)."""
    connections: "ThreadConnections"
    WORD_INDEX: str
    GRAM_INDEX: str

    @abstractmethod
    def put(self, doc: DocumentInfo, chunks: list[str]) -> None:
        """Add `doc` with its chunks, replacing any document of the same name, in one transaction."""

    @abstractmethod
    def delete(self, name_or_id: str) -> bool:
        """Remove the document with this name or doc_id and its chunks; False if there was none."""

    @abstractmethod
    def _match(self, index: str, terms: tuple[str, ...], limit: int) -> list[Hit]:
        """Chunks matching any of terms in `index`, best first."""

    def documents(self) -> list[DocumentInfo]:
        """All documents, by name."""
        rows = self.connections.get().execute(
            "SELECT doc_id, name, num_chunks, num_bytes, added_at FROM knowledge_documents ORDER BY name")
        return [DocumentInfo(*row) for row in rows]

    def count_chunks(self) -> int:
        return self.connections.get().execute("SELECT count(*) FROM knowledge_chunks").fetchone()[0]

    def search_words(self, words: tuple[str, ...], limit: int) -> list[Hit]:
        """Chunks matching any of the (already safe, lowercased) words, best first."""
        return self._match(self.WORD_INDEX, words, limit) if words else []

    def search_grams(self, grams: tuple[str, ...], limit: int) -> list[Hit]:
        """Chunks containing any of the CJK substrings, best first."""
        return self._match(self.GRAM_INDEX, grams, limit) if grams else []

    def close(self) -> None:
        self.connections.close()


class ThreadConnections(Generic[C]):
    """One connection per thread, made on first use and remade when `is_alive` says it died (a database
    restart); close() closes them all, from any thread, and later use raises RuntimeError."""

    def __init__(self, connect: Callable[[], C], is_alive: Callable[[C], bool] = lambda conn: True):
        self.connect = connect
        self.is_alive = is_alive
        self.local = threading.local()
        self.lock = threading.Lock()
        self.opened: list[C] = []
        self.is_closed = False

    def get(self) -> C:
        conn = getattr(self.local, "conn", None)
        if conn is None or self.is_closed or not self.is_alive(conn):
            with self.lock:
                if self.is_closed:
                    raise RuntimeError("the knowledge base is closed")
                if conn is not None:
                    self.opened.remove(conn)
                conn = self.local.conn = self.connect()
                self.opened.append(conn)
        return conn

    def close(self) -> None:
        with self.lock:
            self.is_closed = True
            opened, self.opened = self.opened, []
        for conn in opened:
            conn.close()


def hits_from_rows(rows) -> list[Hit]:
    """Hits from (chunk_id, doc_name, text, score) rows that are already best first."""
    return [Hit(chunk_id, name, text, float(score), rank) for rank, (chunk_id, name, text, score)
            in enumerate(rows, 1)]
