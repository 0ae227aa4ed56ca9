"""KnowledgeBase: documents in, ranked chunks out; composes extraction, chunking, a store and retrieval.

It holds no mutable state of its own (the store owns its per-thread connections), so HTTP handlers may
retrieve from an executor while an indexing thread adds documents.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

from server.knowledge.chunking import check_chunk_sizes, chunk_text, estimate_tokens
from server.knowledge.documents import MAX_SOURCE_BYTES, clean_text, extract_text
from server.knowledge.retrieval import retrieve
from server.knowledge.store import Store
from server.knowledge.types import DocumentInfo, Hit, KnowledgeError

MAX_NAME_CHARS = 1024
SQLITE_FILE_NAME = "knowledge.sqlite3"


class KnowledgeBase:
    def __init__(self, store: Store, count_tokens: Callable[[str], int] | None = None, chunk_tokens: int = 256,
                 chunk_overlap: int = 32):
        check_chunk_sizes(chunk_tokens, chunk_overlap)
        self.store = store
        self.count_tokens = count_tokens or estimate_tokens
        self.chunk_tokens = chunk_tokens
        self.chunk_overlap = chunk_overlap

    @classmethod
    def open(cls, url: str | None, cache_dir: Path, count_tokens: Callable[[str], int] | None = None,
             chunk_tokens: int = 256, chunk_overlap: int = 32) -> KnowledgeBase:
        """url None -> SQLite file cache_dir/knowledge.sqlite3; "postgresql://..." (or "postgres://") ->
        PostgreSQL; any other string -> a SQLite file path (":memory:" is not supported: one connection
        per thread would mean one database per thread)."""
        check_chunk_sizes(chunk_tokens, chunk_overlap)   # before a store is opened, so nothing leaks
        return cls(open_store(url, Path(cache_dir)), count_tokens, chunk_tokens, chunk_overlap)

    def add_file(self, name: str, data: bytes) -> DocumentInfo:
        """Index a file's text (the type comes from the name's extension); replaces a document of the same name."""
        return self._add(name, extract_text(_check_name(name), data), len(data))

    def add_text(self, name: str, text: str) -> DocumentInfo:
        name = _check_name(name)
        num_bytes = len(text.encode("utf-8", "replace"))
        if num_bytes > MAX_SOURCE_BYTES:
            raise KnowledgeError(f"{name}: {num_bytes} bytes is over the {MAX_SOURCE_BYTES >> 20} MiB limit")
        text = clean_text(text)
        if not text.strip():
            raise KnowledgeError(f"{name}: no text found")
        return self._add(name, text, num_bytes)

    def index_dir(self, path: Path) -> tuple[list[DocumentInfo], list[tuple[str, str]]]:
        """Add every file under `path` (recursively, sorted, hidden files and folders skipped), named by its
        path relative to `path` ("notes/a.md"), so indexing the folder again replaces rather than duplicates.
        Returns (added, [(relative path, error message)]): a bad file does not stop the rest."""
        root = Path(path)
        if not root.is_dir():
            raise KnowledgeError(f"{path}: not a directory")
        added, errors = [], []
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = file.relative_to(root)
            if any(part.startswith(".") for part in relative.parts):
                continue
            name = relative.as_posix()
            try:
                added.append(self.add_file(name, _read(file, name)))
            except KnowledgeError as e:
                errors.append((name, str(e)))
        return added, errors

    def remove(self, name_or_id: str) -> bool:
        return self.store.delete(name_or_id)

    def documents(self) -> list[DocumentInfo]:
        return self.store.documents()

    def retrieve(self, query: str, top_k: int = 3) -> list[Hit]:
        """The top_k chunks for a free-text query, best first; [] when the query has no searchable terms."""
        return retrieve(self.store, query, top_k)

    @property
    def num_chunks(self) -> int:
        return self.store.count_chunks()

    def close(self) -> None:
        self.store.close()

    def _add(self, name: str, text: str, num_bytes: int) -> DocumentInfo:
        chunks = chunk_text(text, self.count_tokens, self.chunk_tokens, self.chunk_overlap)
        if not chunks:
            raise KnowledgeError(f"{name}: no text found")
        doc = DocumentInfo(doc_id(name), name, len(chunks), num_bytes, time.time())
        self.store.put(doc, chunks)
        return doc


def open_store(url: str | None, cache_dir: Path) -> Store:
    if url and url.startswith(("postgresql://", "postgres://")):
        from server.knowledge.postgres_store import PostgresStore   # psycopg loads only for PostgreSQL

        return PostgresStore(url)
    from server.knowledge.sqlite_store import SqliteStore

    return SqliteStore(Path(url) if url else cache_dir / SQLITE_FILE_NAME)


def doc_id(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "replace")).hexdigest()[:16]


def _check_name(name: str) -> str:
    if not name.strip() or len(name) > MAX_NAME_CHARS or clean_text(name) != name:
        raise KnowledgeError(f"a document name must be 1 to {MAX_NAME_CHARS} characters of valid text, "
                             "without NUL or carriage return")
    return name


def _read(file: Path, name: str) -> bytes:
    try:
        if file.stat().st_size > MAX_SOURCE_BYTES:
            raise KnowledgeError(f"{name}: {file.stat().st_size} bytes is over the {MAX_SOURCE_BYTES >> 20} MiB limit")
        return file.read_bytes()
    except OSError as e:
        raise KnowledgeError(f"{name}: cannot read ({e.strerror or type(e).__name__})") from None
