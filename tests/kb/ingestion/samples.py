"""The committed sample files and small helpers that parse them, shared by the parsing tests."""

from __future__ import annotations

from pathlib import Path

from kb.ingestion.document import ParsedDocument, ParseLimits
from kb.ingestion.parsing import parse_document

SAMPLES = Path(__file__).resolve().parents[3] / "fixtures" / "samples"
SAMPLE_NAMES = ["manual.pdf", "policy.docx", "article.html", "guide.md", "notes-latin1.txt"]


def sample_bytes(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def parse_file(name: str, data: bytes | None = None, **limits: float) -> ParsedDocument:
    """Parse a sample (or data under that name) with the given ParseLimits fields."""
    return parse_document(filename=name, data=sample_bytes(name) if data is None else data,
                          limits=ParseLimits(**limits))


def block_texts(parsed: ParsedDocument, kind: str | None = None) -> list[str]:
    return [b.text for b in parsed.blocks if kind is None or b.kind == kind]
