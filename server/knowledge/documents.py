"""Text out of a source file, chosen by the file name's extension.

Decisions: bytes are decoded as UTF-8 with replacement characters (a BOM is dropped); HTML's own
charset declaration is not consulted. A `.json` file is an object with a "text" (or "content") string,
or a list of such objects; a `.jsonl` file has one such object per line. Either way one file is one
document: its texts are joined with blank lines, so removing the file's name removes all of it.
Every failure is a KnowledgeError whose message starts with the file name.
"""
from __future__ import annotations

import io
import json
import re
from html.parser import HTMLParser
from pathlib import PurePath

from server.knowledge.types import KnowledgeError

MAX_SOURCE_BYTES = 32 << 20
MAX_TEXT_CHARS = 32 << 20   # after extraction: a small PDF can expand into a lot of text

_SKIPPED_TAGS = {"script", "style", "noscript", "template"}
_BLOCK_TAGS = {"address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figcaption",
               "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main",
               "nav", "ol", "p", "pre", "section", "table", "td", "th", "title", "tr", "ul"}


def extract_text(name: str, data: bytes) -> str:
    """The document's plain text; raises KnowledgeError if the file is too big, unsupported, unreadable or empty."""
    if len(data) > MAX_SOURCE_BYTES:
        raise KnowledgeError(f"{name}: {len(data)} bytes is over the {MAX_SOURCE_BYTES >> 20} MiB limit")
    suffix = PurePath(name).suffix.lower()
    extractor = _EXTRACTORS.get(suffix)
    if extractor is None:
        supported = " ".join(sorted(_EXTRACTORS))
        raise KnowledgeError(f"{name}: unsupported file type {suffix or '(no extension)'!r}; supported: {supported}")
    text = clean_text(extractor(name, data))
    if not text.strip():
        raise KnowledgeError(f"{name}: no text found")
    if len(text) > MAX_TEXT_CHARS:
        raise KnowledgeError(f"{name}: the extracted text is over the {MAX_TEXT_CHARS >> 20} Mi characters limit")
    return text


def clean_text(text: str) -> str:
    """Newlines as \\n, no NULs (PostgreSQL text cannot hold them), no lone surrogates (not valid UTF-8)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return text.encode("utf-8", "replace").decode("utf-8")


def decode_text(data: bytes) -> str:
    return data.decode("utf-8-sig", errors="replace")


def _plain(name: str, data: bytes) -> str:
    return decode_text(data)


def _html(name: str, data: bytes) -> str:
    parser = _TextParser()
    parser.feed(decode_text(data))
    parser.close()
    return parser.text()


def _pdf(name: str, data: bytes) -> str:
    import pypdf   # only PDF indexing pays for importing it

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise KnowledgeError(f"{name}: the PDF is encrypted")
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except KnowledgeError:
        raise
    except Exception as e:   # NOTE: pypdf raises many types on corrupt input (PdfReadError, ValueError, KeyError...)
        raise KnowledgeError(f"{name}: not a readable PDF ({type(e).__name__})") from None


def _json(name: str, data: bytes) -> str:
    value = _load_json(name, decode_text(data))
    items = value if isinstance(value, list) else [value]
    if not items:
        raise KnowledgeError(f"{name}: an empty JSON list")
    return "\n\n".join(_record_text(name, item, f"item {i}") for i, item in enumerate(items))


def _jsonl(name: str, data: bytes) -> str:
    texts = []
    for number, line in enumerate(decode_text(data).splitlines(), 1):
        if line.strip():
            texts.append(_record_text(name, _load_json(name, line, f"line {number}"), f"line {number}"))
    return "\n\n".join(texts)


def _load_json(name: str, text: str, where: str = "") -> object:
    try:
        return json.loads(text)
    except ValueError as e:
        at = f" at {where}" if where else ""
        raise KnowledgeError(f"{name}: invalid JSON{at} ({e.msg})") from None


def _record_text(name: str, record: object, where: str) -> str:
    if isinstance(record, dict):
        for key in ("text", "content"):
            if isinstance(record.get(key), str):
                return record[key]
    raise KnowledgeError(f'{name}: {where} is not an object with a "text" or "content" string')


class _TextParser(HTMLParser):
    """Visible text: script/style dropped, block elements become line breaks, runs of spaces collapsed."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.num_skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIPPED_TAGS:
            self.num_skipping += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_startendtag(self, tag, attrs):
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in _SKIPPED_TAGS:
            self.num_skipping = max(0, self.num_skipping - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.num_skipping:
            self.parts.append(data)

    def text(self) -> str:
        lines = (re.sub(r"[ \t\f\v\u00a0]+", " ", line).strip() for line in "".join(self.parts).split("\n"))
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_EXTRACTORS = {".txt": _plain, ".md": _plain, ".markdown": _plain, ".html": _html, ".htm": _html,
               ".pdf": _pdf, ".json": _json, ".jsonl": _jsonl}
