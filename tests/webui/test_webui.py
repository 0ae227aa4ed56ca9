"""The WebUI in real Chromium: first against mocked routes (page logic, no model), then against the real server."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest

if not os.path.exists("/usr/bin/chromium"):
    pytest.skip("/usr/bin/chromium is absent (apt-get install chromium)", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="the playwright package is absent")

STATIC = Path(__file__).resolve().parents[2] / "server" / "http" / "static"
MOCK_ORIGIN = "http://berth.test"
ANSWER = "#transcript .msg.assistant"
FINISHED_JS = """n => { const a = document.querySelectorAll('#transcript .msg.assistant');
  return a.length >= n && a[n - 1].dataset.state !== 'streaming'; }"""
GROWTH_JS = """() => { window.__lengths = [];
  new MutationObserver(() => {
    const bodies = document.querySelectorAll('#transcript .msg.assistant .body');
    if (!bodies.length) return;
    const n = bodies[bodies.length - 1].textContent.length;
    if (window.__lengths[window.__lengths.length - 1] !== n) window.__lengths.push(n);
  }).observe(document.getElementById('transcript'), {childList: true, subtree: true, characterData: true}); }"""


# ---------- helpers ----------

def open_chat(page, base_url: str) -> None:
    page.goto(base_url + "/")
    page.wait_for_function("() => document.getElementById('model-name').textContent !== 'connecting…'")


def set_settings(page, **fields: str) -> None:
    if not page.eval_on_selector("#settings", "d => d.open"):
        page.click("#settings summary")
    for field_id, value in fields.items():
        page.fill("#" + field_id.replace("_", "-"), value)


def ask(page, text: str) -> int:
    """Type `text` and press Enter; returns the 1-based index of the answer it starts."""
    count = page.locator(ANSWER).count()
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_function("n => document.querySelectorAll('#transcript .msg.assistant').length >= n", arg=count + 1)
    return count + 1


def wait_finished(page, index: int, timeout_ms: int = 90_000):
    page.wait_for_function(FINISHED_JS, arg=index, timeout=timeout_ms)
    return page.locator(ANSWER).nth(index - 1)


def answer_text(page, index: int) -> str:
    return page.locator(ANSWER).nth(index - 1).locator(".body").text_content()


def counted_tokens(page, index: int) -> int:
    meta = page.locator(ANSWER).nth(index - 1).locator(".meta").text_content()
    match = re.search(r"≈ (\d+) tokens", meta)
    return int(match.group(1)) if match else 0


# ---------- mocked server: page logic without a model ----------

class MockServer:
    """Serves the static files and /v1/models on MOCK_ORIGIN and scripts the /ws session."""

    def __init__(self, page, reply, models_statuses=(200,)):
        self.received: list[dict] = []
        self.num_connections = 0
        self._reply = reply
        self._models_statuses = list(models_statuses)
        page.route(MOCK_ORIGIN + "/**", self._http)
        page.route_web_socket(MOCK_ORIGIN.replace("http", "ws") + "/ws", self._ws)

    def _http(self, route) -> None:
        path = urlparse(route.request.url).path
        if path in ("/", "/webui"):
            route.fulfill(path=STATIC / "index.html")
        elif path in ("/static/app.js", "/static/style.css"):
            route.fulfill(path=STATIC / path.removeprefix("/static/"))
        elif path == "/v1/models":
            status = self._models_statuses.pop(0) if len(self._models_statuses) > 1 else self._models_statuses[0]
            body = {"object": "list", "data": [{"id": "mock-model", "object": "model", "max_model_len": 2048}]}
            route.fulfill(status=status, json=body if status == 200 else {"error": {"code": status}})
        else:
            route.fulfill(status=404, body="not found")

    def _ws(self, ws) -> None:
        self.num_connections += 1
        ws.on_message(lambda message: self._on_message(ws, message))

    def _on_message(self, ws, message) -> None:
        request = json.loads(message)
        self.received.append(request)
        self._reply(ws, request, self)


def test_code_fences_and_html_render_as_text(make_page):
    def reply(ws, request, server):
        for frame in ["Here:\n```py", "thon\nprint('<b>x</b>')\n", "```\n<img src=x onerror=alert(1)> done", "<EOS>"]:
            ws.send(frame)

    probe = make_page()
    MockServer(probe.page, reply)
    open_chat(probe.page, MOCK_ORIGIN)
    wait_finished(probe.page, ask(probe.page, "show <script>alert(2)</script> code"))
    transcript = probe.page.locator("#transcript")
    assert transcript.locator("pre > code").text_content() == "print('<b>x</b>')"
    assert transcript.locator("pre > code").get_attribute("data-lang") == "python"
    assert transcript.locator("img, b, script").count() == 0
    assert "<img src=x onerror=alert(1)> done" in answer_text(probe.page, 1)
    assert "<script>alert(2)</script>" in transcript.locator(".msg.user .body").text_content()
    assert probe.dialogs == [] and probe.console_errors == []


def test_error_frame_shows_message_and_retry_resends(make_page):
    def reply(ws, request, server):
        if len(server.received) == 1:
            ws.send(json.dumps({"error": {"message": "queue is full", "type": "overloaded_error",
                                          "param": None, "code": 503}}))
        else:
            ws.send("fine now")
        ws.send("<EOS>")

    probe = make_page()
    server = MockServer(probe.page, reply)
    open_chat(probe.page, MOCK_ORIGIN)
    answer = wait_finished(probe.page, ask(probe.page, "hello?"))
    assert answer.get_attribute("data-state") == "error"
    assert "busy (503): queue is full" in answer.locator(".error").text_content()
    answer.locator("button.retry").click()
    wait_finished(probe.page, 1)
    assert [r["prompt"] for r in server.received] == ["hello?", "hello?"]
    assert probe.page.locator("#transcript .msg.user").count() == 1
    assert answer_text(probe.page, 1) == "fine now"


def test_dropped_connection_retry_restores_history(make_page):
    def reply(ws, request, server):
        if len(server.received) == 2:
            ws.send("partial")
            ws.close()
            return
        ws.send(f"answer {len(server.received)}")
        ws.send("<EOS>")

    probe = make_page()
    server = MockServer(probe.page, reply)
    open_chat(probe.page, MOCK_ORIGIN)
    wait_finished(probe.page, ask(probe.page, "first"))
    answer = wait_finished(probe.page, ask(probe.page, "second"))
    assert answer.get_attribute("data-state") == "error"
    assert "connection" in answer.locator(".error").text_content().lower()
    answer.locator("button.retry").click()
    wait_finished(probe.page, 2)
    assert answer_text(probe.page, 2) == "answer 3"
    assert server.num_connections == 2
    assert server.received[2]["prompt"] == "second"
    assert server.received[2]["history"] == [["first", "answer 1"]]
    assert "history" not in server.received[1]


def test_stop_sends_cancel_and_settings_are_sent(make_page):
    def reply(ws, request, server):
        if request.get("action") == "cancel":
            ws.send("<EOS>")
        else:
            ws.send("once upon a time")

    probe = make_page()
    server = MockServer(probe.page, reply)
    open_chat(probe.page, MOCK_ORIGIN)
    set_settings(probe.page, temperature="0", top_p="0.5", top_k="7", max_new_tokens="64", system_prompt="Be brief.")
    probe.page.click("#prompt")
    probe.page.keyboard.type("line1")
    probe.page.keyboard.press("Shift+Enter")
    probe.page.keyboard.type("line2")
    probe.page.keyboard.press("Enter")
    probe.page.wait_for_function("() => document.querySelector('#transcript .msg.assistant .body').textContent")
    assert probe.page.is_enabled("#stop") and probe.page.is_disabled("#send")
    probe.page.click("#stop")
    answer = wait_finished(probe.page, 1)
    assert answer.get_attribute("data-state") == "stopped"
    assert probe.page.is_enabled("#send") and probe.page.is_disabled("#stop")
    assert server.received == [
        {"prompt": "line1\nline2", "system_prompt": "Be brief.", "temperature": 0, "top_p": 0.5, "top_k": 7,
         "max_new_tokens": 64, "use_stream_chat": True},
        {"action": "cancel"},
    ]


def test_new_chat_opens_a_fresh_session(make_page):
    def reply(ws, request, server):
        ws.send(f"answer {len(server.received)}")
        ws.send("<EOS>")

    probe = make_page()
    server = MockServer(probe.page, reply)
    open_chat(probe.page, MOCK_ORIGIN)
    wait_finished(probe.page, ask(probe.page, "first"))
    probe.page.click("#new-chat")
    assert probe.page.locator("#transcript .msg").count() == 0
    wait_finished(probe.page, ask(probe.page, "second"))
    assert answer_text(probe.page, 1) == "answer 2"
    assert server.num_connections == 2
    assert "history" not in server.received[1]


def test_overloaded_probe_then_retry(make_page):
    probe = make_page()
    MockServer(probe.page, lambda ws, request, server: None, models_statuses=(503, 200))
    probe.page.goto(MOCK_ORIGIN + "/")
    status = probe.page.locator("#status [role=alert]")
    assert "busy" in status.text_content()
    status.locator("button.retry").click()
    probe.page.wait_for_function("() => document.getElementById('model-name').textContent === 'mock-model'")


def test_phone_layout_and_labels(make_page):
    probe = make_page(viewport={"width": 375, "height": 667})
    MockServer(probe.page, lambda ws, request, server: None)
    open_chat(probe.page, MOCK_ORIGIN)
    page = probe.page
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    for selector in ("#prompt", "#send", "#stop", "#new-chat", "#settings summary"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375 and box["y"] + box["height"] <= 667
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, textarea')]
        .filter(e => !e.labels || e.labels.length === 0).map(e => e.id)""")
    assert unlabeled == []
    page.focus("#new-chat")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "prompt"
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "send"


# ---------- the real server ----------

def test_streams_ottawa_then_second_turn_uses_history(make_page, server_url, tmp_path):
    probe = make_page()
    page = probe.page
    open_chat(page, server_url)
    set_settings(page, temperature="0", max_new_tokens="64")
    sent: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(payload)))
    page.evaluate(GROWTH_JS)
    first = ask(page, "What is the capital of Canada?")
    wait_finished(page, first)
    assert page.locator(ANSWER).nth(0).get_attribute("data-state") == "done"
    assert "Ottawa" in answer_text(page, first)
    lengths = page.evaluate("() => window.__lengths")
    assert len([n for n in lengths if n > 0]) >= 3, f"answer did not stream: {lengths}"
    assert lengths == sorted(lengths)
    meta = page.locator(ANSWER).nth(0).locator(".meta").text_content()
    assert re.search(r"TTFT \d+ ms", meta) and "≈" in meta and "tokens/s" in meta

    second = ask(page, "What country is that city in?")
    wait_finished(page, second)
    assert page.locator(ANSWER).nth(1).get_attribute("data-state") == "done"
    assert "Canada" in answer_text(page, second)
    # One session: the second message carries only the new prompt; the server kept the history.
    assert [json.loads(frame)["prompt"] for frame in sent] == [
        "What is the capital of Canada?", "What country is that city in?"]
    assert "history" not in json.loads(sent[1])
    assert probe.console_errors == []
    shot = tmp_path / "webui.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")


def test_stop_frees_the_request(make_page, server_url):
    page = make_page().page
    open_chat(page, server_url)
    set_settings(page, temperature="0.7", max_new_tokens="512")
    story = ask(page, "Write a long story about a dragon")
    page.wait_for_function("() => document.querySelector('#transcript .msg.assistant .body').textContent.length > 20")
    tokens_at_stop = counted_tokens(page, story)
    page.click("#stop")
    answer = wait_finished(page, story, timeout_ms=60_000)
    assert answer.get_attribute("data-state") == "stopped"
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    stopped_text = answer_text(page, story)
    page.wait_for_timeout(1500)
    assert answer_text(page, story) == stopped_text, "text kept growing after Stop"
    # The server aborted the round: only the few tokens already in flight arrived after Stop.
    assert counted_tokens(page, story) - tokens_at_stop < 32
    set_settings(page, temperature="0", max_new_tokens="16")
    follow_up = ask(page, "What is the capital of Canada?")
    # The session answers the next round (it would queue behind an unreleased 512-token story).
    assert wait_finished(page, follow_up, timeout_ms=120_000).get_attribute("data-state") == "done"
    assert "Ottawa" in answer_text(page, follow_up)


def test_token_prompt(make_page, token_server):
    base_url, token = token_server
    probe = make_page()
    page = probe.page
    page.goto(base_url + "/")
    page.wait_for_selector("#token-dialog[open]")
    page.fill("#token-input", token + "-wrong")
    page.press("#token-input", "Enter")
    page.wait_for_function("() => /wrong token/i.test(document.getElementById('token-error').textContent)")
    assert page.is_visible("#token-dialog")
    page.fill("#token-input", token)
    page.click("#token-submit")
    page.wait_for_selector("#token-dialog:not([open])", state="attached")
    page.wait_for_function("() => document.getElementById('model-name').textContent !== 'connecting…'")
    set_settings(page, temperature="0", max_new_tokens="32")
    index = ask(page, "What is the capital of Canada?")
    assert wait_finished(page, index).get_attribute("data-state") == "done"
    assert "Ottawa" in answer_text(page, index)
    assert all(token not in url for url in probe.urls), "the token leaked into a URL"
    assert page.evaluate("() => sessionStorage.getItem('berth.token')") == token
    assert page.evaluate("() => localStorage.length") == 0


def test_html_in_prompt_and_answer_stays_text(make_page, server_url):
    probe = make_page()
    page = probe.page
    open_chat(page, server_url)
    set_settings(page, temperature="0", max_new_tokens="32")
    index = ask(page, "Repeat exactly: <img src=x onerror=alert(1)>")
    wait_finished(page, index)
    assert page.locator("#transcript img").count() == 0
    assert "<img src=x onerror=alert(1)>" in page.locator("#transcript .msg.user .body").text_content()
    assert probe.dialogs == []
