"""python -m bench.rag, its pure parts offline: metrics, fusion, question generation, gold chunks, report."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from bench import rag
from bench.rag import Chunk, Document, Question
from server.knowledge.chunking import estimate_tokens

TINY_MODULES = ["textwrap", "heapq", "shlex", "fnmatch", "calendar", "json"]


def _doc(name: str, *members: tuple[str, str, str]) -> Document:
    """A document in the corpus layout: `kind qualname: summary` lines, each followed by some body text."""
    parts = [f"# {name} module", f"The {name} module does things."]
    for kind, qualname, summary in members:
        parts.append(f"{kind} {qualname}: {summary}\nSignature: {qualname.rsplit('.', 1)[-1]}(x)\nMore words about it.")
    return Document(f"{name}.md", "\n\n".join(parts) + "\n")


SYNTHETIC = [
    _doc("alpha", ("function", "alpha.fold", "Return the folded value of a long sequence of numbers."),
         ("function", "alpha.whirl", "Create a spinning wheel for the terminal progress display."),
         ("class", "alpha.Box", "A container holding several small parcels of shipped goods."),
         ("function", "alpha.short", "Do it."),                                  # too few content words
         ("function", "alpha.named", "Return what named returns to the named caller today.")),   # has its name
    _doc("beta", ("method", "beta.Reader.load", "Parse a configuration file written in the classic format."),
         ("function", "beta.dup", "Return the folded value of a long sequence of numbers."),  # not unique
         ("function", "beta.combine", "Merge two sorted streams of records into one ordered stream.")),
]


# ------------------------------------------------------------------ metrics and fusion

def test_hit_at_k_and_reciprocal_rank_on_a_toy_ranking():
    ranking = ["c", "a", "g", "b"]
    gold = {"g", "z"}
    assert rag.hit_at(ranking, gold, 1) == 0.0
    assert rag.hit_at(ranking, gold, 2) == 0.0
    assert rag.hit_at(ranking, gold, 3) == 1.0
    assert rag.reciprocal_rank(ranking, gold) == pytest.approx(1 / 3)
    assert rag.reciprocal_rank(ranking, gold, k=2) == 0.0          # beyond the cut-off: 0
    assert rag.reciprocal_rank([], gold) == 0.0
    assert rag.reciprocal_rank(["z", "g"], gold) == 1.0             # the first gold hit counts, once


def test_summarize_averages_over_questions():
    rankings = [["g1", "x"], ["x", "g2"], ["x", "y", "z", "w", "v", "g3"], []]
    golds = [{"g1"}, {"g2"}, {"g3"}, {"g4"}]
    s = rag.summarize(rankings, golds)
    assert s["n"] == 4
    assert s["hit@1"] == pytest.approx(1 / 4)
    assert s["hit@5"] == pytest.approx(2 / 4)
    assert s["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 6 + 0) / 4)
    assert rag.summarize([], []) == {"n": 0, "hit@1": None, "hit@5": None, "mrr@10": None}


def test_rrf_fuses_by_reciprocal_rank():
    keyword = ["a", "b", "c"]
    dense = ["c", "d", "a"]
    fused = rag.rrf([keyword, dense], k=60)
    # a: 1/61 + 1/63, c: 1/63 + 1/61 (tie, broken by best single rank then list order: a's rank 1 is in list 0),
    # b: 1/62, d: 1/62 (tie: b first, from list 0)
    assert fused == ["a", "c", "b", "d"]
    assert rag.rrf([keyword, dense], top=2) == ["a", "c"]
    assert rag.rrf([["x", "y"]]) == ["x", "y"]                     # one list passes through
    assert rag.rrf([]) == []
    # a document ranked well in both lists beats one ranked first in one list only
    assert rag.rrf([["p", "q"], ["r", "q"]])[0] == "q"


def test_rrf_k_changes_scores_not_single_list_order():
    lists = [["a", "b", "c"], ["c", "b", "a"]]
    assert rag.rrf(lists, k=1)[0] in ("a", "c")
    assert rag.rrf(lists, k=1)[-1] == "b"          # k=1 rewards the extremes: 1/2+1/4 > 1/3+1/3
    assert rag.rrf(lists, k=1000) == ["a", "c", "b"]   # a and c tie at any k: the tie goes to list 0's first


# ------------------------------------------------------------------ question generation

def test_question_text_conjugates_and_leaves_the_name_out():
    assert rag.question_text("function", "Return the median (middle value) of numeric data.") == \
        "Which function returns the median (middle value) of numeric data?"
    assert rag.question_text("class", "A dictionary that remembers insertion order.") == \
        "Which class is a dictionary that remembers insertion order?"
    assert rag.question_text("function", "Returns the machine type.") == "Which function returns the machine type?"
    assert rag.question_text("method", "Copy ``src`` to the *dst* path.") == "Which method copies src to the dst path?"
    assert rag.question_text("function", "Apply it.") == "Which function applies it?"
    assert rag.question_text("function", "Second argument is odd.") == \
        "Which function is described as: Second argument is odd?"
    assert rag.third_person("try") == "tries" and rag.third_person("push") == "pushes"


def test_candidates_skip_short_named_and_repeated_sentences():
    candidates = rag.summary_candidates(SYNTHETIC)
    names = {c[2] for c in candidates}
    assert names == {"whirl", "Box", "load", "combine"}
    assert "short" not in names and "named" not in names         # too short; its name is in the sentence
    assert "fold" not in names and "dup" not in names           # the same sentence is in two documents


def test_generation_is_deterministic_and_capped_per_document():
    first = rag.generate_questions(SYNTHETIC, num=10, seed=3)
    again = rag.generate_questions(SYNTHETIC, num=10, seed=3)
    assert first == again
    assert len(first) == 4                                     # 2 per document at most, and only 4 candidates
    assert [q.qid for q in first] == ["g000", "g001", "g002", "g003"]
    for q in first:
        assert q.answer.lower() not in q.question.lower()
        assert q.question.startswith("Which ") and q.question.endswith("?")
    one = rag.generate_questions(SYNTHETIC, num=1, seed=0)
    assert len(one) == 1 and one == rag.generate_questions(SYNTHETIC, num=1, seed=0)


def test_dropped_variant_is_seeded_and_keeps_the_gold():
    q = Question("g007", "generated", "Which function merges two sorted streams of records into one ordered stream?",
                 "beta.md", "Merge two sorted streams of records into one ordered stream.", "combine", "function")
    d = rag.drop_words(q, seed=0)
    assert d == rag.drop_words(q, seed=0)
    assert d.qid == "d007" and d.set == "dropped"
    assert (d.doc, d.evidence, d.answer) == (q.doc, q.evidence, q.answer)
    assert d.question.startswith("Which function ")
    words = d.question[len("Which function "):].rstrip("?").split()
    original = rag._content_words(q.question[len("Which function"):])
    assert 3 <= len(words) < len(original)
    assert set(words) <= set(original)


def test_generated_gold_chunks_exist_in_a_tiny_built_kb(tmp_path):
    docs = rag.stdlib_documents(TINY_MODULES)
    assert [d.name for d in docs] == [f"{m}.md" for m in TINY_MODULES]
    questions = rag.generate_questions(docs, num=30, seed=0)
    assert len(questions) >= 8
    assert questions == rag.generate_questions(rag.stdlib_documents(TINY_MODULES), num=30, seed=0)
    kb, chunks = rag.build_kb(docs, tmp_path / "kb.sqlite3", estimate_tokens, chunk_tokens=128, chunk_overlap=16)
    try:
        assert kb.num_chunks == len(chunks)
        by_doc: dict[str, list[Chunk]] = {}
        for c in chunks:
            by_doc.setdefault(c.doc, []).append(c)
        for q in questions + [rag.drop_words(q) for q in questions]:
            gold = rag.gold_chunks(by_doc, q)
            assert gold, q
            # the member's name is in the gold chunk: the summary line starts with it
            assert all(q.answer in c.text for c in chunks if c.chunk_id in gold), q
        results, info = rag.evaluate({"generated": questions}, kb, chunks, None)
        assert info["generated"]["no_gold"] == []
        assert results["generated"]["keyword"]["n"] == len(questions)
        assert results["generated"]["keyword"]["hit@5"] > 0.5      # verbatim questions: keyword search finds most
    finally:
        kb.close()


def test_stdlib_documents_have_no_memory_addresses():
    docs = rag.stdlib_documents(["shutil", "socket"])
    assert docs and all(" at 0x" not in d.text for d in docs)
    assert rag.stdlib_documents(["shutil", "socket"]) == docs


def test_handwritten_questions_have_gold_chunks_holding_their_answers(tmp_path):
    handwritten = rag.load_questions()["handwritten"]
    assert 15 <= len(handwritten) <= 30
    assert len({q.qid for q in handwritten}) == len(handwritten)
    stdlib = sorted({q.doc[:-3] for q in handwritten if q.doc != "eas-llm-deployment.md"})
    docs = rag.stdlib_documents(stdlib)
    assert len(docs) == len(stdlib)
    kb, chunks = rag.build_kb(docs, tmp_path / "kb.sqlite3", estimate_tokens)
    kb.close()
    by_doc: dict[str, list[Chunk]] = {}
    for c in chunks:
        by_doc.setdefault(c.doc, []).append(c)
    for q in handwritten:
        if q.doc == "eas-llm-deployment.md":
            continue
        gold = rag.gold_chunks(by_doc, q)
        assert gold, q.qid
        assert any(q.answer.lower() in c.text.lower() for c in chunks if c.chunk_id in gold), q.qid


def test_saved_generated_questions_are_well_formed():
    sets = rag.load_questions()
    generated, dropped = sets["generated"], sets["dropped"]
    assert len(generated) == len(dropped) >= 200
    assert [q.qid[1:] for q in generated] == [q.qid[1:] for q in dropped]
    assert all(q.answer.lower() not in q.question.lower() for q in generated)
    manifest = json.loads((rag.EVAL_DIR / "manifest.json").read_text())
    assert {q.doc for q in generated} <= set(manifest["documents"])
    size = sum(p.stat().st_size for p in rag.EVAL_DIR.iterdir())
    assert size < 1 << 20


# ------------------------------------------------------------------ retrievers, speed, end to end, report

class _LetterModel:
    """A stand-in for wordllama: bag-of-letters vectors."""

    def embed(self, texts, norm=True):
        out = np.zeros((len(texts), 26), dtype=np.float32)
        for i, text in enumerate(texts):
            for ch in text.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9) if norm else out


def test_dense_retriever_ranks_by_cosine():
    chunks = [Chunk("d:0", "d", "aaaa"), Chunk("d:1", "d", "bbbb"), Chunk("d:2", "d", "aabb")]
    dense = rag.DenseRetriever(_LetterModel(), chunks)
    assert dense.rank("aaa", depth=3) == ["d:0", "d:2", "d:1"]
    assert dense.rank("b", depth=1) == ["d:1"]
    assert dense.rank("ab", depth=10) == ["d:2", "d:0", "d:1"]     # depth beyond the chunks: all of them


def test_speed_on_a_small_target(tmp_path):
    docs = SYNTHETIC * 1
    result = rag.speed(docs, str(tmp_path / "s.sqlite3"), tmp_path, estimate_tokens, ["folded numbers", "parcels"],
                       target_chunks=5, num_queries=12, dense_model=_LetterModel())
    assert result["chunks"] >= 5 and result["documents"] >= 2
    assert result["chunks_per_s"] > 0 and result["query"]["n"] == 12
    assert result["query"]["p50_ms"] <= result["query"]["p99_ms"]
    assert result["dense_query"]["n"] == 12


def test_varied_documents_are_renamed_and_shuffled():
    copy0, copy1 = rag.varied_documents(SYNTHETIC, 0), rag.varied_documents(SYNTHETIC, 1)
    assert [d.name for d in copy0] == ["copy00/alpha.md", "copy00/beta.md"]
    assert sorted(copy0[0].text.split("\n\n")) == sorted(SYNTHETIC[0].text.strip().split("\n\n"))
    assert copy0 == rag.varied_documents(SYNTHETIC, 0) and copy0 != copy1


def _fake_server(answers: dict):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/v1/chat/completions":
                out = {"choices": [{"message": {"content": "oracle says " + answers["oracle"]}}]}
            elif body.get("langchain"):
                out = {"response": answers["langchain"], "sources": [{"chunk_id": "m:0", "doc": "m.md", "score": 1}]}
            else:
                out = {"response": answers["plain"]}
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_end_to_end_counts_answers_containing_the_expected_string():
    server = _fake_server({"langchain": "Use GCD from math.", "plain": "No idea.", "oracle": "gcd"})
    try:
        questions = [Question("h1", "handwritten", "largest common factor?", "m.md", "Greatest Common Divisor.", "gcd"),
                     Question("h2", "handwritten", "something else?", "m.md", "Not in any chunk.", "zzz")]
        chunks = [Chunk("m:0", "m.md", "function math.gcd: Greatest Common Divisor.")]
        result = rag.end_to_end(f"http://127.0.0.1:{server.server_address[1]}", questions, chunks, timeout=10)
    finally:
        server.shutdown()
        server.server_close()
    s = result["summary"]
    assert s["langchain"] == {"n": 2, "exact": 0.5}                 # case-insensitive "GCD"; "zzz" never
    assert s["plain"] == {"n": 2, "exact": 0.0}
    assert s["oracle"] == {"n": 1, "exact": 1.0}                    # h2 has no gold chunk: no oracle request
    assert s["server_gold_in_sources"] == 0.5
    assert s["langchain_exact_when_gold_retrieved"] == 1.0
    assert s["errors"] == 0


def test_markdown_report_and_comparisons():
    quality = {"handwritten": {"keyword": {"n": 3, "hit@1": 0.5, "hit@5": 1.0, "mrr@10": 0.7},
                               "dense": {"n": 3, "hit@1": 0.25, "hit@5": 0.5, "mrr@10": 0.4}}}
    lines = rag.comparisons(quality)
    assert lines == ["handwritten: keyword beats dense by 0.300 MRR@10 (hit@1 +0.250, hit@5 +0.500)"]
    report = {"date": "d", "cpu": "cpu", "dense": "fake",
              "config": {"chunk_tokens": 256, "chunk_overlap": 32, "token_counter": "estimate"},
              "corpus": {"num_documents": 2, "num_chunks": 9, "python": "3"}, "quality": quality,
              "comparisons": lines, "end_to_end_skipped": "no --base-url",
              "chunk_sweep": [{"chunk_tokens": 128, "chunks": 20, "quality": quality}],
              "speed": {"sqlite": {"documents": 2, "chunks": 9, "chars": 1000, "index_s": 0.5, "chunks_per_s": 18.0,
                                   "documents_per_s": 4.0, "mb_per_s": 0.002, "chunking_only_mb_per_s": 0.01,
                                   "query": {"n": 5, "p50_ms": 1.0, "p99_ms": 2.0}}}}
    text = rag.markdown(report)
    assert "| handwritten | 3 | keyword | 0.500 | 1.000 | 0.700 |" in text
    assert "| 128 | 20 | handwritten | dense | 0.250 | 0.500 | 0.400 |" in text
    assert "end to end: skipped (no --base-url)" in text
    assert "18 chunks/s" in text and "p99 2.00 ms" in text
