"""Extraction: text out of txt, md, html, pdf, json and jsonl; every failure a KnowledgeError naming the file."""
from __future__ import annotations

import json

import pytest

from server.knowledge import KnowledgeError
from server.knowledge.documents import MAX_SOURCE_BYTES, extract_text


def minimal_pdf(lines: list[str]) -> bytes:
    """A one-page PDF written by hand: catalog, pages, page, Helvetica, one content stream; exact xref offsets."""
    text_ops = " ".join(f"({line}) Tj 0 -16 Td" for line in lines)
    stream = f"BT /F1 12 Tf 72 720 Td {text_ops} ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_txt_and_md_are_utf8_with_the_bom_dropped_and_bad_bytes_replaced():
    assert extract_text("a.txt", "\ufeffhello wörld".encode()) == "hello wörld"
    assert extract_text("a.md", b"# Title\r\nbad \xff byte") == "# Title\nbad \ufffd byte"
    assert extract_text("UPPER.TXT", b"case-insensitive extension") == "case-insensitive extension"


def test_html_drops_scripts_and_styles_and_breaks_blocks():
    html = (b"<html><head><title>T</title><style>p {color: red}</style><script>alert('x')</script></head>"
            b"<body><h1>Heading</h1><p>First   paragraph &amp; more.</p><div>Second<br>line</div>"
            b"<ul><li>one</li><li>two</li></ul><span>inline</span> text</body></html>")
    text = extract_text("page.html", html)
    assert "alert" not in text and "color" not in text
    assert text.splitlines() == ["T", "", "Heading", "", "First paragraph & more.", "", "Second", "line", "",
                                 "one", "", "two", "", "inline text"]
    assert extract_text("page.htm", b"<p>short</p>") == "short"


def test_pdf_text_comes_out_of_a_hand_written_pdf():
    text = extract_text("doc.pdf", minimal_pdf(["Hello from a PDF.", "Ottawa is the capital of Canada."]))
    assert "Hello from a PDF." in text and "Ottawa is the capital of Canada." in text


@pytest.mark.parametrize("data", [b"not a pdf at all", b"%PDF-1.4\n1 0 obj << >>\n", minimal_pdf(["x"])[:60], b""])
def test_corrupt_pdf_is_a_knowledge_error_naming_the_file(data):
    with pytest.raises(KnowledgeError, match=r"^bad\.pdf: "):
        extract_text("bad.pdf", data)


def test_json_object_list_and_content_field():
    assert extract_text("a.json", json.dumps({"text": "hello", "title": "t"}).encode()) == "hello"
    assert extract_text("b.json", json.dumps({"content": "from content"}).encode()) == "from content"
    records = [{"text": "one"}, {"content": "two"}]
    assert extract_text("c.json", json.dumps(records).encode()) == "one\n\ntwo"


def test_jsonl_is_one_document_with_blank_lines_between_records():
    data = b'{"text": "first"}\n\n{"content": "second"}\n{"text": "third", "id": 3}\n'
    assert extract_text("d.jsonl", data) == "first\n\nsecond\n\nthird"


@pytest.mark.parametrize("name, data, message", [
    ("a.json", b'{"title": "no text"}', r'a\.json: item 0 is not an object with a "text" or "content" string'),
    ("a.json", b'{"text": 42}', r"a\.json: item 0"),
    ("a.json", b"[]", r"a\.json: an empty JSON list"),
    ("a.json", b"{not json", r"a\.json: invalid JSON"),
    ("a.jsonl", b'{"text": "ok"}\n{"oops": 1}\n', r"a\.jsonl: line 2 is not an object"),
    ("a.jsonl", b'{"text": "ok"}\nnot json\n', r"a\.jsonl: invalid JSON at line 2"),
    ("tool.exe", b"MZ", r"tool\.exe: unsupported file type '\.exe'"),
    ("README", b"text", r"README: unsupported file type '\(no extension\)'"),
    ("empty.txt", b"", r"empty\.txt: no text found"),
    ("blank.md", b" \n\t\n", r"blank\.md: no text found"),
    ("empty.html", b"<script>only()</script>", r"empty\.html: no text found"),
])
def test_bad_sources_are_knowledge_errors_naming_the_file(name, data, message):
    with pytest.raises(KnowledgeError, match=message):
        extract_text(name, data)


def test_sources_over_the_size_limit_are_refused():
    with pytest.raises(KnowledgeError, match=r"big\.txt: .* over the 32 MiB limit"):
        extract_text("big.txt", b"a" * (MAX_SOURCE_BYTES + 1))


def test_nul_characters_and_lone_surrogates_are_cleaned():
    assert extract_text("a.txt", b"a\x00b") == "ab"
    assert extract_text("a.json", b'{"text": "bad \\ud800 surrogate"}') == "bad ? surrogate"
