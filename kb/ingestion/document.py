"""What parsing produces and how it fails: ParsedDocument, its Blocks, ParseLimits, ParseError.

Every module of kb.ingestion shares these types, so they live below all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BLOCK_KINDS: frozenset[str] = frozenset({"heading", "paragraph", "code", "table_row", "list_item"})


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
