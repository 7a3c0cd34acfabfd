"""Plain text: decoded in whatever encoding it is in, split into paragraphs at blank lines."""

from __future__ import annotations

import re

from kb.ingestion.document import ParsedDocument, ParseLimits
from kb.ingestion.sniff import TEXT_MIME
from kb.ingestion.text import BlockBuilder, clean, decode_text, stem

_BLANK_LINE = re.compile(r"\n[ \t]*\n+")


def parse_plain_text(name: str, data: bytes, limits: ParseLimits) -> ParsedDocument:
    """Paragraphs are separated by blank lines; the title is the file name."""
    text, encoding = decode_text(name, data)
    builder = BlockBuilder()
    for paragraph in _BLANK_LINE.split(clean(text)):
        builder.add(paragraph, "paragraph")
    return builder.build(title=stem(name), mime_type=TEXT_MIME, metadata={"encoding": encoding})

