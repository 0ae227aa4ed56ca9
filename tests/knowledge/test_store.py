"""KnowledgeBase over each store (SQLite and PostgreSQL, see conftest): one suite, both backends."""
from __future__ import annotations

import json
import threading

import pytest

from server.knowledge import KnowledgeBase, KnowledgeError
from server.knowledge.knowledge_base import doc_id

CORPUS = {
    "canada.md": "Canada is a country in North America. Its capital is Ottawa, in the province of Ontario. "
                 "Canada has ten provinces and three territories.",
    "python.txt": "Python is a programming language created by Guido van Rossum. "
                  "The global interpreter lock lets one thread run Python bytecode at a time.",
    "coffee.txt": "Espresso is brewed by forcing hot water through finely ground coffee beans. "
                  "A latte adds steamed milk to a shot of espresso.",
    "mars.txt": "Mars is the fourth planet from the Sun. Olympus Mons on Mars is the tallest volcano "
                "in the solar system.",
    "berth.md": "berth serves language models over HTTP. The scheduler batches requests continuously and the "
                "block manager tracks paged KV cache blocks.",
}
CHINESE = {
    "beijing.txt": "北京是中华人民共和国的首都，也是全国的政治和文化中心。故宫位于北京的中心。",
    "greatwall.txt": "长城是中国古代的军事防御工程，东起山海关，西至嘉峪关，全长两万多公里。",
    "tea.txt": "绿茶是中国产量最多的茶类。龙井茶产于浙江杭州西湖一带。",
}


def add_all(kb: KnowledgeBase, docs: dict[str, str]) -> None:
    for name, text in docs.items():
        kb.add_text(name, text)


def test_add_list_remove(open_kb):
    kb = open_kb()
    info = kb.add_text("canada.md", CORPUS["canada.md"])
    assert info.doc_id == doc_id("canada.md") and len(info.doc_id) == 16
    assert info.num_bytes == len(CORPUS["canada.md"].encode()) and info.num_chunks == kb.num_chunks >= 1
    kb.add_file("mars.txt", CORPUS["mars.txt"].encode())
    assert [d.name for d in kb.documents()] == ["canada.md", "mars.txt"]
    assert kb.remove("canada.md")
    assert kb.remove(doc_id("mars.txt"))      # by id too
    assert not kb.remove("canada.md")
    assert kb.documents() == [] and kb.num_chunks == 0
    assert kb.retrieve("capital of Canada") == []


def test_re_adding_a_name_replaces_its_chunks(open_kb):
    kb = open_kb(chunk_tokens=16, chunk_overlap=0)
    first = kb.add_text("notes.txt", CORPUS["canada.md"] + " " + CORPUS["mars.txt"])
    second = kb.add_text("notes.txt", CORPUS["coffee.txt"])
    assert first.num_chunks > second.num_chunks
    assert [d.num_chunks for d in kb.documents()] == [second.num_chunks] and kb.num_chunks == second.num_chunks
    assert kb.retrieve("Olympus Mons volcano") == []
    assert kb.retrieve("espresso")[0].doc_name == "notes.txt"


def test_documents_survive_a_restart_and_replicas_share_them(open_kb):
    kb = open_kb()
    add_all(kb, CORPUS)
    replica = open_kb()   # SQLite: a second open of the same file; PostgreSQL: a second replica on one database
    assert [d.name for d in replica.documents()] == sorted(CORPUS)
    kb.close()
    replica.add_text("late.txt", "Added by the replica about Saturn rings.")
    restarted = open_kb()
    assert len(restarted.documents()) == len(CORPUS) + 1 and restarted.num_chunks == replica.num_chunks
    assert restarted.retrieve("Saturn rings")[0].doc_name == "late.txt"


@pytest.mark.parametrize("question, expected", [
    ("What is the capital of Canada?", "canada.md"),
    ("Who created the Python programming language?", "python.txt"),
    ("how do you brew espresso coffee", "coffee.txt"),
    ("tallest volcano in the solar system", "mars.txt"),
    ("paged KV cache blocks", "berth.md"),
])
def test_keyword_ranking_puts_the_right_chunk_first(open_kb, question, expected):
    kb = open_kb()
    add_all(kb, CORPUS)
    hits = kb.retrieve(question, top_k=3)
    assert hits[0].doc_name == expected
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    assert all(a.score >= b.score > 0 for a, b in zip(hits, hits[1:]))
    assert hits[0].chunk_id.startswith(doc_id(expected) + ":")


@pytest.mark.parametrize("question, expected", [
    ("中国的首都是哪里？", "beijing.txt"),
    ("故宫在哪里", "beijing.txt"),
    ("长城有多长", "greatwall.txt"),
    ("龙井茶产于哪里", "tea.txt"),
    ("长城", "greatwall.txt"),                 # a single bigram
    ("Where is 嘉峪关?", "greatwall.txt"),     # mixed: words and CJK fused
])
def test_chinese_text_is_found_by_a_chinese_query(open_kb, question, expected):
    kb = open_kb()
    add_all(kb, CHINESE | CORPUS)
    assert kb.retrieve(question)[0].doc_name == expected


@pytest.mark.parametrize("question", [
    '"', '""', 'canada" OR "mars', "NEAR(canada mars)", "NEAR(", "canad*", "*", "OR", "AND", "NOT", "-canada",
    "canada -", "capital AND", "(canada", "text:canada", "^canada", "{text}: canada",
    "'; DROP TABLE knowledge_chunks; --",
    "\\", "%", "_", "100%_", "北京\" OR \"长城", "\x00canada",
])
def test_query_syntax_in_user_text_is_never_syntax(open_kb, question):
    kb = open_kb()
    add_all(kb, CORPUS | CHINESE)
    hits = kb.retrieve(question)
    assert isinstance(hits, list)
    assert kb.num_chunks >= len(CORPUS)
    if "canada" in question.lower() and "mars" not in question:
        assert hits and hits[0].doc_name == "canada.md"


@pytest.mark.parametrize("question", ["", "   ", "the of and is", "?!...", "what is it"])
def test_queries_without_terms_return_nothing(open_kb, question):
    kb = open_kb()
    add_all(kb, CORPUS)
    assert kb.retrieve(question) == []


def test_top_k_bounds_the_hits(open_kb):
    kb = open_kb()
    add_all(kb, CORPUS)
    assert len(kb.retrieve("the Canada Python espresso Mars berth", top_k=2)) == 2
    assert len(kb.retrieve("Canada", top_k=0)) == 1


def test_retrieve_runs_while_another_thread_adds(open_kb):
    kb = open_kb()
    add_all(kb, CORPUS)
    errors: list[BaseException] = []
    stop = threading.Event()

    def add():
        try:
            for i in range(30):
                kb.add_text(f"extra-{i}.txt", f"Extra document {i} about the planet Jupiter and its moon {i}.")
        except BaseException as e:
            errors.append(e)
        finally:
            stop.set()

    def read():
        try:
            while not stop.is_set():
                assert kb.retrieve("capital of Canada")[0].doc_name == "canada.md"
                kb.retrieve("Jupiter moon")
                kb.documents()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=add)] + [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(kb.documents()) == len(CORPUS) + 30


def test_index_dir_indexes_the_good_files_and_reports_the_bad(open_kb, tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "canada.md").write_text(CORPUS["canada.md"])
    (folder / "sub" / "mars.html").write_text(f"<html><body><p>{CORPUS['mars.txt']}</p></body></html>")
    (folder / "coffee.json").write_text(json.dumps({"text": CORPUS["coffee.txt"]}))
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "tool.exe").write_bytes(b"MZ\x90\x00")
    (folder / "notext.json").write_text(json.dumps({"title": "no text field"}))
    (folder / ".hidden.txt").write_text("skipped")
    kb = open_kb()
    added, errors = kb.index_dir(folder)
    assert sorted(d.name for d in added) == ["canada.md", "coffee.json", "sub/mars.html"]
    assert sorted(name for name, _ in errors) == ["broken.pdf", "empty.txt", "notext.json", "tool.exe"]
    assert all(message.startswith(name) for name, message in errors)
    assert kb.retrieve("tallest volcano")[0].doc_name == "sub/mars.html"
    added_again, _ = kb.index_dir(folder)
    assert len(kb.documents()) == len(added_again) == 3     # re-indexing replaces, never duplicates


@pytest.mark.parametrize("name, data", [
    ("broken.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\ngarbage"),
    ("empty.txt", b"  \n\t "),
    ("virus.exe", b"MZ"),
    ("record.json", b'{"title": "x"}'),
])
def test_bad_files_raise_knowledge_error(open_kb, name, data):
    kb = open_kb()
    with pytest.raises(KnowledgeError, match=name.replace(".", r"\.")):
        kb.add_file(name, data)
    assert kb.documents() == []


@pytest.mark.parametrize("name", ["", "   ", "a\x00b", "bad\ud800name"])
def test_bad_names_raise_knowledge_error(open_kb, name):
    with pytest.raises(KnowledgeError):
        open_kb().add_text(name, "some text")


def test_closed_knowledge_base_refuses(open_kb):
    kb = open_kb()
    kb.close()
    with pytest.raises(RuntimeError, match="closed"):
        kb.documents()


def test_open_defaults_to_a_sqlite_file_in_the_cache_dir(tmp_path):
    kb = KnowledgeBase.open(None, tmp_path / "cache")
    try:
        kb.add_text("a.txt", "hello world")
        assert (tmp_path / "cache" / "knowledge.sqlite3").exists()
    finally:
        kb.close()
    with pytest.raises(ValueError):
        KnowledgeBase.open(None, tmp_path, chunk_tokens=32, chunk_overlap=32)


def test_postgres_connections_are_remade_after_the_server_drops_them(postgres_url, tmp_path):
    import psycopg

    kb = KnowledgeBase.open(postgres_url, tmp_path)
    try:
        add_all(kb, CORPUS)
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        with pytest.raises(psycopg.OperationalError):
            kb.retrieve("capital of Canada")      # the call that finds the connection dead fails (a 500)...
        assert kb.retrieve("capital of Canada")[0].doc_name == "canada.md"   # ...the next one reconnects
    finally:
        kb.close()
