"""The embedded store: one SQLite file, FTS5 with BM25 for ranking.

Two external-content FTS5 indexes over knowledge_chunks, kept in step by triggers:
  knowledge_words   tokenize 'porter unicode61' over `text`: words, English stemmed, case and accents folded
  knowledge_cjk     tokenize 'unicode61' over `grams`, the chunk's CJK bigrams joined by spaces
                    (query.cjk_bigrams): unicode61 keeps a CJK sentence as one token, so Chinese needs these
Both rank with bm25(). Every term goes into MATCH as a quoted string ("..." with " doubled), joined by OR,
so user text is never FTS syntax. NOTE: not a tokenize='trigram' index: Chinese words are mostly two
characters, which a trigram index cannot match (query.py).
WAL mode: readers never wait for the indexing writer.
"""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path

from server.knowledge.query import cjk_bigrams
from server.knowledge.store import Store, ThreadConnections, hits_from_rows
from server.knowledge.types import DocumentInfo, Hit

SCHEMA = """
CREATE TABLE IF NOT EXISTS knowledge_documents (
    doc_id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, num_chunks INTEGER NOT NULL,
    num_bytes INTEGER NOT NULL, added_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS knowledge_chunks (
    id INTEGER PRIMARY KEY, chunk_id TEXT NOT NULL UNIQUE, doc_id TEXT NOT NULL, idx INTEGER NOT NULL,
    text TEXT NOT NULL, grams TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS knowledge_chunks_doc ON knowledge_chunks(doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS knowledge_words USING fts5(
    text, content='knowledge_chunks', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2');
CREATE VIRTUAL TABLE IF NOT EXISTS knowledge_cjk USING fts5(
    grams, content='knowledge_chunks', content_rowid='id', tokenize='unicode61');
CREATE TRIGGER IF NOT EXISTS knowledge_chunks_added AFTER INSERT ON knowledge_chunks BEGIN
    INSERT INTO knowledge_words(rowid, text) VALUES (new.id, new.text);
    INSERT INTO knowledge_cjk(rowid, grams) VALUES (new.id, new.grams);
END;
CREATE TRIGGER IF NOT EXISTS knowledge_chunks_deleted AFTER DELETE ON knowledge_chunks BEGIN
    INSERT INTO knowledge_words(knowledge_words, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO knowledge_cjk(knowledge_cjk, rowid, grams) VALUES ('delete', old.id, old.grams);
END;
"""


class SqliteStore(Store):
    WORD_INDEX = "knowledge_words"
    GRAM_INDEX = "knowledge_cjk"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.connections = ThreadConnections(self._connect)
        conn = self.connections.get()
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(f"BEGIN IMMEDIATE;{SCHEMA}COMMIT;")

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE for writes)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def put(self, doc: DocumentInfo, chunks: list[str]) -> None:
        conn = self.connections.get()
        with _transaction(conn):
            conn.execute("INSERT INTO knowledge_documents VALUES (?, ?, ?, ?, ?) ON CONFLICT(doc_id) DO UPDATE SET "
                         "name = excluded.name, num_chunks = excluded.num_chunks, num_bytes = excluded.num_bytes, "
                         "added_at = excluded.added_at",
                         (doc.doc_id, doc.name, doc.num_chunks, doc.num_bytes, doc.added_at))
            conn.execute("DELETE FROM knowledge_chunks WHERE doc_id = ?", (doc.doc_id,))
            conn.executemany("INSERT INTO knowledge_chunks (chunk_id, doc_id, idx, text, grams) VALUES (?, ?, ?, ?, ?)",
                             ((f"{doc.doc_id}:{i}", doc.doc_id, i, text, " ".join(cjk_bigrams(text)))
                              for i, text in enumerate(chunks)))

    def delete(self, name_or_id: str) -> bool:
        conn = self.connections.get()
        with _transaction(conn):
            row = conn.execute("SELECT doc_id FROM knowledge_documents WHERE name = ? OR doc_id = ?",
                               (name_or_id, name_or_id)).fetchone()
            if row is None:
                return False
            conn.execute("DELETE FROM knowledge_chunks WHERE doc_id = ?", row)
            conn.execute("DELETE FROM knowledge_documents WHERE doc_id = ?", row)
            return True

    def _match(self, index: str, terms: tuple[str, ...], limit: int) -> list[Hit]:
        rows = self.connections.get().execute(
            f"SELECT c.chunk_id, d.name, c.text, -bm25({index}) FROM {index} "
            f"JOIN knowledge_chunks c ON c.id = {index}.rowid JOIN knowledge_documents d ON d.doc_id = c.doc_id "
            f"WHERE {index} MATCH ? ORDER BY bm25({index}), c.id LIMIT ?",
            (fts_query(terms), limit))
        return hits_from_rows(rows)



def fts_query(terms: tuple[str, ...]) -> str:
    """FTS5 MATCH text: every term a quoted string, joined by OR (so nothing in a term is syntax)."""
    return " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)


@contextmanager
def _transaction(conn: sqlite3.Connection):
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
