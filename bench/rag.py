"""`python -m bench.rag`: how well and how fast the knowledge base retrieves, measured on text already here.

Corpus (no downloads): one markdown document per importable Python standard-library module (its
docstring, then every public function, class and method with its signature and docstring; `posix` is
left out, `os` already holds it), plus /work/shared/seed/eas-llm-deployment.txt when present.
Documents are rebuilt at run time from the running interpreter; bench/rag_eval/manifest.json records
each one's sha256 so a different Python shows up as a warning, not as silently different numbers.

Question sets (bench/rag_eval/; `--regenerate` rewrites the generated ones):
  generated   one question per sampled member, made from the first sentence of its docstring with the
              name left out ("Return the median (middle value) of numeric data." -> "Which function
              returns the median (middle value) of numeric data?"); only sentences that occur in exactly
              one document and do not contain the member's name. Seeded, deterministic.
  dropped     the same questions with 40% of their content words dropped and the rest shuffled.
  handwritten real paraphrases written by hand (handwritten.json), with a short expected answer.
The gold chunks of a question are the chunks of its document that contain its evidence sentence, so
the gold follows any chunk size.

Retrieval modes: `keyword` (KnowledgeBase.retrieve: SQLite FTS5 BM25), `dense` (wordllama's bundled
static embeddings, cosine; optional, skipped when wordllama is not installed) and `hybrid` (both fused
by reciprocal rank, k = 60, over each one's top 50); with --pg-url also `keyword_postgresql` (the same
retrieve on the PostgreSQL store: ts_rank_cd, no stemming). Metrics: hit@1, hit@5, MRR@10.

With --base-url (a running `berth serve --knowledge DIR` whose DIR holds the documents: --write-docs DIR
writes them), the hand-written questions are also asked end to end, greedy: POST / with langchain: true,
plain (no langchain), and `oracle` (chat completions with the gold chunk as the only source, built by
build_rag_messages): the share of answers that contain the expected string, case-insensitive.

Speed: a knowledge base of --target-chunks chunks (the corpus repeated, paragraphs shuffled per copy)
is built, timed (chunks/s, documents/s, token counting included), then --queries retrieve calls
(top_k 3, the server's default) are timed: p50/p99. SQLite always; PostgreSQL with --pg-url.
Writes PREFIX.json and PREFIX.md (--out).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib
import inspect
import io
import json
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.metrics import percentile
from server.knowledge import KnowledgeBase
from server.knowledge.chunking import chunk_text, estimate_tokens, split_sentences
from server.knowledge.documents import clean_text
from server.knowledge.knowledge_base import doc_id
from server.knowledge.prompt import build_rag_messages
from server.knowledge.query import STOPWORDS
from server.knowledge.types import Hit

EVAL_DIR = Path(__file__).resolve().parent / "rag_eval"
SEED_DOCUMENT = Path("/work/shared/seed/eas-llm-deployment.txt")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "rag"
SEED = 0
NUM_GENERATED = 240
PER_DOC_CAP = 2                # generated questions per document at most: spread over the corpus
DROP_FRACTION = 0.4
RRF_K = 60
DEPTH = 50                     # each list's depth before hybrid fusion
EVAL_K = 10                    # MRR@10; rankings are cut here
MAX_SIGNATURE = 100
MAX_METHODS = 12               # per class
SKIP_MODULES = frozenset("""
antigravity this idlelib tkinter turtle turtledemo test ensurepip pydoc_data lib2to3 msvcrt winreg winsound nt
xxsubtype xxlimited xxlimited_35 sre_compile sre_parse sre_constants nturl2path ntpath msilib posix
""".split())
SETS = ("generated", "dropped", "handwritten")


# ---------------------------------------------------------------- corpus

@dataclass(frozen=True)
class Document:
    name: str          # "json.md": the file name under --knowledge DIR, so the server's chunk ids match
    text: str


def stdlib_module_names() -> list[str]:
    return sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP_MODULES)


def unwrap(paragraph: str) -> str:
    return " ".join(line.strip() for line in paragraph.splitlines() if line.strip())


def split_summary(doc: str) -> tuple[str, str, str]:
    """(leading signature paragraph or "", the summary paragraph unwrapped, the rest) of a cleaned docstring."""
    paragraphs = re.split(r"\n\s*\n", doc.strip(), maxsplit=2)
    lead = ""
    if len(paragraphs) > 1 and re.match(r"^[\w.]+\(.*\)\s*(-+>.*)?$", unwrap(paragraphs[0])):
        lead, paragraphs = paragraphs[0], paragraphs[1:]
        paragraphs = re.split(r"\n\s*\n", "\n\n".join(paragraphs), maxsplit=1)
    summary = unwrap(paragraphs[0]) if paragraphs else ""
    rest = paragraphs[1] if len(paragraphs) > 1 else ""
    return lead, summary, rest


def _signature(obj) -> str:
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    text = re.sub(r"\s+", " ", re.sub(r" at 0x[0-9a-fA-F]+", "", text))   # default values' reprs: no addresses
    return text if len(text) <= MAX_SIGNATURE else text[:MAX_SIGNATURE - 4] + ", ...)"


def _own_doc(obj) -> str:
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else ""


def render_member(kind: str, qualname: str, obj, doc: str) -> str:
    """`kind qualname: summary` on one line (so a chunk holding the summary holds the name), the signature, the rest."""
    lead, summary, rest = split_summary(doc)
    parts = [f"{kind} {qualname}: {summary}"]
    signature = unwrap(lead) if lead else (qualname.rsplit(".", 1)[-1] + _signature(obj) if _signature(obj) else "")
    if signature:
        parts.append(f"Signature: {signature}")
    if rest.strip():
        parts.append(rest.strip())
    return "\n".join(parts)


def module_members(module) -> list[tuple[str, str, object, str]]:
    """(kind, qualname, object, docstring) of the module's public functions, classes and their methods."""
    exported = getattr(module, "__all__", None)
    names = sorted(set(exported)) if isinstance(exported, (list, tuple)) else sorted(dir(module))
    out = []
    for name in names:
        if not isinstance(name, str) or name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        if not isinstance(exported, (list, tuple)) and \
                (getattr(obj, "__module__", None) or "").lstrip("_") != module.__name__:
            continue          # without __all__: only what the module (or its _accelerator) defines
        doc = _own_doc(obj)
        if not doc:
            continue
        qualname = f"{module.__name__}.{name}"
        if inspect.isclass(obj):
            out.append(("class", qualname, obj, doc))
            methods = 0
            for method_name in sorted(vars(obj)):
                if method_name.startswith("_") or methods >= MAX_METHODS:
                    continue
                method = getattr(obj, method_name, None)
                method_doc = _own_doc(vars(obj)[method_name]) or _own_doc(method)
                if inspect.isroutine(method) and method_doc:
                    out.append(("method", f"{qualname}.{method_name}", method, method_doc))
                    methods += 1
        else:
            out.append(("function", qualname, obj, doc))
    return out


def module_document(module) -> Document | None:
    sections = [f"# {module.__name__} module"]
    doc = _own_doc(module)
    if doc:
        sections.append(doc)
    sections += [render_member(*member) for member in module_members(module)]
    if len(sections) < 2:
        return None
    return Document(f"{module.__name__}.md", clean_text("\n\n".join(sections)) + "\n")


def stdlib_documents(names: Iterable[str] | None = None) -> list[Document]:
    docs = []
    for name in (stdlib_module_names() if names is None else names):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
                document = module_document(module)
        except Exception:       # noqa: BLE001 - a module that cannot import here is simply not in the corpus
            continue
        if document is not None:
            docs.append(document)
    return docs


def build_corpus(seed_document: Path | None = SEED_DOCUMENT) -> list[Document]:
    docs = stdlib_documents()
    if seed_document is not None and seed_document.is_file():
        docs.append(Document("eas-llm-deployment.md", clean_text(seed_document.read_text(encoding="utf-8"))))
    return docs


def manifest(docs: Sequence[Document]) -> dict:
    return {"python": platform.python_version(), "num_documents": len(docs),
            "num_chars": sum(len(d.text) for d in docs),
            "documents": {d.name: {"chars": len(d.text), "sha256": hashlib.sha256(d.text.encode()).hexdigest()[:16]}
                          for d in docs}}


def write_documents(docs: Sequence[Document], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for d in docs:
        (folder / d.name).write_text(d.text, encoding="utf-8")


# ---------------------------------------------------------------- questions

@dataclass
class Question:
    qid: str
    set: str
    question: str
    doc: str           # document name
    evidence: str      # a sentence of the document; the chunks containing it are the gold
    answer: str        # the short expected answer (the member's name for generated questions)
    kind: str = ""


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def strip_markup(text: str) -> str:
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return normalize(text.replace("``", "").replace("`", "").replace("*", ""))


def _content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"\w+", text) if w.lower() not in STOPWORDS]


# verbs that start docstring summaries in the imperative ("Return ...", "Create ...")
IMPERATIVES = frozenset("""
accept acquire add advance allocate append apply assert assign attach attempt bind block build calculate call cancel
change check choose clear close collect combine compile compress compute connect construct convert copy count create
decode decompress define delay delete deliver deserialize destroy detach determine disable discard display dump emit
enable encode ensure escape evaluate execute exit expand extend extract fetch fill filter find finish flush force
format free gather generate get guess handle ignore implement indicate initialize insert install interpret invoke
iterate join kill launch list load lock log look make map mark match measure merge modify move normalize notify obtain
open pack parse perform pop post prepare print process produce prompt provide push put query quote raise read receive
record reduce register release remove rename render replace report represent request reset resolve restore resume
retrieve return reverse run save scan schedule search seek select send serialize set shuffle shut skip sleep sort
spawn split start stop store strip submit substitute suspend swap take terminate test translate truncate try turn
unlock unpack unquote unregister update use validate verify wait wrap write yield
""".split())


def third_person(verb: str) -> str:
    low = verb.lower()
    if re.search(r"[^aeiou]y$", low):
        return low[:-1] + "ies"
    if re.search(r"(s|x|z|ch|sh|o)$", low):
        return low + "es"
    return low + "s"


def question_text(kind: str, sentence: str) -> str:
    """A question for a docstring's first sentence, its member's name not in it."""
    text = strip_markup(sentence).rstrip(" .:;")
    first, _, rest = text.partition(" ")
    low = first.lower()
    if low in ("a", "an", "the"):
        return f"Which {kind} is {low} {rest}?"
    if first.isalpha() and first[:1].isupper() and low.endswith("s") and not low.endswith("ss") and len(low) > 3:
        return f"Which {kind} {low} {rest}?"                          # "Returns ..."
    if first.isalpha() and first[:1].isupper() and low in IMPERATIVES:
        return f"Which {kind} {third_person(first)} {rest}?"          # imperative "Return ..."
    return f"Which {kind} is described as: {text}?"


def summary_candidates(docs: Sequence[Document]) -> list[tuple[str, str, str, str]]:
    """(doc name, kind, member short name, first sentence) for every member summary usable as a question."""
    line = re.compile(r"^(function|class|method) ([\w.]+): (.+)$", re.MULTILINE)
    counts: dict[str, int] = {}
    normalized = {d.name: normalize(d.text) for d in docs}
    out = []
    for d in docs:
        for match in line.finditer(d.text):
            kind, qualname, summary = match.groups()
            pieces = split_sentences(summary)
            if not pieces:
                continue
            sentence = pieces[0].strip()
            name = qualname.rsplit(".", 1)[-1]
            words = re.findall(r"\w+", sentence)
            if not 4 <= len(_content_words(strip_markup(sentence))) or len(words) > 30:
                continue
            if name.lower() in (w.lower() for w in words) or name.lower() in sentence.lower():
                continue
            out.append((d.name, kind, name, sentence))
    for _, _, _, sentence in out:
        key = normalize(sentence)
        if key not in counts:
            counts[key] = sum(text.count(key) for text in normalized.values())
    return [c for c in out if counts[normalize(c[3])] == 1]


def generate_questions(docs: Sequence[Document], num: int = NUM_GENERATED, seed: int = SEED) -> list[Question]:
    """`num` generated questions, at most PER_DOC_CAP per document, chosen by a seeded shuffle."""
    candidates = sorted(summary_candidates(docs))
    random.Random(seed).shuffle(candidates)
    per_doc: dict[str, int] = {}
    chosen = []
    for doc, kind, name, sentence in candidates:
        if len(chosen) >= num:
            break
        if per_doc.get(doc, 0) >= PER_DOC_CAP:
            continue
        per_doc[doc] = per_doc.get(doc, 0) + 1
        chosen.append((doc, kind, name, sentence))
    chosen.sort()
    return [Question(f"g{i:03d}", "generated", question_text(kind, sentence), doc, sentence, name, kind)
            for i, (doc, kind, name, sentence) in enumerate(chosen)]


def drop_words(question: Question, seed: int = SEED, fraction: float = DROP_FRACTION) -> Question:
    """The question with `fraction` of its content words dropped and the rest shuffled (seeded per question)."""
    rng = random.Random(f"{seed}:{question.qid}")
    body = question.question.rstrip("?")
    prefix = f"Which {question.kind}" if question.kind and body.startswith(f"Which {question.kind}") else ""
    words = _content_words(body[len(prefix):])
    keep = max(3, round(len(words) * (1 - fraction)))
    kept = sorted(rng.sample(range(len(words)), min(keep, len(words))))
    kept_words = [words[i] for i in kept]
    rng.shuffle(kept_words)
    text = " ".join(([prefix] if prefix else []) + kept_words) + "?"
    return Question(question.qid.replace("g", "d", 1), "dropped", text, question.doc, question.evidence,
                    question.answer, question.kind)


def load_questions(folder: Path = EVAL_DIR) -> dict[str, list[Question]]:
    sets: dict[str, list[Question]] = {}
    generated = folder / "questions.json"
    if generated.is_file():
        for item in json.loads(generated.read_text())["questions"]:
            sets.setdefault(item["set"], []).append(Question(**item))
    handwritten = folder / "handwritten.json"
    if handwritten.is_file():
        sets["handwritten"] = [Question(set="handwritten", **item)
                               for item in json.loads(handwritten.read_text())["questions"]]
    return sets


def save_generated(docs: Sequence[Document], folder: Path = EVAL_DIR, num: int = NUM_GENERATED,
                   seed: int = SEED) -> list[Question]:
    generated = generate_questions(docs, num, seed)
    questions = generated + [drop_words(q, seed) for q in generated]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "questions.json").write_text(json.dumps(
        {"seed": seed, "python": platform.python_version(), "questions": [asdict(q) for q in questions]},
        indent=1, ensure_ascii=False) + "\n")
    (folder / "manifest.json").write_text(json.dumps(manifest(docs), indent=1) + "\n")
    return questions


# ---------------------------------------------------------------- metrics and fusion

def hit_at(ranking: Sequence[str], gold: set[str], k: int) -> float:
    return 1.0 if any(chunk in gold for chunk in ranking[:k]) else 0.0


def reciprocal_rank(ranking: Sequence[str], gold: set[str], k: int = EVAL_K) -> float:
    for i, chunk in enumerate(ranking[:k]):
        if chunk in gold:
            return 1.0 / (i + 1)
    return 0.0


def summarize(rankings: Sequence[Sequence[str]], golds: Sequence[set[str]]) -> dict:
    n = len(rankings)
    if n == 0:
        return {"n": 0, "hit@1": None, "hit@5": None, "mrr@10": None}
    return {"n": n,
            "hit@1": sum(hit_at(r, g, 1) for r, g in zip(rankings, golds)) / n,
            "hit@5": sum(hit_at(r, g, 5) for r, g in zip(rankings, golds)) / n,
            "mrr@10": sum(reciprocal_rank(r, g) for r, g in zip(rankings, golds)) / n}


def rrf(rankings: Sequence[Sequence[str]], k: int = RRF_K, top: int = EVAL_K) -> list[str]:
    """Reciprocal rank fusion: score = sum of 1 / (k + rank), rank 1-based; ties by the best single rank,
    then by first appearance."""
    scores: dict[str, float] = {}
    best: dict[str, tuple[int, int]] = {}
    for list_index, ranking in enumerate(rankings):
        for rank, chunk in enumerate(ranking, 1):
            scores[chunk] = scores.get(chunk, 0.0) + 1.0 / (k + rank)
            best[chunk] = min(best.get(chunk, (rank, list_index)), (rank, list_index))
    return sorted(scores, key=lambda c: (-scores[c], best[c]))[:top]


# ---------------------------------------------------------------- the knowledge base and the retrievers

def token_counter(tokenizer_dir: str | None = None) -> tuple[Callable[[str], int], str]:
    """The default model's tokenizer (as the server counts), else the package's estimate."""
    from bench.workloads import TokenCounter

    counter = TokenCounter.load(tokenizer_dir)
    if counter is None:
        return estimate_tokens, "estimate (1 token per 4 chars)"
    return counter.count, "SmolLM2 tokenizer.json"


@dataclass
class Chunk:
    chunk_id: str
    doc: str
    text: str


def build_kb(docs: Sequence[Document], path: Path | str, count_tokens: Callable[[str], int], chunk_tokens: int = 256,
             chunk_overlap: int = 32) -> tuple[KnowledgeBase, list[Chunk]]:
    """A knowledge base of `docs` (a SQLite file path, or a postgresql:// URL), and its chunks (the same
    chunking, recomputed and checked against the store's count)."""
    kb = KnowledgeBase.open(str(path), Path(tempfile.gettempdir()), count_tokens, chunk_tokens, chunk_overlap)
    chunks = []
    for d in docs:
        info = kb.add_text(d.name, d.text)
        texts = chunk_text(clean_text(d.text), count_tokens, chunk_tokens, chunk_overlap)
        assert len(texts) == info.num_chunks, d.name
        chunks += [Chunk(f"{doc_id(d.name)}:{i}", d.name, t) for i, t in enumerate(texts)]
    return kb, chunks


def gold_chunks(chunks_by_doc: dict[str, list[Chunk]], question: Question) -> set[str]:
    evidence = normalize(question.evidence)
    return {c.chunk_id for c in chunks_by_doc.get(question.doc, []) if evidence in normalize(c.text)}


class DenseRetriever:
    """wordllama's bundled static embeddings (no network), cosine over every chunk."""

    def __init__(self, model, chunks: Sequence[Chunk], batch_size: int = 256):
        import numpy as np

        self.np, self.model, self.ids = np, model, [c.chunk_id for c in chunks]
        texts = [c.text for c in chunks]
        self.matrix = np.concatenate([model.embed(texts[i:i + batch_size], norm=True)
                                      for i in range(0, len(texts), batch_size)]) if texts else np.zeros((0, 1))

    def rank(self, query: str, depth: int = DEPTH) -> list[str]:
        q = self.model.embed([query], norm=True)[0]
        scores = self.matrix @ q
        depth = min(depth, len(self.ids))
        top = self.np.argpartition(-scores, depth - 1)[:depth]
        return [self.ids[i] for i in sorted(top, key=lambda i: (-scores[i], i))]


def load_wordllama():
    """(model, "") or (None, why not). Loads the weights and tokenizer the wheel bundles; never downloads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import wordllama
        from wordllama import WordLlama
    except ImportError:
        return None, "wordllama is not installed (pip install wordllama: bench-only, not a berth dependency)"
    package = Path(wordllama.__file__).resolve().parent
    try:
        # cache_dir = the package: its weights/ and tokenizers/ folders are the bundled files
        model = WordLlama.load(config="l2_supercat", dim=256, cache_dir=package, disable_download=True)
    except Exception as e:    # noqa: BLE001
        return None, f"wordllama could not load its bundled weights: {type(e).__name__}: {e}"
    version = getattr(wordllama, "__version__", "?")
    return model, f"wordllama {version} l2_supercat dim 256 (bundled in the wheel)"


def keyword_ranking(kb: KnowledgeBase, query: str, depth: int = DEPTH) -> list[str]:
    return [hit.chunk_id for hit in kb.retrieve(query, depth)]


def evaluate(question_sets: dict[str, list[Question]], kb: KnowledgeBase, chunks: Sequence[Chunk],
             dense: DenseRetriever | None) -> tuple[dict, dict]:
    """{set: {mode: summary}}, {set: {"questions", "no_gold"}}."""
    by_doc: dict[str, list[Chunk]] = {}
    for c in chunks:
        by_doc.setdefault(c.doc, []).append(c)
    results, info = {}, {}
    for name, questions in question_sets.items():
        usable = [(q, gold) for q in questions if (gold := gold_chunks(by_doc, q))]
        info[name] = {"questions": len(questions), "no_gold": [q.qid for q in questions if not gold_chunks(by_doc, q)]}
        golds = [gold for _, gold in usable]
        keyword = [keyword_ranking(kb, q.question) for q, _ in usable]
        results[name] = {"keyword": summarize([r[:EVAL_K] for r in keyword], golds)}
        if dense is not None:
            dense_rankings = [dense.rank(q.question) for q, _ in usable]
            results[name]["dense"] = summarize([r[:EVAL_K] for r in dense_rankings], golds)
            results[name]["hybrid"] = summarize([rrf([k, d]) for k, d in zip(keyword, dense_rankings)], golds)
    return results, info


# ---------------------------------------------------------------- end to end against a running server

def _post(url: str, body: dict, token: str | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def contains_answer(response: str, answer: str) -> bool:
    return answer.lower() in response.lower()


def end_to_end(base_url: str, questions: Sequence[Question], chunks: Sequence[Chunk], token: str | None = None,
               max_new_tokens: int = 64, timeout: float = 300.0, model: str | None = None) -> dict:
    """Exact-answer rates of langchain / plain / oracle answers; per question details."""
    base_url = base_url.rstrip("/")
    by_doc: dict[str, list[Chunk]] = {}
    for c in chunks:
        by_doc.setdefault(c.doc, []).append(c)
    rows = []
    for q in questions:
        gold = gold_chunks(by_doc, q)
        row = {"qid": q.qid, "answer": q.answer}
        try:
            rag = _post(base_url + "/", {"prompt": q.question, "langchain": True, "use_stream_chat": False,
                                         "temperature": 0, "max_new_tokens": max_new_tokens}, token, timeout)
            row["langchain"] = rag["response"]
            row["retrieved_gold"] = any(s.get("chunk_id") in gold for s in rag.get("sources", []))
            plain = _post(base_url + "/", {"prompt": q.question, "use_stream_chat": False,
                                           "temperature": 0, "max_new_tokens": max_new_tokens}, token, timeout)
            row["plain"] = plain["response"]
            gold_chunk = next(c for c in by_doc[q.doc] if c.chunk_id in gold) if gold else None
            if gold_chunk is not None:
                hits = [Hit(gold_chunk.chunk_id, gold_chunk.doc, gold_chunk.text, 1.0, 1)]
                body = {"messages": build_rag_messages(q.question, hits), "temperature": 0,
                        "max_tokens": max_new_tokens, "stream": False}
                if model:
                    body["model"] = model
                oracle = _post(base_url + "/v1/chat/completions", body, token, timeout)
                row["oracle"] = oracle["choices"][0]["message"]["content"] or ""
        except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    summary = {}
    for mode in ("langchain", "plain", "oracle"):
        answered = [r for r in rows if mode in r]
        summary[mode] = {"n": len(answered),
                         "exact": (sum(contains_answer(r[mode], r["answer"]) for r in answered) / len(answered))
                         if answered else None}
    retrieved = [r for r in rows if "retrieved_gold" in r]
    summary["server_gold_in_sources"] = (sum(r["retrieved_gold"] for r in retrieved) / len(retrieved)
                                         if retrieved else None)
    with_gold = [r for r in retrieved if r["retrieved_gold"]]
    summary["langchain_exact_when_gold_retrieved"] = (
        sum(contains_answer(r["langchain"], r["answer"]) for r in with_gold) / len(with_gold) if with_gold else None)
    summary["errors"] = sum("error" in r for r in rows)
    return {"summary": summary, "rows": rows, "max_new_tokens": max_new_tokens}


# ---------------------------------------------------------------- speed

def varied_documents(docs: Sequence[Document], copy: int) -> list[Document]:
    """Copy `copy` of the corpus: names under copyNN/, each document's paragraphs shuffled (seeded)."""
    out = []
    for d in docs:
        paragraphs = d.text.strip().split("\n\n")
        random.Random(f"{SEED}:{copy}:{d.name}").shuffle(paragraphs)
        out.append(Document(f"copy{copy:02d}/{d.name}", "\n\n".join(paragraphs)))
    return out


def query_latency(kb: KnowledgeBase, queries: Sequence[str], num_queries: int, top_k: int = 3) -> dict:
    """p50/p99 (ms) of `num_queries` retrieve calls cycling over `queries`, after 10 untimed ones."""
    queries = [queries[i % len(queries)] for i in range(num_queries)] if queries else []
    for q in queries[:10]:
        kb.retrieve(q, top_k)                      # warm-up: page cache, statement cache
    latencies = []
    for q in queries:
        t = time.perf_counter()
        kb.retrieve(q, top_k)
        latencies.append((time.perf_counter() - t) * 1000)
    if not latencies:
        return {"n": 0, "top_k": top_k, "p50_ms": None, "p99_ms": None, "mean_ms": None}
    return {"n": len(latencies), "top_k": top_k, "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99), "mean_ms": statistics.fmean(latencies)}


def speed(docs: Sequence[Document], url: str, cache_dir: Path, count_tokens: Callable[[str], int],
          queries: Sequence[str], target_chunks: int = 10_000, num_queries: int = 300,
          dense_model=None) -> dict:
    """Index copies of the corpus until `target_chunks`, then time `num_queries` retrieve calls (top_k 3)."""
    kb = KnowledgeBase.open(url, cache_dir, count_tokens)
    added_names = []
    try:
        for name in [d.name for d in kb.documents() if d.name.startswith("copy")]:
            kb.remove(name)
        num_docs = num_chunks = num_chars = 0
        started = time.perf_counter()
        copy = 0
        while num_chunks < target_chunks:
            for d in varied_documents(docs, copy):
                info = kb.add_text(d.name, d.text)
                added_names.append(d.name)
                num_docs, num_chunks, num_chars = num_docs + 1, num_chunks + info.num_chunks, num_chars + len(d.text)
                if num_chunks >= target_chunks:
                    break
            copy += 1
        elapsed = time.perf_counter() - started
        result = {"documents": num_docs, "chunks": num_chunks, "chars": num_chars, "index_s": elapsed,
                  "chunks_per_s": num_chunks / elapsed, "documents_per_s": num_docs / elapsed,
                  "mb_per_s": num_chars / 1e6 / elapsed}
        # chunking alone (token counting included), to tell it from the store's share
        started = time.perf_counter()
        for d in docs[:50]:
            chunk_text(d.text, count_tokens)
        chunk_chars = sum(len(d.text) for d in docs[:50])
        result["chunking_only_mb_per_s"] = chunk_chars / 1e6 / (time.perf_counter() - started)
        result["query"] = query_latency(kb, queries, num_queries)
        queries = [queries[i % len(queries)] for i in range(num_queries)]
        if dense_model is not None and url is not None and not url.startswith(("postgres://", "postgresql://")):
            rows = kb.store.connections.get().execute("SELECT chunk_id, text FROM knowledge_chunks").fetchall()
            started = time.perf_counter()
            dense = DenseRetriever(dense_model, [Chunk(cid, "", text) for cid, text in rows])
            result["dense_embed_s"] = time.perf_counter() - started
            latencies = []
            for q in queries:
                t = time.perf_counter()
                dense.rank(q, 3)
                latencies.append((time.perf_counter() - t) * 1000)
            result["dense_query"] = {"n": len(latencies), "p50_ms": percentile(latencies, 50),
                                     "p99_ms": percentile(latencies, 99)}
        return result
    finally:
        if url is not None and url.startswith(("postgres://", "postgresql://")):
            for name in added_names:
                kb.remove(name)
        kb.close()


# ---------------------------------------------------------------- report

def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict) -> str:
    lines = [f"# berth knowledge-base retrieval ({report['date']})", "",
             f"corpus: {report['corpus']['num_documents']} documents, {report['corpus']['num_chunks']} chunks "
             f"({report['config']['chunk_tokens']} tokens, overlap {report['config']['chunk_overlap']}, counted with "
             f"{report['config']['token_counter']}); Python {report['corpus']['python']}; CPU {report['cpu']}", "",
             f"dense: {report['dense']}", ""]
    if report["corpus"].get("query", {}).get("n"):
        q = report["corpus"]["query"]
        lines += [f"keyword retrieve (top_k {q['top_k']}) at this size, {q['n']} queries: p50 {q['p50_ms']:.2f} ms, "
                  f"p99 {q['p99_ms']:.2f} ms", ""]
    lines += ["| set | n | mode | hit@1 | hit@5 | MRR@10 |", "|---|---|---|---|---|---|"]
    for set_name, modes in report["quality"].items():
        for mode, m in modes.items():
            lines.append(f"| {set_name} | {m['n']} | {mode} | {_fmt(m['hit@1'])} | {_fmt(m['hit@5'])} | "
                         f"{_fmt(m['mrr@10'])} |")
    if report.get("chunk_sweep"):
        lines += ["", "other chunk sizes (overlap min(32, size / 8)):", "",
                  "| chunk tokens | chunks | set | mode | hit@1 | hit@5 | MRR@10 |", "|---|---|---|---|---|---|---|"]
        for row in report["chunk_sweep"]:
            for set_name, modes in row["quality"].items():
                for mode, m in modes.items():
                    lines.append(f"| {row['chunk_tokens']} | {row['chunks']} | {set_name} | {mode} | "
                                 f"{_fmt(m['hit@1'])} | {_fmt(m['hit@5'])} | {_fmt(m['mrr@10'])} |")
    if report.get("comparisons"):
        lines += ["", "differences (MRR@10, absolute):", ""]
        lines += [f"- {line}" for line in report["comparisons"]]
    e2e = report.get("end_to_end")
    if e2e:
        s = e2e["summary"]
        lines += ["", f"end to end, hand-written set, greedy, max_new_tokens {e2e['max_new_tokens']}:", "",
                  "| mode | n | answer contains the expected string |", "|---|---|---|"]
        for mode in ("langchain", "plain", "oracle"):
            lines.append(f"| {mode} | {s[mode]['n']} | {_fmt(s[mode]['exact'])} |")
        lines += ["", f"gold chunk among the server's 3 sources: {_fmt(s['server_gold_in_sources'])}; "
                      f"langchain exact when it was: {_fmt(s['langchain_exact_when_gold_retrieved'])}; "
                      f"errors: {s['errors']}"]
    elif report.get("end_to_end_skipped"):
        lines += ["", f"end to end: skipped ({report['end_to_end_skipped']})"]
    for store, sp in (report.get("speed") or {}).items():
        lines += ["", f"speed, {store}: indexed {sp['documents']} documents / {sp['chunks']} chunks "
                      f"({sp['chars'] / 1e6:.1f} M chars) in {sp['index_s']:.1f} s = "
                      f"{sp['chunks_per_s']:.0f} chunks/s, "
                      f"{sp['documents_per_s']:.1f} documents/s ({sp['mb_per_s']:.2f} MB/s; chunking alone "
                      f"{sp['chunking_only_mb_per_s']:.2f} MB/s); retrieve top_k 3 over {sp['query']['n']} queries: "
                      f"p50 {sp['query']['p50_ms']:.2f} ms, p99 {sp['query']['p99_ms']:.2f} ms"]
        if "dense_query" in sp:
            lines[-1] += (f"; dense (embed {sp['chunks']} chunks {sp['dense_embed_s']:.1f} s) query p50 "
                          f"{sp['dense_query']['p50_ms']:.2f} ms, p99 {sp['dense_query']['p99_ms']:.2f} ms")
    return "\n".join(lines) + "\n"


def comparisons(quality: dict) -> list[str]:
    out = []
    for set_name, modes in quality.items():
        names = list(modes)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                ma, mb = modes[a]["mrr@10"], modes[b]["mrr@10"]
                if ma is None or mb is None:
                    continue
                better, worse = (a, b) if ma >= mb else (b, a)
                out.append(f"{set_name}: {better} beats {worse} by {abs(ma - mb):.3f} MRR@10 "
                           f"(hit@1 {modes[better]['hit@1'] - modes[worse]['hit@1']:+.3f}, "
                           f"hit@5 {modes[better]['hit@5'] - modes[worse]['hit@5']:+.3f})")
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        from bench.serving import git_commit

        return git_commit()
    except Exception:        # noqa: BLE001
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.rag", description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default=None, help="a running berth serve --knowledge DIR: ask the hand-written "
                                                    "questions end to end (default: skip)")
    p.add_argument("--token", default=None, help="bearer token for --base-url")
    p.add_argument("--model", default=None, help="model id for the oracle chat requests (default: the server's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--pg-url", default=None, help="postgresql://... (an empty database): keyword quality and speed "
                                                  "of the PostgreSQL store too; the documents it adds are removed")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="writes PREFIX.json and PREFIX.md")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--chunk-overlap", type=int, default=32)
    p.add_argument("--chunk-sweep", default="128,512", help="other chunk sizes for keyword retrieval ('' = none)")
    p.add_argument("--target-chunks", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: SmolLM2-135M-Instruct's)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense and hybrid modes")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--regenerate", action="store_true", help="rewrite bench/rag_eval/questions.json and manifest.json")
    p.add_argument("--write-docs", default=None, metavar="DIR", help="write the corpus as DIR/*.md and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    docs = build_corpus()
    if args.write_docs:
        write_documents(docs, Path(args.write_docs))
        print(f"wrote {len(docs)} documents to {args.write_docs}")
        return 0
    if args.regenerate:
        save_generated(docs)
    saved = json.loads((EVAL_DIR / "manifest.json").read_text()) if (EVAL_DIR / "manifest.json").is_file() else {}
    current = manifest(docs)
    changed = sorted(n for n, m in current["documents"].items() if saved.get("documents", {}).get(n) != m)
    missing = sorted(set(saved.get("documents", {})) - set(current["documents"]))
    if changed or missing:
        print(f"warning: the corpus differs from bench/rag_eval/manifest.json (Python {saved.get('python')} there, "
              f"{current['python']} here): {len(changed)} documents changed or new, {len(missing)} missing; questions "
              "whose evidence is gone are not counted", file=sys.stderr)
    question_sets = load_questions()
    count_tokens, counter_name = token_counter(args.tokenizer)
    dense_model, dense_note = (None, "skipped (--no-dense)") if args.no_dense else load_wordllama()
    print(f"corpus: {len(docs)} documents, {current['num_chars'] / 1e6:.2f} M chars; dense: {dense_note}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="berth-rag-bench-"))
    report: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": _git_commit(),
                    "cpu": cpu_name(), "dense": dense_note,
                    "config": {"chunk_tokens": args.chunk_tokens, "chunk_overlap": args.chunk_overlap,
                               "token_counter": counter_name, "rrf_k": RRF_K, "fusion_depth": DEPTH,
                               "seed": SEED, "target_chunks": args.target_chunks, "queries": args.queries},
                    "corpus": {"num_documents": len(docs), "num_chars": current["num_chars"],
                               "python": current["python"], "changed_documents": len(changed) + len(missing)}}
    try:
        started = time.perf_counter()
        kb, chunks = build_kb(docs, tmp / "eval.sqlite3", count_tokens, args.chunk_tokens, args.chunk_overlap)
        report["corpus"]["num_chunks"] = len(chunks)
        report["corpus"]["index_s"] = time.perf_counter() - started
        dense = None
        if dense_model is not None:
            started = time.perf_counter()
            dense = DenseRetriever(dense_model, chunks)
            report["corpus"]["dense_embed_s"] = time.perf_counter() - started
        quality, info = evaluate(question_sets, kb, chunks, dense)
        report["quality"], report["question_info"] = quality, info
        report["comparisons"] = comparisons(quality)
        report["corpus"]["query"] = query_latency(kb, [q.question for s in SETS for q in question_sets.get(s, [])],
                                                  args.queries)
        kb.close()
        if args.pg_url:      # the PostgreSQL store ranks on its own (ts_rank_cd, 'simple' config: no stemming)
            pg_kb, pg_chunks = build_kb(docs, args.pg_url, count_tokens, args.chunk_tokens, args.chunk_overlap)
            try:
                pg_quality, _ = evaluate(question_sets, pg_kb, pg_chunks, None)
                for set_name, modes in pg_quality.items():
                    quality[set_name]["keyword_postgresql"] = modes["keyword"]
                report["comparisons"] = comparisons(quality)
            finally:
                for d in docs:
                    pg_kb.remove(d.name)
                pg_kb.close()
        print(f"quality done: {len(chunks)} chunks", flush=True)

        report["chunk_sweep"] = []
        for size in [int(s) for s in args.chunk_sweep.split(",") if s.strip()]:
            overlap = min(args.chunk_overlap, size // 8)
            sweep_kb, sweep_chunks = build_kb(docs, tmp / f"sweep{size}.sqlite3", count_tokens, size, overlap)
            sweep_dense = DenseRetriever(dense_model, sweep_chunks) if dense_model is not None else None
            sweep_quality, _ = evaluate(question_sets, sweep_kb, sweep_chunks, sweep_dense)
            sweep_kb.close()
            report["chunk_sweep"].append({"chunk_tokens": size, "chunk_overlap": overlap, "chunks": len(sweep_chunks),
                                          "quality": sweep_quality})

        if args.base_url:
            handwritten = question_sets.get("handwritten", [])
            report["end_to_end"] = end_to_end(args.base_url, handwritten, chunks, args.token, args.max_new_tokens,
                                              model=args.model)
            print("end to end done", flush=True)
        else:
            report["end_to_end_skipped"] = "no --base-url"

        if not args.skip_speed:
            queries = [q.question for s in SETS for q in question_sets.get(s, [])]
            report["speed"] = {"sqlite": speed(docs, str(tmp / "speed.sqlite3"), tmp, count_tokens, queries,
                                               args.target_chunks, args.queries, dense_model)}
            if args.pg_url:
                report["speed"]["postgresql"] = speed(docs, args.pg_url, tmp, count_tokens, queries,
                                                      args.target_chunks, args.queries)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    text = markdown(report)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(text)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
