"""Knowledge-base answers: `langchain: true` (POST /, WebSocket rounds) and `"knowledge"` on chat.

The route retrieves the top-k chunks for the question (with the previous turn's question, so a
follow-up like "and its price?" still finds its subject), rebuilds the request's messages around them
(server.knowledge.build_rag_messages: the sources are fenced, labelled data), and reports what it
retrieved in an extra `sources` field (document, chunk id, score). Without a knowledge base the request
is a 400, never a plain answer the model would invent.
"""
from __future__ import annotations

import asyncio

from protocol.errors import ProtocolError
from protocol.types import GenerateRequest
from server.http import keys

DEFAULT_TOP_K = 3
ANSWER_RESERVE = 512          # tokens kept free for the answer when max_tokens is not given


def knowledge_base(state: keys.ServerState, field: str):
    if state.knowledge is None:
        raise ProtocolError(f"{field} needs a knowledge base: start berth with --knowledge DIR "
                            "(or --knowledge-db) and add documents", status=400, param=field)
    return state.knowledge


async def retrieve(state: keys.ServerState, field: str, question: str, previous: str | None = None,
                   top_k: int = DEFAULT_TOP_K) -> list:
    kb = knowledge_base(state, field)
    query = f"{previous}\n{question}" if previous else question
    hits = await asyncio.get_running_loop().run_in_executor(None, kb.retrieve, query, top_k)
    if not hits and kb.num_chunks == 0:
        raise ProtocolError(f"{field}: the knowledge base is empty; add documents first", status=400, param=field)
    return hits


def augment(state: keys.ServerState, request: GenerateRequest, question: str, hits: list,
            history: list[tuple[str, str]], system_prompt: str | None) -> None:
    """Replace request.messages with the knowledge-base prompt, within the model's context."""
    from server.knowledge import build_rag_messages

    reserve = request.params.max_tokens or ANSWER_RESERVE
    budget = max(256, state.engine.max_model_len - min(reserve, state.engine.max_model_len // 2) - 32)
    request.messages = build_rag_messages(question, hits, history, system_prompt or None, budget,
                                          _token_counter(state))


def sources(hits: list) -> list[dict]:
    return [{"doc": h.doc_name, "chunk_id": h.chunk_id, "score": float(f"{h.score:.4g}")} for h in hits]


def sources_text(hits: list) -> str:
    """The WebSocket form (frames are plain text): one line after the answer."""
    if not hits:
        return "\n\nSources: none found in the knowledge base."
    return "\n\nSources: " + "; ".join(f"[{h.rank}] {h.doc_name} #{h.chunk_id.rsplit(':', 1)[-1]}" for h in hits)


def _token_counter(state: keys.ServerState):
    tokenizer = getattr(getattr(state.engine, "engine", None), "tokenizer", None)
    hf = getattr(tokenizer, "hf", None)
    return (lambda text: len(hf.encode(text, add_special_tokens=False))) if hf is not None else None
