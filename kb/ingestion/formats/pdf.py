"""PDFs: pypdf runs in a child interpreter (kb.ingestion.pdf_child) under a deadline and a
memory limit; here its page texts are re-flowed into paragraphs under the outline's headings."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from kb.ingestion.document import ParsedDocument, ParseError, ParseLimits, ParserUnavailableError
from kb.ingestion.sniff import PDF_MIME
from kb.ingestion.text import BlockBuilder, clean, prose, stem

logger = logging.getLogger(__name__)

_PAGE_NUMBER = re.compile(r"^(?:[Pp]age\s*)?[-–—]?\s*\d{1,4}\s*[-–—]?(?:\s*(?:of|/)\s*\d{1,4})?$"
                          r"|^x{0,3}(?:ix|iv|v?i{0,3})$|^X{0,3}(?:IX|IV|V?I{0,3})$")
_FILENAME_LIKE = re.compile(r"\.(?:docx?|pdf|odt|rtf|pptx?|xlsx?|indd|tex|dvi|html?)$", re.I)
_BULLET = re.compile(r"^[•▪◦●■–\-*]\s")
_SENTENCE_END = ('.', '!', '?', ':', ';', '"', '”', '’', ')', '…')
_LIGATURES = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi",
                            "\ufb04": "ffl", "\ufb05": "st", "\ufb06": "st"})


# The child is started as a fresh interpreter, not forked with multiprocessing: django-q's
# workers are daemonic multiprocessing processes, which may not have multiprocessing children,
# while a subprocess can be started (and killed) from any process, thread or event loop.
_PDF_CHILD_MODULE = "kb.ingestion.pdf_child"
# The directory holding the kb package, so the child imports this same code whatever its cwd.
_CODE_ROOT = str(Path(__file__).resolve().parents[3])


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


def _child_environment() -> dict[str, str]:
    """This process's environment with the code root first on PYTHONPATH.

    The web process, the django-q workers and `kb_ingest --sync` start from different
    directories and -P drops the current one, so the child finds kb only through this."""
    python_path = os.environ.get("PYTHONPATH")
    paths = [_CODE_ROOT, python_path] if python_path else [_CODE_ROOT]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _run_pdf_extraction(name: str, data: bytes, limits: ParseLimits) -> dict[str, Any]:
    """Extract in a child interpreter so a pathological PDF can be killed at the deadline."""
    try:
        process = subprocess.Popen(_pdf_child_command(limits), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=_child_environment())
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


def _page_lines(raw_pages: list[str]) -> list[list[str]]:
    """Each page's cleaned lines, without blank edges, page numbers and running headers."""
    pages = [[prose(line.translate(_LIGATURES)) for line in clean(text).split("\n")]
             for text in raw_pages]
    for lines in pages:
        while lines and not lines[0]:
            lines.pop(0)
        while lines and not lines[-1]:
            lines.pop()
    _strip_running_lines(pages)
    return pages


def _add_pages(pages: list[list[str]], outline: list[tuple[int, str, int]],
               builder: BlockBuilder) -> int:
    """Add every page's paragraphs under the outline's headings; return the alphanumerics."""
    outline_by_page: dict[int, list[tuple[int, str]]] = {}
    for depth, title, page_index in outline:
        outline_by_page.setdefault(page_index, []).append((depth + 1, title))
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
    return alnum


def _pdf_metadata(payload: dict[str, Any], pages: list[list[str]]) -> dict[str, Any]:
    meta = payload["meta"]
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
    return metadata


def parse_pdf(name: str, data: bytes, limits: ParseLimits) -> ParsedDocument:
    """Read in a killable child process; lines re-flow into paragraphs, bookmarks give headings."""
    payload = _run_pdf_extraction(name, data, limits)
    pages = _page_lines(payload["pages"])
    builder = BlockBuilder()
    alnum = _add_pages(pages, payload["outline"], builder)
    if alnum < 8 * max(1, len(pages)):
        raise ParseError(f"{name} has no extractable text: it looks like a scanned or image-only "
                         "PDF. Run it through OCR and upload the result.")
    title = payload["meta"].get("title", "").strip()
    if not title or title.lower() in ("untitled", "untitled document") or _FILENAME_LIKE.search(
            title):
        first = builder.blocks[0].text if builder.blocks else ""
        title = first if 0 < len(first) <= 150 else stem(name)
    return builder.build(title=title, mime_type=PDF_MIME, metadata=_pdf_metadata(payload, pages))
