"""The WebUI's knowledge-base parts in real Chromium: the documents panel and the "use knowledge base" switch.

First against mocked routes (page logic, no model), then against real servers: one started with
`--knowledge` (conftest.knowledge_server: one pre-indexed .md file, a private --knowledge-db) and the
plain session server (no knowledge base).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

if not os.path.exists("/usr/bin/chromium"):
    pytest.skip("/usr/bin/chromium is absent (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="the playwright package is absent")

STATIC = Path(__file__).resolve().parents[2] / "server" / "http" / "static"
MOCK_ORIGIN = "http://berth.test"
ANSWER = "#transcript .msg.assistant"
FINISHED_JS = """n => { const a = document.querySelectorAll('#transcript .msg.assistant');
  return a.length >= n && a[n - 1].dataset.state !== 'streaming'; }"""
NO_KB_MESSAGE = ("knowledge needs a knowledge base: start berth with --knowledge DIR (or --knowledge-db) "
                 "and add documents")


# ---------- helpers ----------

def open_chat(page, base_url: str, token: str | None = None) -> None:
    page.goto(base_url + "/")
    if token is not None:
        page.wait_for_selector("#token-dialog[open]")
        page.fill("#token-input", token)
        page.click("#token-submit")
        page.wait_for_selector("#token-dialog:not([open])", state="attached")
    page.wait_for_function("() => document.getElementById('model-name').textContent !== 'connecting…'")


def open_documents(page) -> None:
    if not page.eval_on_selector("#knowledge", "d => d.open"):
        page.click("#knowledge summary")


def doc_row(page, name: str):
    return page.locator("#kb-docs .kb-doc").filter(has=page.locator(".kb-doc-name", has_text=name))


def not_the_token_probe(console_errors: list[str]) -> list[str]:
    """Console errors but the 401 of the first /v1/models probe (before the token was entered)."""
    return [e for e in console_errors if "status of 401" not in e]


def ask(page, text: str) -> int:
    count = page.locator(ANSWER).count()
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_function("n => document.querySelectorAll('#transcript .msg.assistant').length >= n", arg=count + 1)
    return count + 1


def wait_finished(page, index: int, timeout_ms: int = 90_000):
    page.wait_for_function(FINISHED_JS, arg=index, timeout=timeout_ms)
    return page.locator(ANSWER).nth(index - 1)


# ---------- mocked server ----------

class MockServer:
    """Static files, /v1/models, a scripted /ws and an in-memory knowledge API on MOCK_ORIGIN."""

    def __init__(self, page, reply, documents: list[dict] | None = None):
        self.received: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.num_connections = 0
        self.documents = documents if documents is not None else []
        self._reply = reply
        page.route(MOCK_ORIGIN + "/**", self._http)
        page.route_web_socket(MOCK_ORIGIN.replace("http", "ws") + "/ws", self._ws)

    def _http(self, route) -> None:
        request = route.request
        path = urlparse(request.url).path
        self.requests.append((request.method, path))
        if path == "/":
            route.fulfill(path=STATIC / "index.html")
        elif path in ("/static/app.js", "/static/style.css"):
            route.fulfill(path=STATIC / path.removeprefix("/static/"))
        elif path == "/v1/models":
            route.fulfill(json={"object": "list", "data": [{"id": "mock-model", "object": "model"}]})
        elif path == "/api/v1/documents":
            route.fulfill(json={"documents": self.documents,
                                "num_chunks": sum(d["num_chunks"] for d in self.documents)})
        elif path.startswith("/api/v1/documents/") and request.method == "DELETE":
            name = unquote(path.removeprefix("/api/v1/documents/"))
            self.documents = [d for d in self.documents if d["name"] != name]
            route.fulfill(json={"deleted": name})
        else:
            route.fulfill(status=404, body="not found")

    def _ws(self, ws) -> None:
        self.num_connections += 1
        ws.on_message(lambda message: self._on_message(ws, message))

    def _on_message(self, ws, message) -> None:
        request = json.loads(message)
        self.received.append(request)
        self._reply(ws, request, self)


def test_sources_frame_is_shown_apart_and_kept_out_of_history(make_page):
    def reply(ws, request, server):
        if len(server.received) == 2:   # drop the socket: the retry must restore the history
            ws.close()
            return
        ws.send("MNN is an inference")
        ws.send(" engine.")
        if request.get("langchain"):
            ws.send("\n\nSources: [1] mnn.md #0; [2] a; b.md #3")
        ws.send("<EOS>")

    probe = make_page()
    page = probe.page
    server = MockServer(page, reply)
    open_chat(page, MOCK_ORIGIN)
    page.check("#use-kb")
    answer = wait_finished(page, ask(page, "What is MNN?"))
    assert answer.get_attribute("data-state") == "done"
    assert answer.locator(".body").text_content() == "MNN is an inference engine."
    assert answer.locator(".sources li").all_text_contents() == ["[1] mnn.md #0", "[2] a; b.md #3"]
    assert "tokens" in answer.locator(".meta").text_content()
    assert server.received[0]["langchain"] is True

    answer = wait_finished(page, ask(page, "Who develops it?"))
    assert answer.get_attribute("data-state") == "error"
    answer.locator("button.retry").click()
    answer = wait_finished(page, 2)
    assert answer.locator(".sources").count() == 1
    retried = server.received[2]
    assert retried["prompt"] == "Who develops it?" and retried["langchain"] is True
    assert retried["history"] == [["What is MNN?", "MNN is an inference engine."]]

    page.uncheck("#use-kb")
    answer = wait_finished(page, ask(page, "And without it?"))
    assert "langchain" not in server.received[3]
    assert answer.locator(".sources").count() == 0
    assert probe.console_errors == [] and probe.dialogs == []


def test_sources_lookalike_from_the_model_stays_in_the_answer(make_page):
    def reply(ws, request, server):
        for frame in ["Look:", "\n\nSources: are", " listed below.", "<EOS>"]:
            ws.send(frame)

    probe = make_page()
    MockServer(probe.page, reply)
    open_chat(probe.page, MOCK_ORIGIN)
    probe.page.check("#use-kb")
    answer = wait_finished(probe.page, ask(probe.page, "q"))
    assert answer.locator(".body").text_content() == "Look:\n\nSources: are listed below."
    assert answer.locator(".sources").count() == 0


def test_document_names_render_as_text_and_delete_encodes_them(make_page):
    evil = '<img src=x onerror=alert(1)> a/b?#%.md'
    docs = [{"doc_id": "d1", "name": evil, "num_chunks": 2, "num_bytes": 10, "added_at": 0},
            {"doc_id": "d2", "name": "plain.txt", "num_chunks": 1, "num_bytes": 5, "added_at": 0}]
    probe = make_page()
    page = probe.page
    server = MockServer(page, lambda ws, request, server: None, documents=docs)
    open_chat(page, MOCK_ORIGIN)
    assert ("GET", "/api/v1/documents") not in server.requests, "the page load must not ask for documents"
    open_documents(page)
    page.wait_for_selector("#kb-docs .kb-doc >> nth=1")
    assert page.locator("#knowledge img").count() == 0
    assert page.locator("#kb-docs .kb-doc-name").all_text_contents() == [evil, "plain.txt"]
    assert page.locator("#kb-totals").text_content() == "2 documents · 3 chunks"
    doc_row(page, evil).locator("button.kb-delete").click()
    page.wait_for_function("() => document.querySelectorAll('#kb-docs .kb-doc').length === 1")
    assert ("DELETE", "/api/v1/documents/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E%20a%2Fb%3F%23%25.md") \
        in server.requests
    assert page.locator("#kb-totals").text_content() == "1 document · 1 chunk"
    assert probe.dialogs == [] and probe.console_errors == []


def test_phone_layout_keeps_switch_and_panel_on_screen(make_page):
    probe = make_page(viewport={"width": 375, "height": 667})
    MockServer(probe.page, lambda ws, request, server: None,
               documents=[{"doc_id": "d", "name": "x" * 200 + ".md", "num_chunks": 9, "num_bytes": 1, "added_at": 0}])
    page = probe.page
    open_chat(page, MOCK_ORIGIN)
    for selector in ("#prompt", "#send", "#use-kb"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375 and box["y"] + box["height"] <= 667
    open_documents(page)
    page.wait_for_selector("#kb-docs .kb-doc")
    page.locator("#kb-docs .kb-delete").scroll_into_view_if_needed()
    box = page.locator("#kb-docs .kb-delete").bounding_box()
    assert box and box["x"] + box["width"] <= 375
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")


# ---------- real servers ----------

def test_panel_lists_uploads_and_deletes(make_page, knowledge_server):
    base_url, token = knowledge_server
    probe = make_page()
    page = probe.page
    open_chat(page, base_url, token)
    open_documents(page)
    mnn = doc_row(page, "mnn.md")
    mnn.wait_for()
    assert "chunk" in mnn.locator(".kb-doc-chunks").text_content()
    assert page.is_enabled("#use-kb")

    notes = b"Berth notes.\n\nThe WebUI can upload documents into the knowledge base and delete them again.\n"
    page.set_input_files("#kb-files", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": notes}])
    page.wait_for_selector("#kb-upload[data-status=completed]", timeout=60_000)
    assert page.locator("#kb-upload .kb-file.ok").all_text_contents() == ["notes.txt: indexed"]
    row = doc_row(page, "notes.txt")
    row.wait_for()
    assert row.locator(".kb-doc-chunks").text_content() == "1 chunk"
    assert page.locator("#kb-totals").text_content().startswith("2 documents · ")

    row.locator("button.kb-delete").click()
    row.wait_for(state="detached")
    assert "Deleted notes.txt." in page.locator("#kb-message").text_content()
    assert page.locator("#kb-docs .kb-doc-name").all_text_contents() == ["mnn.md"]
    assert page.locator("#kb-totals").text_content().startswith("1 document · ")
    assert all(token not in url for url in probe.urls), "the token leaked into a URL"
    assert not_the_token_probe(probe.console_errors) == []


def test_unsupported_upload_shows_its_error(make_page, knowledge_server):
    base_url, token = knowledge_server
    page = make_page().page
    open_chat(page, base_url, token)
    open_documents(page)
    doc_row(page, "mnn.md").wait_for()
    page.set_input_files("#kb-files", files=[{"name": "image.png", "mimeType": "image/png", "buffer": b"\x89PNG"}])
    page.wait_for_selector("#kb-upload[data-status=failed]", timeout=60_000)
    assert "image.png" in page.locator("#kb-upload .kb-file.failed").text_content()
    assert page.locator("#kb-docs .kb-doc-name").all_text_contents() == ["mnn.md"]


def test_knowledge_answer_shows_sources(make_page, knowledge_server):
    base_url, token = knowledge_server
    probe = make_page()
    page = probe.page
    open_chat(page, base_url, token)
    sent: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(payload)))
    page.check("#use-kb")
    answer = wait_finished(page, ask(page, "What is MNN?"), timeout_ms=120_000)
    assert answer.get_attribute("data-state") == "done"
    assert json.loads(sent[0])["langchain"] is True
    body = answer.locator(".body").text_content()
    assert body.strip() and "Sources:" not in body
    sources = answer.locator(".sources")
    assert "mnn.md" in sources.locator("li").first.text_content()
    assert not_the_token_probe(probe.console_errors) == []


def test_server_without_knowledge_base(make_page, server_url):
    page = make_page().page
    open_chat(page, server_url)
    assert page.is_enabled("#use-kb")   # not known yet: the page load asks nothing that may fail
    page.click("#use-kb")   # the first use asks the server, which answers 400: no knowledge base
    page.wait_for_selector("#use-kb:disabled")
    assert not page.is_checked("#use-kb")
    assert "no knowledge base" in page.locator("#kb-switch-note").text_content()
    open_documents(page)
    message = page.locator("#kb-message")
    page.wait_for_function("() => document.getElementById('kb-message').textContent.length > 0")
    assert message.text_content() == NO_KB_MESSAGE
    assert "is-error" in message.get_attribute("class")
    assert page.is_disabled("#kb-files")
    assert page.locator("#kb-docs .kb-doc").count() == 0
