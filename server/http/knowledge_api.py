"""The knowledge-base HTTP API, on PAI-RAG's routes where its shapes are documented (README, "Knowledge base").

    POST   /api/v1/upload_data        multipart `files` (one or more), or JSON {"name", "text"} or
                                      {"documents": [{"name", "text"}, ...]} -> {"task_id"}
    GET    /api/v1/get_upload_state   ?task_id= -> {"task_id", "status", "documents", "errors"}
    GET    /api/v1/documents          -> {"documents": [...], "num_chunks"}
    DELETE /api/v1/documents/{name}   -> {"deleted": name}
    POST   /api/v1/query/retrieval    {"question", "top_k"?} -> {"docs": [{"text", "score", "metadata"}]}
    POST   /api/v1/query              {"question", "chat_history"?, "top_k"?, sampling...} -> {"answer", "docs"}

Uploads are indexed on a background thread (the task id reports progress); a file that cannot be read
fails alone (its error is in the task state) while the rest of the batch is indexed. Sizes are bounded:
32 MiB per file, 64 MiB and 100 files per upload (multipart is read as a stream, not into memory at once).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from protocol import eas
from protocol.errors import ProtocolError, bad_field
from protocol.sampling import as_int, parse_sampling
from server.http import keys, rag
from server.http.body import parse_json, read_bytes
from server.http.streaming import collect, trace_of

MAX_FILE_BYTES = 32 << 20
MAX_UPLOAD_BYTES = 64 << 20
MAX_FILES = 100
MAX_TASKS = 1000
MAX_TOP_K = 20


@dataclass(slots=True)
class UploadTask:
    task_id: str
    status: str = "pending"             # pending -> processing -> completed | failed (every file failed)
    documents: list[str] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return {"task_id": self.task_id, "status": self.status, "documents": self.documents, "errors": self.errors}


def _kb(request: web.Request):
    return rag.knowledge_base(request.app[keys.STATE], "knowledge")


async def upload_data(request: web.Request) -> web.Response:
    kb = _kb(request)
    if request.content_type.startswith("multipart/"):
        items = await _read_multipart(request)
    else:
        items = _json_documents(parse_json(await read_bytes(request)))
    state = request.app[keys.STATE]
    task = UploadTask(uuid.uuid4().hex)
    _remember(state.uploads, task)
    asyncio.get_running_loop().run_in_executor(None, _index, kb, task, items)
    return web.json_response({"task_id": task.task_id})


def _index(kb, task: UploadTask, items: list[tuple[str, bytes | str]]) -> None:
    from server.knowledge import KnowledgeError

    task.status = "processing"
    for name, data in items:
        try:
            info = kb.add_text(name, data) if isinstance(data, str) else kb.add_file(name, data)
            task.documents.append(info.name)
        except KnowledgeError as exc:
            task.errors.append({"file": name, "error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - one bad file never stops the batch
            task.errors.append({"file": name, "error": f"could not be indexed: {type(exc).__name__}"})
    task.status = "failed" if task.errors and not task.documents else "completed"


def _remember(uploads: dict, task: UploadTask) -> None:
    uploads[task.task_id] = task
    while len(uploads) > MAX_TASKS:
        uploads.pop(next(iter(uploads)))


async def _read_multipart(request: web.Request) -> list[tuple[str, bytes]]:
    reader = await request.multipart()
    items, total = [], 0
    while (part := await reader.next()) is not None:
        if part.filename is None:
            await part.release()
            continue
        if len(items) >= MAX_FILES:
            raise ProtocolError(f"at most {MAX_FILES} files per upload", status=413, param="files")
        data = bytearray()
        while chunk := await part.read_chunk(1 << 20):
            data += chunk
            if len(data) > MAX_FILE_BYTES:
                raise ProtocolError(f"{part.filename}: a file may be at most {MAX_FILE_BYTES >> 20} MiB",
                                    status=413, param="files")
        total += len(data)
        if total > MAX_UPLOAD_BYTES:
            raise ProtocolError(f"an upload may be at most {MAX_UPLOAD_BYTES >> 20} MiB", status=413, param="files")
        items.append((_file_name(part.filename), bytes(data)))
    if not items:
        raise bad_field("files", "no file in the upload (multipart field `files` with a file name)")
    return items


def _json_documents(body: object) -> list[tuple[str, str]]:
    if isinstance(body, dict) and "documents" not in body:
        body = {"documents": [body]}
    docs = body.get("documents") if isinstance(body, dict) else None
    if not isinstance(docs, list) or not docs or len(docs) > MAX_FILES:
        raise bad_field("documents", f'expected {{"name", "text"}} or {{"documents": [{{"name", "text"}}, ...]}} '
                                     f"(1 to {MAX_FILES})")
    items = []
    for doc in docs:
        if not isinstance(doc, dict) or not isinstance(doc.get("name"), str) or not isinstance(doc.get("text"), str):
            raise bad_field("documents", 'each document needs a "name" and a "text" string')
        items.append((_file_name(doc["name"]), doc["text"]))
    return items


def _file_name(name: str) -> str:
    """The base name only (a client's path never reaches the store), at most 255 characters."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not base or base in (".", ".."):
        raise bad_field("files", "a file needs a name")
    return base[:255]


async def get_upload_state(request: web.Request) -> web.Response:
    task = request.app[keys.STATE].uploads.get(request.query.get("task_id", ""))
    if task is None:
        raise ProtocolError("no upload task with this task_id", status=404, param="task_id")
    return web.json_response(task.to_dict())


async def list_documents(request: web.Request) -> web.Response:
    kb = _kb(request)
    docs = await asyncio.get_running_loop().run_in_executor(None, kb.documents)
    return web.json_response({"documents": [{"doc_id": d.doc_id, "name": d.name, "num_chunks": d.num_chunks,
                                             "num_bytes": d.num_bytes, "added_at": d.added_at} for d in docs],
                              "num_chunks": sum(d.num_chunks for d in docs)})


async def delete_document(request: web.Request) -> web.Response:
    kb = _kb(request)
    name = request.match_info["name"]
    if not await asyncio.get_running_loop().run_in_executor(None, kb.remove, name):
        raise ProtocolError(f"no document named {name[:255]!r}", status=404, param="name")
    return web.json_response({"deleted": name})


def _question(body: object) -> tuple[dict, str, int]:
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object")
    question = body.get("question")
    if not isinstance(question, str) or not question.strip():
        raise bad_field("question", "is required and must be a non-empty string")
    top_k = as_int("top_k", body.get("top_k", rag.DEFAULT_TOP_K))
    if not 1 <= top_k <= MAX_TOP_K:
        raise bad_field("top_k", f"must be between 1 and {MAX_TOP_K}")
    return body, question, top_k


def _docs(hits: list) -> list[dict]:
    return [{"text": h.text, "score": float(f"{h.score:.4g}"),
             "metadata": {"file_name": h.doc_name, "chunk_id": h.chunk_id}} for h in hits]


async def query_retrieval(request: web.Request) -> web.Response:
    _kb(request)
    _, question, top_k = _question(parse_json(await read_bytes(request)))
    hits = await rag.retrieve(request.app[keys.STATE], "question", question, top_k=top_k)
    return web.json_response({"docs": _docs(hits)})


async def query(request: web.Request) -> web.Response:
    """PAI-RAG's RAG query: retrieval + the model's answer, non-streamed."""
    state = request.app[keys.STATE]
    _kb(request)
    body, question, top_k = _question(parse_json(await read_bytes(request)))
    if body.get("stream"):
        raise bad_field("stream", "is not supported on /api/v1/query; stream with POST / and langchain: true")
    history = _chat_history(body.get("chat_history"))
    hits = await rag.retrieve(state, "question", question, history[-1][0] if history else None, top_k)
    sampling = {k: v for k, v in body.items() if k not in ("question", "chat_history", "top_k", "stream")}
    params = parse_sampling(sampling, defaults=eas.EAS_DEFAULTS)
    generate = eas.build_request(trace_of(request).request_id, params, "", [], question)
    rag.augment(state, generate, question, hits, history, None)
    trace_of(request).submit(question)
    collector = eas.EasCollector(question, [])
    body = await collect(state.engine.generate(generate), collector, trace_of(request))
    return web.json_response({"answer": body["response"], "docs": _docs(hits)})


def _chat_history(value: object) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, dict) and isinstance(t.get("user"), str)
                                              and isinstance(t.get("bot"), str) for t in value):
        raise bad_field("chat_history", 'must be a list of {"user": <string>, "bot": <string>}')
    return [(t["user"], t["bot"]) for t in value[-eas.MAX_HISTORY_PAIRS:]]


def add_knowledge_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/upload_data", upload_data, name="kb_upload")
    r.add_get("/api/v1/get_upload_state", get_upload_state, name="kb_upload_state")
    r.add_get("/api/v1/documents", list_documents, name="kb_documents")
    r.add_delete("/api/v1/documents/{name}", delete_document, name="kb_delete")
    r.add_post("/api/v1/query/retrieval", query_retrieval, name="kb_retrieval")
    r.add_post("/api/v1/query", query, name="kb_query")
