"""Plain text: paragraphs at blank lines, whitespace and control characters cleaned."""

from __future__ import annotations

from tests.kb.ingestion.samples import block_texts, parse_file


def test_text_paragraphs_and_whitespace():
    """Blank lines split paragraphs; spaces collapse; control characters and CRLF go away."""
    data = b"First   line\r\nsame paragraph.\r\n\r\n\r\nSecond\x07 para\x1b.\n  \n\tThird."
    parsed = parse_file("t.txt", data)
    assert block_texts(parsed) == ["First line same paragraph.", "Second para.", "Third."]
