"""Turn uploaded bytes into structured text; the content, not the file name, picks the parser."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import unicodedata
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

PDF_MIME = "application/pdf"
DOCX_MIME = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
HTML_MIME = "text/html"
MARKDOWN_MIME = "text/markdown"
TEXT_MIME = "text/plain"
ZIP_MIME = "application/zip"
BINARY_MIME = "application/octet-stream"

SUPPORTED_MIME_TYPES: frozenset[str] = frozenset(
    {PDF_MIME, DOCX_MIME, HTML_MIME, MARKDOWN_MIME, TEXT_MIME, ZIP_MIME}
)
# Archives are expanded by kb.ingestion.archives.extract_archive; parse_document parses documents.
ARCHIVE_MIME_TYPES: frozenset[str] = frozenset({ZIP_MIME})
BLOCK_KINDS: frozenset[str] = frozenset({"heading", "paragraph", "code", "table_row", "list_item"})

# How many leading bytes sniff_mime_type needs to see; callers may pass more.
SNIFF_BYTES = 8192


logger = logging.getLogger(__name__)


class ParseError(Exception):
    """Readable reason a file could not be parsed (shown to editors)."""


class ParserUnavailableError(ParseError):
    """The server could not run a parser; the file may be fine, so Retry can succeed later."""


@dataclass(frozen=True)
class ParseLimits:
    """Resource limits for one parse; defaults suit an editor uploading office documents."""

    max_file_bytes: int = 50 * 1024 * 1024
    max_pdf_pages: int = 2000
    parse_timeout_seconds: float = 120.0
    # Address space of the PDF extraction child; pypdf inflates streams in memory.
    max_parse_memory_bytes: int = 1024 * 1024 * 1024
    # A DOCX is a zip: python-docx inflates every part in memory, so cap what it may inflate.
    max_uncompressed_bytes: int = 200 * 1024 * 1024


@dataclass(frozen=True)
class Block:
    """One structural unit of a document: exactly ParsedDocument.text[char_start:char_end]."""

    text: str
    kind: str  # "heading" | "paragraph" | "code" | "table_row" | "list_item"
    heading_path: tuple[str, ...]  # headings above this block, outermost first
    page: int | None  # 1-based page for PDFs, else None
    char_start: int
    char_end: int
    level: int | None = None  # heading level (1 = outermost) for heading blocks


@dataclass(frozen=True)
class ParsedDocument:
    """The extracted text of one file plus its blocks, which are slices of that text."""

    title: str
    text: str  # blocks joined by blank lines
    blocks: tuple[Block, ...]
    mime_type: str
    metadata: dict[str, Any] = field(default_factory=dict)


_LABELS = {
    PDF_MIME: "PDF",
    DOCX_MIME: "Word document (DOCX)",
    HTML_MIME: "HTML page",
    MARKDOWN_MIME: "Markdown",
    TEXT_MIME: "plain text",
    ZIP_MIME: "zip archive",
    BINARY_MIME: "binary data of unknown type",
    "application/msword": "legacy Word document (.doc)",
    "application/vnd.ms-excel": "legacy Excel workbook (.xls)",
    "application/vnd.ms-powerpoint": "legacy PowerPoint file (.ppt)",
    "application/x-ole-storage": "legacy Microsoft Office file",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "Excel workbook (XLSX)",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation":
        "PowerPoint file (PPTX)",
    "application/vnd.oasis.opendocument.text": "OpenDocument text (ODT)",
    "application/epub+zip": "EPUB e-book",
    "application/rtf": "RTF document",
    "application/postscript": "PostScript file",
    "application/gzip": "gzip archive",
    "application/x-bzip2": "bzip2 archive",
    "application/x-xz": "xz archive",
    "application/x-7z-compressed": "7-Zip archive",
    "application/vnd.rar": "RAR archive",
    "application/x-tar": "tar archive",
    "application/x-executable": "executable program",
    "application/vnd.sqlite3": "SQLite database",
    "image/png": "PNG image",
    "image/jpeg": "JPEG image",
    "image/gif": "GIF image",
    "image/webp": "WebP image",
    "image/tiff": "TIFF image",
    "video/mp4": "MP4 video",
}

_EXTENSION_TYPES = {
    ".pdf": PDF_MIME,
    ".docx": DOCX_MIME,
    ".html": HTML_MIME,
    ".htm": HTML_MIME,
    ".xhtml": HTML_MIME,
    ".md": MARKDOWN_MIME,
    ".markdown": MARKDOWN_MIME,
    ".mdown": MARKDOWN_MIME,
    ".mkd": MARKDOWN_MIME,
    ".mkdn": MARKDOWN_MIME,
    ".txt": TEXT_MIME,
    ".text": TEXT_MIME,
    ".log": TEXT_MIME,
    ".rst": TEXT_MIME,
    ".csv": TEXT_MIME,
    ".zip": ZIP_MIME,
    ".doc": "application/msword",
    ".xls": "application/vnd.ms-excel",
    ".ppt": "application/vnd.ms-powerpoint",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ".odt": "application/vnd.oasis.opendocument.text",
    ".epub": "application/epub+zip",
}

# Formats whose extension promises binary structure; text with such a name is suspicious.
_BINARY_CONTAINERS = frozenset({PDF_MIME, DOCX_MIME})

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"{\\rtf", "application/rtf"),
    (b"%!PS", "application/postscript"),
    (b"\x1f\x8b", "application/gzip"),
    (b"\xfd7zXZ\x00", "application/x-xz"),
    (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (b"Rar!\x1a\x07", "application/vnd.rar"),
    (b"\x7fELF", "application/x-executable"),
    (b"SQLite format 3\x00", "application/vnd.sqlite3"),
)
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_BOMS: tuple[tuple[bytes, str], ...] = (
    # UTF-32 first: its little-endian BOM starts with the UTF-16 one.
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


def _extension(filename: str) -> str:
    return PurePath(filename.replace("\\", "/")).suffix.lower()


def _stem(filename: str) -> str:
    name = PurePath(filename.replace("\\", "/")).name
    return PurePath(name).stem or name or "Untitled"


def _bom_encoding(head: bytes) -> str | None:
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    return None


def _utf16_without_bom(head: bytes) -> str | None:
    """Spot BOM-less UTF-16 by its NUL byte on one side of (mostly ASCII) characters."""
    sample = head[:4096]
    if len(sample) < 8:
        return None
    even, odd = sample[0::2], sample[1::2]
    if odd.count(0) > 0.4 * len(odd) and even.count(0) < 0.05 * len(even):
        return "utf-16-le"
    if even.count(0) > 0.4 * len(even) and odd.count(0) < 0.05 * len(odd):
        return "utf-16-be"
    return None


_CONTROL_BYTES = bytes(b for b in range(32) if b < 9 or b > 13)


def _looks_binary(head: bytes) -> bool:
    if _bom_encoding(head) or _utf16_without_bom(head):
        return False
    if b"\x00" in head:
        return True
    # Deleting the control bytes in C and comparing lengths counts them without a Python loop.
    controls = len(head) - len(head.translate(None, _CONTROL_BYTES))
    return controls > 0.1 * max(1, len(head))


_HTML_STRONG = re.compile(
    rb"^\s*(?:<\?xml[^>]*>\s*)?(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html)[\s>]",
    re.IGNORECASE | re.DOTALL,
)
_HTML_WEAK = re.compile(
    rb"^\s*(?:<!--.*?-->\s*)*<(?:head|body|title|meta|script|style|div|p|table|h[1-6]|a|b|br|font|"
    rb"iframe)[\s/>]",
    re.IGNORECASE | re.DOTALL,
)


def _zip_subtype(head: bytes, ext_type: str | None) -> str:
    """Tell OOXML/ODF/EPUB apart from a plain zip using only the first local headers."""
    if head[30:38] == b"mimetype":
        declared = head[38:120].split(b"PK", 1)[0].decode("ascii", "replace").strip()
        if declared:
            return declared
    if b"word/" in head:
        return DOCX_MIME
    if b"xl/" in head:
        return "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    if b"ppt/" in head:
        return "application/vnd.openxmlformats-officedocument.presentationml.presentation"
    # The parts may lie beyond the head; trust a matching Office extension until the full
    # archive is checked in parse_document.
    if ext_type is not None and ext_type != ZIP_MIME and ext_type.startswith("application/vnd."):
        return ext_type
    return ZIP_MIME


def sniff_mime_type(*, filename: str, head: bytes) -> str:
    """Content type from magic bytes first, extension second (an extension that lies loses)."""
    ext_type = _EXTENSION_TYPES.get(_extension(filename))
    # Acrobat accepts the header anywhere in the first KiB, so junk before it is still a PDF.
    if b"%PDF-" in head[:1024]:
        return PDF_MIME
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip_subtype(head, ext_type)
    if head.startswith(_OLE_MAGIC):
        if ext_type in ("application/msword", "application/vnd.ms-excel",
                        "application/vnd.ms-powerpoint"):
            return ext_type
        return "application/x-ole-storage"
    for magic, mime in _MAGIC:
        if head.startswith(magic):
            return mime
    if head[4:8] == b"ftyp":
        return "video/mp4"
    if head[257:262] == b"ustar":
        return "application/x-tar"
    if head.startswith(b"BZh") and head[3:4].isdigit() and head[4:10] == b"1AY&SY":
        return "application/x-bzip2"
    if _looks_binary(head):
        return BINARY_MIME
    text_head = _head_as_ascii(head)
    if _HTML_STRONG.match(text_head):
        return HTML_MIME
    if ext_type == HTML_MIME:
        return HTML_MIME
    if ext_type == MARKDOWN_MIME:
        # READMEs often open with <p align="center">; only a full HTML document overrides .md.
        return MARKDOWN_MIME
    if _HTML_WEAK.match(text_head):
        return HTML_MIME
    return TEXT_MIME


def _head_as_ascii(head: bytes) -> bytes:
    """Drop BOMs and UTF-16 NULs so byte regexes can look for markup."""
    encoding = _bom_encoding(head) or _utf16_without_bom(head)
    if encoding and encoding.startswith(("utf-16", "utf-32")):
        try:
            return head.decode(encoding, "ignore").encode("ascii", "ignore")
        except LookupError:
            return head
    return head[3:] if head.startswith(b"\xef\xbb\xbf") else head


def _label(mime: str) -> str:
    return _LABELS.get(mime, mime)


def _supported_list() -> str:
    return "PDF, Word (DOCX), HTML, Markdown, plain text and zip archives"


# ---------------------------------------------------------------------------- text cleaning

_LINEBREAKS = str.maketrans({"\r": "\n", "\x0b": "\n", "\x0c": "\n", "\x85": "\n",
                             "\u2028": "\n", "\u2029": "\n"})
# C0/C1 controls except tab and newline, BOM/noncharacters, lone surrogates (they cannot be
# stored as UTF-8), and the soft hyphen, which is an invisible hyphenation hint.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u00ad\ufeff\ufffe\uffff\ud800-\udfff]")
_WS = re.compile(r"\s+")
_LIGATURES = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi",
                            "\ufb04": "ffl", "\ufb05": "st", "\ufb06": "st"})


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").translate(_LINEBREAKS)
    return unicodedata.normalize("NFC", _CONTROL.sub("", text))


def _prose(text: str) -> str:
    return _WS.sub(" ", _clean(text)).strip()


def _code(text: str) -> str:
    lines = [line.rstrip() for line in _clean(text).split("\n")]
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


class _Builder:
    """Accumulates blocks, tracks the heading stack and keeps offsets into the joined text."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._blocks: list[Block] = []
        self._length = 0
        self._stack: list[tuple[int, str]] = []

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(text for _, text in self._stack)

    @property
    def blocks(self) -> list[Block]:
        return self._blocks

    def heading(self, text: str, level: int, *, page: int | None = None, emit: bool = True) -> None:
        text = _prose(text)
        if not text:
            return
        while self._stack and self._stack[-1][0] >= level:
            self._stack.pop()
        if emit:
            self._append(text, "heading", page, level)
        self._stack.append((level, text))

    def add(self, text: str, kind: str, *, page: int | None = None) -> None:
        text = _code(text) if kind == "code" else _prose(text)
        if text:
            self._append(text, kind, page, None)

    def _append(self, text: str, kind: str, page: int | None, level: int | None) -> None:
        if self._parts:
            self._parts.append("\n\n")
            self._length += 2
        start = self._length
        self._parts.append(text)
        self._length += len(text)
        self._blocks.append(Block(text=text, kind=kind, heading_path=self.path, page=page,
                                  char_start=start, char_end=self._length, level=level))

    def first_heading(self, level: int | None = None) -> str:
        for block in self._blocks:
            if block.kind == "heading" and (level is None or block.level == level):
                return block.text
        return ""

    def build(self, *, title: str, mime_type: str, metadata: dict[str, Any]) -> ParsedDocument:
        return ParsedDocument(title=_prose(title)[:500], text="".join(self._parts),
                              blocks=tuple(self._blocks), mime_type=mime_type, metadata=metadata)


# ---------------------------------------------------------------------------- text decoding

_CHARSET_IN_HTML = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""",
                              re.IGNORECASE)


_NON_ASCII = re.compile("[^\x00-\x7f]")
# Bytes where cp1252 has printable characters (curly quotes, euro) but latin-1 has controls.
_C1_BYTES = re.compile(b"[\x80-\x9f]")


def _decode(name: str, data: bytes, *, declared: str | None = None) -> tuple[str, str]:
    """Decode text bytes and name the encoding; ParseError if they are not text."""
    encoding = _bom_encoding(data) or _utf16_without_bom(data[:4096])
    if encoding:
        try:
            return _checked_text(name, data.decode(encoding)), encoding.replace("-sig", "")
        except UnicodeDecodeError as exc:
            raise ParseError(f"{name} is not text: it is not valid {encoding}.") from exc
    if b"\x00" in data:
        raise ParseError(f"{name} is not text: it contains binary data.")
    try:
        return _checked_text(name, data.decode("utf-8")), "utf-8"
    except UnicodeDecodeError:
        pass
    # Mostly-valid UTF-8 with a stray byte (a bad copy-paste) is still UTF-8, not cp1252
    # mojibake; legacy 8-bit text fails on nearly every non-ASCII byte instead.
    sample = data[:1_000_000].decode("utf-8", errors="replace")
    errors = sample.count("\ufffd")
    if len(_NON_ASCII.findall(sample)) - errors >= 10 * errors:
        return _checked_text(name, data.decode("utf-8", errors="replace")), "utf-8"
    if declared:
        try:
            return _checked_text(name, data.decode(declared)), declared.lower()
        except (LookupError, UnicodeDecodeError):
            pass
    from charset_normalizer import from_bytes
    from charset_normalizer.md import mess_ratio

    # charset-normalizer breaks ties between Western code pages arbitrarily (French in latin-1
    # comes back as cp1250), so try the commonest legacy encoding first and keep it when the
    # result reads cleanly; wrong guesses (Cyrillic, Greek, Polish) score a mess ratio near 1.
    try:
        western = data.decode("cp1252")
    except UnicodeDecodeError:
        western = None
    if western is not None and mess_ratio(western[:65536], 1.0) < 0.15:
        has_c1 = _C1_BYTES.search(data) is not None
        return _checked_text(name, western), "cp1252" if has_c1 else "latin-1"
    best = from_bytes(data).best()
    if best is None:
        raise ParseError(f"{name} is not text: its bytes do not decode in any known encoding.")
    return _checked_text(name, str(best)), best.encoding


def _checked_text(name: str, text: str) -> str:
    sample = text[:65536]
    bad = sum(1 for ch in sample if (ch < " " and ch not in "\t\n\r\f") or ch == "\ufffd")
    if bad > max(8, 0.02 * len(sample)):  # a few stray controls in a short file are noise
        raise ParseError(f"{name} is not text: it is full of control characters (binary data?).")
    return text


# ---------------------------------------------------------------------------- plain text

_BLANK_LINE = re.compile(r"\n[ \t]*\n+")


def _parse_text(name: str, data: bytes, limits: ParseLimits) -> ParsedDocument:
    text, encoding = _decode(name, data)
    builder = _Builder()
    for paragraph in _BLANK_LINE.split(_clean(text)):
        builder.add(paragraph, "paragraph")
    return builder.build(title=_stem(name), mime_type=TEXT_MIME, metadata={"encoding": encoding})


# ---------------------------------------------------------------------------- markdown

_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?\n)(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.DOTALL)
_FM_TITLE = re.compile(r"""^title\s*:\s*(?:"([^"\n]*)"|'([^'\n]*)'|([^\n#]*))""", re.MULTILINE)


def _inline_text(token: Any) -> str:
    parts: list[str] = []
    for child in token.children or ():
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
        elif child.type == "image":
            parts.append(child.content)  # alt text
    return "".join(parts)


def _html_fragment_text(fragment: str) -> str:
    from bs4 import BeautifulSoup, XMLParsedAsHTMLWarning

    # Markdown's inline HTML, which may look like XML too (as in _parse_html).
    _xml_parsed_as_html_ignore(XMLParsedAsHTMLWarning)
    return BeautifulSoup(fragment, "lxml").get_text(" ")


def _table_row_text(header: list[str], cells: list[str]) -> str:
    # Each row carries its column names so a row retrieved on its own still makes sense.
    if header and len(header) == len(cells):
        return " | ".join(f"{h}: {c}" if h else c
                          for h, c in zip(header, cells, strict=True) if c or h)
    return " | ".join(cells)


def _parse_markdown(name: str, data: bytes, limits: ParseLimits) -> ParsedDocument:
    from markdown_it import MarkdownIt

    source, encoding = _decode(name, data)
    source = _clean(source)
    front_title = ""
    match = _FRONT_MATTER.match(source)
    if match:
        title_match = _FM_TITLE.search(match.group(1))
        if title_match:
            front_title = next(g for g in title_match.groups() if g is not None).strip()
        source = source[match.end():]
    md = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    tokens = md.parse(source)
    builder = _Builder()
    containers: list[str] = []
    header: list[str] = []
    row: list[str] = []
    table_has_body = False
    for index, token in enumerate(tokens):
        kind = token.type
        if kind == "heading_open":
            builder.heading(_inline_text(tokens[index + 1]), int(token.tag[1:]))
        elif kind == "inline" and tokens[index - 1].type == "paragraph_open":
            builder.add(_inline_text(token),
                        "list_item" if "list_item" in containers else "paragraph")
        elif kind in ("fence", "code_block"):
            builder.add(token.content, "code")
        elif kind == "html_block":
            builder.add(_html_fragment_text(token.content), "paragraph")
        elif kind.endswith("_open") and kind in ("list_item_open", "blockquote_open"):
            containers.append(kind[: -len("_open")])
        elif kind in ("list_item_close", "blockquote_close") and containers:
            containers.pop()
        elif kind == "table_open":
            header, table_has_body = [], False
        elif kind == "tr_open":
            row = []
        elif kind == "inline" and tokens[index - 1].type in ("th_open", "td_open"):
            row.append(_prose(_inline_text(token)))
        elif kind == "tr_close":
            if tokens[index - 1].type == "th_close" and not header and not table_has_body:
                header = row
            else:
                table_has_body = True
                builder.add(_table_row_text(header, row), "table_row")
        elif kind == "table_close" and not table_has_body and header:
            builder.add(" | ".join(header), "table_row")
    title = front_title or builder.first_heading(1) or _stem(name)
    metadata: dict[str, Any] = {"encoding": encoding}
    if front_title:
        metadata["front_matter_title"] = front_title
    return builder.build(title=title, mime_type=MARKDOWN_MIME, metadata=metadata)


# ---------------------------------------------------------------------------- HTML

_BOILERPLATE_TAGS = ("script", "style", "noscript", "template", "iframe", "svg", "canvas", "nav",
                     "footer", "aside", "form", "button", "select", "textarea", "object", "embed",
                     "dialog")
_BOILERPLATE_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search", "dialog"}
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.IGNORECASE)
# Real pages nest a few dozen levels; far deeper trees are hostile and would exhaust the
# recursion of the structural walk and of the extractors, so they are read as flat text.
_MAX_HTML_DEPTH = 400
_BLOCK_TAGS = {"address", "article", "aside", "blockquote", "body", "dd", "details", "div", "dl",
               "dt", "fieldset", "figcaption", "figure", "footer", "header", "hr", "li", "main",
               "nav", "ol", "p", "pre", "section", "table", "tbody", "thead", "tfoot", "tr", "td",
               "th", "ul", "h1", "h2", "h3", "h4", "h5", "h6", "summary", "caption", "html"}


def _html_title(soup: Any) -> str:
    if soup.title and soup.title.get_text(strip=True):
        return str(soup.title.get_text(" ", strip=True))
    og = soup.find("meta", attrs={"property": "og:title"})
    if og and og.get("content", "").strip():
        return str(og["content"])
    h1 = soup.find("h1")
    return str(h1.get_text(" ", strip=True)) if h1 else ""


def _is_boilerplate(tag: Any, in_main: bool, page_has_main: bool) -> bool:
    name = (tag.name or "").lower()
    if name in _BOILERPLATE_TAGS:
        return True
    if name == "header" and not in_main:
        # A header inside the article holds its title; the page-wide one holds logo and menu.
        # Pages without <main>/<article> often put their only h1 in <header>, so keep that one.
        return page_has_main or tag.find(["h1", "h2"]) is None
    attrs = tag.attrs or {}
    return (attrs.get("role") in _BOILERPLATE_ROLES or "hidden" in attrs
            or attrs.get("aria-hidden") == "true"
            or bool(_HIDDEN_STYLE.search(str(attrs.get("style") or ""))))


def _strip_boilerplate(soup: Any) -> int:
    """Remove the page furniture that semantic HTML marks as such; return the tree depth."""
    from bs4 import Tag

    page_has_main = soup.find(["article", "main"]) is not None
    doomed = []
    depth = 0
    # Iterative on purpose: hostile pages nest tens of thousands of elements deep.
    stack = [(soup, False, 0)]
    while stack:
        node, in_main, level = stack.pop()
        depth = max(depth, level)
        for child in node.children:
            if not isinstance(child, Tag):
                continue
            if _is_boilerplate(child, in_main, page_has_main):
                doomed.append(child)
            else:
                stack.append((child, in_main or child.name in ("article", "main"), level + 1))
    for tag in doomed:
        tag.decompose()
    return depth


def _flat_html(soup: Any, builder: _Builder) -> None:
    """Paragraphs from the page's text lines, for trees too deep to walk."""
    for line in soup.get_text("\n").split("\n"):
        builder.add(line, "paragraph")


def _html_text(tag: Any) -> str:
    """Text of an element; block children and <br> separate words, inline tags do not."""
    from bs4 import NavigableString, Tag
    from bs4.element import Comment, Doctype, ProcessingInstruction

    parts = []
    for node in tag.descendants:
        if isinstance(node, NavigableString):
            if not isinstance(node, (Comment, Doctype, ProcessingInstruction)):
                parts.append(str(node))
        elif isinstance(node, Tag) and (node.name in _BLOCK_TAGS or node.name == "br"):
            parts.append(" ")
    return "".join(parts)


def _walk_html(node: Any, builder: _Builder) -> None:
    """Structural fallback: headings, pre, list items and table rows from the cleaned DOM."""
    from bs4 import NavigableString, Tag
    from bs4.element import Comment, Doctype, ProcessingInstruction

    inline: list[str] = []

    def flush() -> None:
        if inline:
            builder.add("".join(inline), "paragraph")
            inline.clear()

    for child in node.children:
        if isinstance(child, (Comment, Doctype, ProcessingInstruction)):
            continue
        if isinstance(child, NavigableString):
            inline.append(str(child))
            continue
        if not isinstance(child, Tag):
            continue
        name = child.name.lower() if child.name else ""
        if name in ("h1", "h2", "h3", "h4", "h5", "h6"):
            flush()
            builder.heading(_html_text(child), int(name[1]))
        elif name == "pre":
            flush()
            builder.add(child.get_text(), "code")
        elif name == "li":
            flush()
            nested = [n.extract() for n in child.find_all(["ul", "ol", "table", "pre"])]
            builder.add(_html_text(child), "list_item")
            for sub in nested:
                _walk_html_container(sub, builder)
        elif name == "table":
            flush()
            _html_table(child, builder)
        elif name == "br":
            inline.append(" ")
        elif name == "p":
            flush()
            builder.add(_html_text(child), "paragraph")
        elif name in _BLOCK_TAGS or name == "head":
            flush()
            if name != "head":
                _walk_html(child, builder)
        else:
            inline.append(_html_text(child))
    flush()


def _walk_html_container(node: Any, builder: _Builder) -> None:
    if node.name == "table":
        _html_table(node, builder)
    elif node.name == "pre":
        builder.add(node.get_text(), "code")
    else:
        _walk_html(node, builder)


def _html_table(table: Any, builder: _Builder) -> None:
    header: list[str] = []
    emitted = False
    for tr in table.find_all("tr"):
        if tr.find_parent("table") is not table:
            continue  # nested tables are read with their own rows
        cells = tr.find_all(["th", "td"], recursive=False)
        texts = [_prose(_html_text(cell)) for cell in cells]
        if not any(texts):
            continue
        if cells and all(cell.name == "th" for cell in cells) and not header:
            header = texts
            continue
        builder.add(_table_row_text(header, texts), "table_row")
        emitted = True
    if header and not emitted:
        builder.add(" | ".join(header), "table_row")


def _xml_text(element: Any) -> str:
    """Text of a trafilatura XML element; <lb/> becomes a space so words do not fuse."""
    parts = [element.text or ""]
    for child in element:
        parts.append(" " if child.tag == "lb" else _xml_text(child))
        parts.append(child.tail or "")
    return "".join(parts)


def _walk_trafilatura(element: Any, builder: _Builder) -> None:
    for child in element:
        tag = child.tag
        if tag == "head":
            rend = child.get("rend") or "h2"
            level = int(rend[1]) if re.fullmatch(r"h[1-6]", rend) else 2
            builder.heading(_xml_text(child), level)
        elif tag == "code":
            builder.add(_xml_text(child), "code")
        elif tag == "list":
            for item in child:
                if item.tag != "item":
                    continue
                nested = [sub for sub in item if sub.tag in ("list", "table", "code")]
                for sub in nested:
                    item.remove(sub)
                builder.add(_xml_text(item), "list_item")
                _walk_trafilatura(nested, builder)
        elif tag == "table":
            header: list[str] = []
            emitted = False
            for row in child.iter("row"):
                cells = [_prose(_xml_text(cell)) for cell in row if cell.tag == "cell"]
                if not any(cells):
                    continue
                if not header and not emitted and all(
                        cell.get("role") == "head" for cell in row if cell.tag == "cell"):
                    header = cells
                    continue
                builder.add(_table_row_text(header, cells), "table_row")
                emitted = True
            if header and not emitted:
                builder.add(" | ".join(header), "table_row")
        elif tag in ("p", "quote", "item"):
            builder.add(_xml_text(child), "paragraph")
        elif tag in ("main", "div", "doc"):
            _walk_trafilatura(child, builder)


def _trafilatura_builder(html: str) -> _Builder | None:
    from lxml import etree

    try:
        # Imported lazily and guarded: trafilatura needs lxml_html_clean, and a missing extra
        # should degrade to the structural walk rather than break every HTML upload.
        import trafilatura

        xml = trafilatura.extract(html, output_format="xml", include_comments=False,
                                  include_tables=True, include_formatting=False,
                                  include_links=False, include_images=False, deduplicate=False)
    except Exception:
        return None  # an extractor bug must fall back to the structural walk, not fail the upload
    if not xml:
        return None
    root = etree.fromstring(xml.encode("utf-8"))
    builder = _Builder()
    main = root.find("main")
    _walk_trafilatura(main if main is not None else root, builder)
    return builder


def _xml_parsed_as_html_ignore(warning: type[Warning]) -> None:
    # An upload named .html is parsed as HTML even when it looks like XML (XHTML does):
    # that is the point, not something to warn about in the worker's log. One filter on
    # the class, added only when missing: catch_warnings would swap the process's filters
    # under other threads, each filterwarnings call resets every module's warning cache,
    # and whatever restores the filters (a catch_warnings block, pytest after each test)
    # may have removed it since.
    if not any(action == "ignore" and category is warning
               for action, _, category, _, _ in warnings.filters):
        warnings.filterwarnings("ignore", category=warning)


def _parse_html(name: str, data: bytes, limits: ParseLimits) -> ParsedDocument:
    from bs4 import BeautifulSoup, XMLParsedAsHTMLWarning

    declared = _CHARSET_IN_HTML.search(data[:4096])
    html, encoding = _decode(name, data,
                             declared=declared.group(1).decode("ascii") if declared else None)
    _xml_parsed_as_html_ignore(XMLParsedAsHTMLWarning)
    soup = BeautifulSoup(html, "lxml")
    title = _html_title(soup)
    if _strip_boilerplate(soup) > _MAX_HTML_DEPTH:
        builder = _Builder()
        _flat_html(soup, builder)
        return builder.build(title=title or _stem(name), mime_type=HTML_MIME,
                             metadata={"encoding": encoding, "extractor": "flat-text"})
    extracted = _trafilatura_builder(str(soup))
    fallback = _Builder()
    _walk_html(soup, fallback)  # after str(soup): the walk detaches nested lists
    # trafilatura's main extractor finds the article among non-semantic boilerplate, but on
    # short pages it falls back to a baseline that flattens everything into one paragraph;
    # then the structural walk of the already de-boilerplated DOM is the better reading.
    use_walk = extracted is None or not extracted.blocks or (
        len(extracted.blocks) == 1 and len(fallback.blocks) > 1
        and len(extracted.blocks[0].text) >= 0.8 * sum(len(b.text) for b in fallback.blocks))
    builder = fallback if use_walk or extracted is None else extracted
    title = title or builder.first_heading(1) or _stem(name)
    metadata: dict[str, Any] = {"encoding": encoding,
                                "extractor": "html-structure" if use_walk else "trafilatura"}
    return builder.build(title=title, mime_type=HTML_MIME, metadata=metadata)



# ---------------------------------------------------------------------------- DOCX

_HEADING_STYLE = re.compile(r"heading\s*([1-9])", re.IGNORECASE)


def _docx_style(paragraph: Any) -> tuple[str, int | None]:
    """Style name and heading level, following base styles so custom headings count."""
    try:
        style = paragraph.style
    except Exception:
        return "", None  # broken style references are common in converted files
    names = []
    for _ in range(4):
        if style is None:
            break
        names.append(style.name or "")
        style = style.base_style
    for style_name in names:
        if style_name.lower() == "title":
            return style_name, 0
        match = _HEADING_STYLE.fullmatch(style_name.strip())
        if match:
            return style_name, int(match.group(1))
    return (names[0] if names else ""), None


def _check_zip_expansion(name: str, data: bytes, limit: int, label: str) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except Exception as exc:  # zipfile raises NotImplementedError, ValueError... on damage
        raise ParseError(f"{name} is a damaged {label}: {exc}") from exc
    if sum(info.file_size for info in infos) > limit:
        raise ParseError(f"{name} expands to more than {_human_size(limit)}; "
                         f"it looks like a zip bomb, not a real {label}.")


def _parse_docx(name: str, data: bytes, limits: ParseLimits) -> ParsedDocument:
    import docx
    from docx.oxml.ns import qn
    from docx.table import Table

    _check_zip_expansion(name, data, limits.max_uncompressed_bytes, "Word document")
    document = docx.Document(io.BytesIO(data))
    builder = _Builder()
    for item in document.iter_inner_content():
        if isinstance(item, Table):
            for row in item.rows:
                cells, seen = [], set()
                for cell in row.cells:
                    # Merged cells come back once per grid column; keep one copy.
                    if id(cell._tc) in seen:
                        continue
                    seen.add(id(cell._tc))
                    cells.append(_prose(cell.text))
                if any(cells):
                    builder.add(" | ".join(cells), "table_row")
            continue
        style_name, level = _docx_style(item)
        text = item.text
        if level is not None:
            builder.heading(text, level)
            continue
        ppr = item._p.pPr
        is_list = style_name.lower().startswith("list") or (
            ppr is not None and ppr.find(qn("w:numPr")) is not None)
        builder.add(text, "list_item" if is_list else "paragraph")
    metadata: dict[str, Any] = {}
    core_title = ""
    try:
        core = document.core_properties
        core_title = (core.title or "").strip()
        if core.author:
            metadata["author"] = core.author
        for key in ("created", "modified"):
            value = getattr(core, key, None)
            if value is not None:
                metadata[key] = value.isoformat()
    except Exception:
        pass  # broken document properties should not lose the text
    title = core_title or builder.first_heading(0) or builder.first_heading() \
        or _stem(name)
    return builder.build(title=title, mime_type=DOCX_MIME, metadata=metadata)


# ---------------------------------------------------------------------------- PDF

_PAGE_NUMBER = re.compile(r"^(?:[Pp]age\s*)?[-–—]?\s*\d{1,4}\s*[-–—]?(?:\s*(?:of|/)\s*\d{1,4})?$"
                          r"|^x{0,3}(?:ix|iv|v?i{0,3})$|^X{0,3}(?:IX|IV|V?I{0,3})$")
_FILENAME_LIKE = re.compile(r"\.(?:docx?|pdf|odt|rtf|pptx?|xlsx?|indd|tex|dvi|html?)$", re.I)
_BULLET = re.compile(r"^[•▪◦●■–\-*]\s")
_SENTENCE_END = ('.', '!', '?', ':', ';', '"', '”', '’', ')', '…')


def _extract_pdf(data: bytes, max_pages: int) -> tuple[str, Any]:
    """Runs in the child process: raw page texts, outline and metadata, or an error message.

    MemoryError propagates, so the child can name the memory limit instead of the file."""
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                # Many PDFs are "encrypted" with an empty user password only to stop editing.
                if not reader.decrypt(""):
                    return "error", "it is password-protected; remove the password and upload again"
            except (DependencyError, NotImplementedError, FileNotDecryptedError):
                return "error", "it is password-protected or encrypted in a way we cannot read"
        page_count = len(reader.pages)
        if page_count > max_pages:
            return "error", f"it has {page_count} pages; the limit is {max_pages}"
        pages: list[str] = []
        failed: list[int] = []
        for number, page in enumerate(reader.pages, start=1):
            try:
                pages.append(page.extract_text() or "")
            except MemoryError:
                raise
            except Exception:  # one broken page should not cost the rest of the document
                pages.append("")
                failed.append(number)
        if pages and len(failed) == len(pages):
            return "error", "it is damaged: no page could be read"
        outline: list[tuple[int, str, int]] = []
        try:
            _collect_outline(reader, reader.outline, 0, outline)
        except Exception:
            outline = []  # a broken outline only loses heading paths
        meta: dict[str, str] = {}
        try:
            info = reader.metadata
            if info is not None:
                for key in ("title", "author", "subject"):
                    value = getattr(info, key, None)
                    if value:
                        meta[key] = str(value)
        except Exception:
            pass  # metadata is optional
        return "ok", {"pages": pages, "outline": outline, "meta": meta, "failed": failed}
    except FileNotDecryptedError:
        return "error", "it is password-protected; remove the password and upload again"
    except MemoryError:
        raise
    except Exception as exc:  # pypdf raises anything on hostile input
        detail = f"{type(exc).__name__}: {exc}"[:200]
        return "error", f"it is damaged or not a valid PDF ({detail})"


def _collect_outline(reader: Any, items: Any, depth: int,
                     out: list[tuple[int, str, int]]) -> None:
    for item in items:
        if len(out) >= 5000 or depth > 8:
            return
        if isinstance(item, list):
            _collect_outline(reader, item, depth + 1, out)
            continue
        page = reader.get_destination_page_number(item)
        title = _prose(str(getattr(item, "title", "") or ""))
        if title and page is not None and page >= 0:
            out.append((depth, title, page))


# The child is started as a fresh interpreter, not forked with multiprocessing: django-q's
# workers are daemonic multiprocessing processes, which may not have multiprocessing children,
# while a subprocess can be started (and killed) from any process, thread or event loop.
_PDF_CHILD_MODULE = "kb.ingestion.pdf_child"
# The directory holding the kb package, so the child imports this same code whatever its cwd.
_CODE_ROOT = str(Path(__file__).resolve().parents[2])


def _pdf_child_command(limits: ParseLimits) -> list[str]:
    cpu_seconds = int(limits.parse_timeout_seconds) + 5  # a backstop only; see pdf_child
    # -P: the current directory must not shadow the kb package or the standard library.
    return [sys.executable, "-P", "-m", _PDF_CHILD_MODULE, str(limits.max_pdf_pages),
            str(limits.max_parse_memory_bytes), str(cpu_seconds)]


def _server_failure(name: str, detail: str) -> ParserUnavailableError:
    logger.error("The PDF extraction child could not run for %s: %s", name, detail)
    return ParserUnavailableError(
        f"{name} was not read: the server could not run its PDF reader ({detail[:200]}). "
        "This is a problem on the server, not with the file; use Retry once it is fixed."
    )


def _run_pdf_extraction(name: str, data: bytes, limits: ParseLimits) -> dict[str, Any]:
    """Extract in a child interpreter so a pathological PDF can be killed at the deadline."""
    python_path = os.environ.get("PYTHONPATH")
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([_CODE_ROOT, python_path] if python_path else [_CODE_ROOT])}
    try:
        process = subprocess.Popen(_pdf_child_command(limits), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    except OSError as exc:
        raise _server_failure(name, f"{type(exc).__name__}: {exc}") from exc
    try:
        out, err = process.communicate(data, timeout=limits.parse_timeout_seconds)
    except subprocess.TimeoutExpired:
        raise ParseError(f"Reading {name} took longer than {limits.parse_timeout_seconds:g} s; "
                         "the PDF is too large or too complex.") from None
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    code = process.returncode
    if code == -signal.SIGXCPU:
        raise ParseError(f"Reading {name} took longer than {limits.parse_timeout_seconds:g} s; "
                         "the PDF is too large or too complex.")
    if code < 0:
        raise ParseError(f"The PDF reader crashed on {name}; the file is probably damaged.")
    if code != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        raise _server_failure(name, f"exit status {code}: {lines[-1] if lines else 'no output'}")
    try:
        status, payload = json.loads(out)
    except ValueError as exc:
        raise _server_failure(name, f"unreadable answer: {exc}") from exc
    if status != "ok":
        raise ParseError(f"{name} could not be read as a PDF: {payload}.")
    return payload


def _strip_running_lines(pages: list[list[str]]) -> None:
    """Drop page numbers and headers/footers repeated at the top or bottom of most pages."""
    def key(line: str) -> str:
        return re.sub(r"\d+", "#", line.lower())

    counts: dict[str, int] = {}
    if len(pages) >= 3:
        for lines in pages:
            for line in {key(lines[0]), key(lines[-1])} if lines else ():
                counts[line] = counts.get(line, 0) + 1
    threshold = max(3, len(pages) // 2)
    for lines in pages:
        for position in (0, -1):
            for _ in range(2):  # e.g. a footer line and a page number under it
                if lines and (_PAGE_NUMBER.match(lines[position])
                              or counts.get(key(lines[position]), 0) >= threshold):
                    lines.pop(position)
                else:
                    break


def _heading_like(line: str, full: int, lines: list[str], i: int) -> bool:
    """A short unpunctuated line followed by a capitalised one, e.g. "3. Routine checks"."""
    following = lines[i + 1] if i + 1 < len(lines) else ""
    return (bool(full) and len(line) < 0.6 * full and not line.endswith((*_SENTENCE_END, ","))
            and (line[:1].isupper() or line[:1].isdigit())
            and (not following or following[:1].isupper() or following[:1].isdigit()))


def _pdf_paragraphs(lines: list[str]) -> list[str]:
    """Re-flow extracted lines into paragraphs: short lines end them, hyphens re-join words."""
    lengths = sorted(len(line) for line in lines if line)
    full = lengths[int(len(lengths) * 0.9)] if len(lengths) >= 3 else 0
    paragraphs: list[str] = []
    current: list[str] = []  # pieces of the open paragraph, joined once it closes

    def close() -> None:
        if current:
            paragraphs.append("".join(current))
            current.clear()

    for i, line in enumerate(lines):
        if not line:
            close()
            continue
        last = current[-1] if current else ""
        if last.endswith("-") and len(last) > 1 and last[-2].isalpha() and line[:1].islower():
            current[-1] = last[:-1]  # "mainte-" + "nance": a typesetter's hyphen
            current.append(line)
        elif current and (_BULLET.match(line) or (
                last.endswith(_SENTENCE_END) and _heading_like(line, full, lines, i))):
            close()
            current.append(line)
        else:
            current.append(f" {line}" if current else line)
        following = lines[i + 1] if i + 1 < len(lines) else ""
        short = full and len(line) < 0.8 * full
        if short and following and not line.endswith("-") and (
                line.endswith(_SENTENCE_END) or following[:1].isupper()
                or following[:1].isdigit()):
            close()
    close()
    return paragraphs


def _outline_key(text: str) -> str:
    return re.sub(r"\W+", " ", text).strip().casefold()


def _parse_pdf(name: str, data: bytes, limits: ParseLimits) -> ParsedDocument:
    payload = _run_pdf_extraction(name, data, limits)
    raw_pages: list[str] = payload["pages"]
    pages = [[_prose(line.translate(_LIGATURES)) for line in _clean(text).split("\n")]
             for text in raw_pages]
    for lines in pages:
        while lines and not lines[0]:
            lines.pop(0)
        while lines and not lines[-1]:
            lines.pop()
    _strip_running_lines(pages)
    outline_by_page: dict[int, list[tuple[int, str]]] = {}
    for depth, title, page_index in payload["outline"]:
        outline_by_page.setdefault(page_index, []).append((depth + 1, title))
    builder = _Builder()
    alnum = 0
    for index, lines in enumerate(pages):
        page = index + 1
        paragraphs = _pdf_paragraphs(lines)
        alnum += sum(ch.isalnum() for paragraph in paragraphs for ch in paragraph)
        # Outline (bookmark) entries give the heading path. An entry whose title is a line on
        # its page becomes a heading block there; the others apply from the top of the page.
        pending = list(outline_by_page.get(index, ()))
        keys = [_outline_key(paragraph) for paragraph in paragraphs]
        matched = [entry for entry in pending if _outline_key(entry[1]) in keys]
        for level, title in pending:
            if (level, title) not in matched:
                builder.heading(title, level, page=page, emit=False)
        for paragraph, key in zip(paragraphs, keys, strict=True):
            hit = next((entry for entry in matched if key == _outline_key(entry[1])), None)
            if hit is None:
                builder.add(paragraph, "paragraph", page=page)
            else:
                matched.remove(hit)
                builder.heading(paragraph, hit[0], page=page)
    if alnum < 8 * max(1, len(pages)):
        raise ParseError(f"{name} has no extractable text: it looks like a scanned or image-only "
                         "PDF. Run it through OCR and upload the result.")
    meta = payload["meta"]
    title = meta.get("title", "").strip()
    if not title or title.lower() in ("untitled", "untitled document") or _FILENAME_LIKE.search(
            title):
        first = builder.blocks[0].text if builder.blocks else ""
        title = first if 0 < len(first) <= 150 else _stem(name)
    metadata: dict[str, Any] = {"pages": len(pages)}
    if meta.get("author"):
        metadata["author"] = meta["author"]
    if meta.get("subject"):
        metadata["subject"] = meta["subject"]
    empty = [i + 1 for i, lines in enumerate(pages) if not any(lines)]
    if empty:
        metadata["pages_without_text"] = empty
    if payload.get("failed"):
        metadata["unreadable_pages"] = payload["failed"]
    return builder.build(title=title, mime_type=PDF_MIME, metadata=metadata)


# ---------------------------------------------------------------------------- entry point

_PARSERS: dict[str, Callable[[str, bytes, ParseLimits], ParsedDocument]] = {
    PDF_MIME: _parse_pdf,
    DOCX_MIME: _parse_docx,
    HTML_MIME: _parse_html,
    MARKDOWN_MIME: _parse_markdown,
    TEXT_MIME: _parse_text,
}


def _refine_zip(name: str, data: bytes, sniffed: str) -> str:
    """Look inside a zip to tell a real DOCX from an archive or another Office format."""
    try:
        names = set(zipfile.ZipFile(io.BytesIO(data)).namelist())
    except Exception as exc:  # zipfile raises NotImplementedError, ValueError... on damage
        label = "Word document" if sniffed == DOCX_MIME else "zip archive"
        raise ParseError(f"{name} is a damaged {label}: {exc}") from exc
    if "word/document.xml" in names:
        return DOCX_MIME
    if sniffed == DOCX_MIME:
        return ZIP_MIME  # claimed to be Word but holds no Word document
    return sniffed


def parse_document(*, filename: str, data: bytes,
                   limits: ParseLimits = ParseLimits()) -> ParsedDocument:
    """Parse one uploaded file into blocks; every failure is a ParseError with a readable reason."""
    name = PurePath(filename.replace("\\", "/")).name or "file"
    if not data:
        raise ParseError(f"{name} is empty.")
    if len(data) > limits.max_file_bytes:
        raise ParseError(f"{name} is {_human_size(len(data))}; the limit is "
                         f"{_human_size(limits.max_file_bytes)}.")
    mime = sniff_mime_type(filename=name, head=data[:SNIFF_BYTES])
    if mime in (ZIP_MIME, DOCX_MIME):
        mime = _refine_zip(name, data, mime)
    claimed = _EXTENSION_TYPES.get(_extension(name))
    metadata_extra: dict[str, Any] = {}
    if claimed in _BINARY_CONTAINERS and mime != claimed:
        # Text (or another supported document) under a .pdf/.docx name is still readable, but an
        # HTML page (a saved login or error page), a bare zip or unknown bytes is a broken upload.
        if mime in (HTML_MIME, BINARY_MIME, ZIP_MIME) or mime not in SUPPORTED_MIME_TYPES:
            raise ParseError(f"{name}: the extension says {_label(claimed)} but the content is "
                             f"{_content_phrase(mime)}.")
        metadata_extra["claimed_type"] = claimed
    if mime == BINARY_MIME:
        raise ParseError(f"{name} is not text: it looks like binary data of an unknown type; "
                         f"supported types are {_supported_list()}.")
    if mime not in SUPPORTED_MIME_TYPES:
        raise ParseError(f"{name} is {_content_phrase(mime)}, which is not supported; supported "
                         f"types are {_supported_list()}.")
    if mime in ARCHIVE_MIME_TYPES:
        raise ParseError(f"{name} is a zip archive; its files are unpacked and parsed one by one, "
                         "not as a single document.")
    try:
        parsed = _PARSERS[mime](name, data, limits)
    except ParseError:
        raise
    except ImportError as exc:  # a broken install, whatever the file
        raise ParserUnavailableError(
            f"{name} was not read: the server's {_label(mime)} reader is not installed "
            f"correctly ({exc}). This is a problem on the server, not with the file; use Retry "
            "once it is fixed.") from exc
    except Exception as exc:  # third-party parsers raise anything on hostile input
        raise ParseError(f"{name} could not be read as {_label(mime)}: "
                         f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if not parsed.blocks:
        raise ParseError(f"{name} contains no text.")
    if metadata_extra:
        parsed.metadata.update(metadata_extra)
    return parsed


def _human_size(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MB"
    if size >= 1024:
        return f"{size / 1024:.1f} KB"
    return f"{size} bytes"


def _content_phrase(mime: str) -> str:
    label = _label(mime)
    if mime == HTML_MIME:
        return "an HTML page (often a saved login or error page)"
    article = "an" if label[:1].lower() in "aeiou" else "a"
    if mime == BINARY_MIME:
        return label
    return f"{article} {label}"
