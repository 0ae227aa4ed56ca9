"""The records the knowledge package hands out, and its one error type."""
from __future__ import annotations

from dataclasses import dataclass


class KnowledgeError(Exception):
    """A bad document, file or request; the message is safe to show a client (the HTTP layer makes it a 400)."""


@dataclass(frozen=True, slots=True)
class DocumentInfo:
    doc_id: str          # sha256 of the name, 16 hex digits: the same name always gets the same id
    name: str            # unique key: adding a document under an existing name replaces its chunks
    num_chunks: int
    num_bytes: int       # size of the source (the file, or the UTF-8 text)
    added_at: float      # unix time


@dataclass(frozen=True, slots=True)
class Hit:
    chunk_id: str        # f"{doc_id}:{index}"
    doc_name: str
    text: str
    score: float         # higher is better; see retrieval.fuse for what the number means
    rank: int            # 1-based

