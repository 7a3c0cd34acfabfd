"""Turn uploaded bytes into structured text; the content, not the file name, picks the parser.

parse_document checks the upload (size, what the content is against what the name claims)
and hands it to the parser of its format in kb.ingestion.formats.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePath
from typing import Any

from kb.ingestion.document import ParsedDocument, ParseError, ParseLimits, ParserUnavailableError
from kb.ingestion.formats.docx import parse_docx
from kb.ingestion.formats.html import parse_html
from kb.ingestion.formats.markdown import parse_markdown
from kb.ingestion.formats.pdf import parse_pdf
from kb.ingestion.formats.plain import parse_plain_text
from kb.ingestion.sniff import (
    ARCHIVE_MIME_TYPES,
    BINARY_MIME,
    DOCX_MIME,
    HTML_MIME,
    MARKDOWN_MIME,
    PDF_MIME,
    SNIFF_BYTES,
    SUPPORTED_MIME_TYPES,
    TEXT_MIME,
    ZIP_MIME,
    claimed_mime_type,
    mime_label,
    refine_zip_type,
    sniff_mime_type,
)
from kb.ingestion.text import human_size

_PARSERS: dict[str, Callable[[str, bytes, ParseLimits], ParsedDocument]] = {
    PDF_MIME: parse_pdf,
    DOCX_MIME: parse_docx,
    HTML_MIME: parse_html,
    MARKDOWN_MIME: parse_markdown,
    TEXT_MIME: parse_plain_text,
}

# A frozen dataclass, so one shared default instance is safe.
_DEFAULT_LIMITS = ParseLimits()
# Formats whose extension promises binary structure; text with such a name is suspicious.
_BINARY_CONTAINERS = frozenset({PDF_MIME, DOCX_MIME})


def _supported_list() -> str:
    return "PDF, Word (DOCX), HTML, Markdown, plain text and zip archives"


def _content_phrase(mime: str) -> str:
    label = mime_label(mime)
    if mime == HTML_MIME:
        return "an HTML page (often a saved login or error page)"
    article = "an" if label[:1].lower() in "aeiou" else "a"
    if mime == BINARY_MIME:
        return label
    return f"{article} {label}"


def _checked_type(name: str, data: bytes) -> tuple[str, dict[str, Any]]:
    """The format to parse data as, and metadata about a lying extension; else ParseError."""
    mime = sniff_mime_type(filename=name, head=data[:SNIFF_BYTES])
    if mime in (ZIP_MIME, DOCX_MIME):
        mime = refine_zip_type(name, data, mime)
    claimed = claimed_mime_type(name)
    metadata_extra: dict[str, Any] = {}
    if claimed in _BINARY_CONTAINERS and mime != claimed:
        # Text (or another supported document) under a .pdf/.docx name is still readable, but an
        # HTML page (a saved login or error page), a bare zip or unknown bytes is a broken upload.
        if mime in (HTML_MIME, BINARY_MIME, ZIP_MIME) or mime not in SUPPORTED_MIME_TYPES:
            raise ParseError(f"{name}: the extension says {mime_label(claimed)} but the content "
                             f"is {_content_phrase(mime)}.")
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
    return mime, metadata_extra


def parse_document(*, filename: str, data: bytes,
                   limits: ParseLimits = _DEFAULT_LIMITS) -> ParsedDocument:
    """Parse one uploaded file into blocks; every failure is a ParseError with a readable reason."""
    name = PurePath(filename.replace("\\", "/")).name or "file"
    if not data:
        raise ParseError(f"{name} is empty.")
    if len(data) > limits.max_file_bytes:
        raise ParseError(f"{name} is {human_size(len(data))}; the limit is "
                         f"{human_size(limits.max_file_bytes)}.")
    mime, metadata_extra = _checked_type(name, data)
    try:
        parsed = _PARSERS[mime](name, data, limits)
    except ParseError:
        raise
    except ImportError as exc:  # a broken install, whatever the file
        raise ParserUnavailableError(
            f"{name} was not read: the server's {mime_label(mime)} reader is not installed "
            f"correctly ({exc}). This is a problem on the server, not with the file; use Retry "
            "once it is fixed.") from exc
    except Exception as exc:  # third-party parsers raise anything on hostile input
        raise ParseError(f"{name} could not be read as {mime_label(mime)}: "
                         f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if not parsed.blocks:
        raise ParseError(f"{name} contains no text.")
    if metadata_extra:
        parsed.metadata.update(metadata_extra)
    return parsed
