"""Knowledge base for retrieval-augmented answers ("langchain": true): documents, chunks, keyword retrieval.

    kb = KnowledgeBase.open(url, cache_dir, count_tokens=tokenizer_count)   # SQLite file or PostgreSQL
    kb.add_file("guide.pdf", data) / kb.add_text(name, text) / kb.index_dir(folder)
    hits = kb.retrieve(question, top_k=3)                                   # BM25 over words (+ CJK bigrams), fused
    messages = build_rag_messages(question, hits, history, budget_tokens=...)

Every method may be called from any thread. Nothing here knows about HTTP or the engine; failures a
client caused are KnowledgeError (a 400).
"""
from server.knowledge.knowledge_base import KnowledgeBase
from server.knowledge.prompt import build_rag_messages
from server.knowledge.types import DocumentInfo, Hit, KnowledgeError

__all__ = ["KnowledgeBase", "DocumentInfo", "Hit", "KnowledgeError", "build_rag_messages"]
