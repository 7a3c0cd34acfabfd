"""Word documents: heading styles, tables, lists, damage and zip bombs."""

from __future__ import annotations

import io
import random

import docx
import pytest

from kb.ingestion.document import ParseError
from kb.ingestion.sniff import DOCX_MIME
from tests.kb.ingestion.samples import block_texts, parse_file


def _docx_bytes(document: docx.document.Document) -> bytes:
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def test_docx_headings_build_the_heading_path():
    """Heading N styles become heading blocks and nest into heading_path."""
    parsed = parse_file("policy.docx")
    assert parsed.mime_type == DOCX_MIME
    assert parsed.title == "Visitor Wi-Fi Policy"
    trouble = next(b for b in parsed.blocks if b.text.startswith("If the login page"))
    assert trouble.heading_path == ("Visitor Wi-Fi Policy", "Speed limits", "Troubleshooting")
    contact = next(b for b in parsed.blocks if b.text.startswith("Call the service desk"))
    assert contact.heading_path == ("Visitor Wi-Fi Policy", "Contact")
    heading = next(b for b in parsed.blocks if b.text == "Troubleshooting")
    assert heading.kind == "heading"
    assert heading.heading_path == ("Visitor Wi-Fi Policy", "Speed limits")


def test_docx_tables_and_lists():
    """Table rows join cells with " | "; numbered paragraphs are list items."""
    parsed = parse_file("policy.docx")
    assert block_texts(parsed, "table_row") == [
        "Plan | Download | Upload",
        "Standard | 20 Mbit/s | 5 Mbit/s",
        "Conference | 100 Mbit/s | 20 Mbit/s",
    ]
    assert block_texts(parsed, "list_item") == [
        "Connect to the network called Harbour-Guest.",
        "Open any web page and enter the voucher code.",
    ]
    assert parsed.metadata["author"] == "IT Service Desk"


def test_docx_title_falls_back_to_first_heading_and_merged_cells_count_once():
    """Without a core title the first heading is the title; a merged cell appears once."""
    document = docx.Document()
    document.core_properties.title = ""
    document.add_paragraph("Preamble before any heading.")
    document.add_heading("Quarterly Figures", level=1)
    table = document.add_table(rows=2, cols=3)
    merged = table.cell(0, 0).merge(table.cell(0, 1))
    merged.text = "Region"
    table.cell(0, 2).text = "Sales"
    table.cell(1, 0).text = "North"
    table.cell(1, 1).text = "East"
    table.cell(1, 2).text = "12"
    parsed = parse_file("figures.docx", _docx_bytes(document))
    assert parsed.title == "Quarterly Figures"
    assert block_texts(parsed, "table_row") == ["Region | Sales", "North | East | 12"]
    assert parsed.blocks[0].heading_path == ()


def test_damaged_docx_is_a_parse_error():
    """A .docx that is not a valid zip says it is damaged."""
    with pytest.raises(ParseError, match="damaged"):
        parse_file("broken.docx", b"PK\x03\x04" + random.Random(4).randbytes(400))


def test_docx_that_expands_too_far_is_refused():
    """A DOCX whose parts inflate past max_uncompressed_bytes is treated as a zip bomb."""
    with pytest.raises(ParseError, match="zip bomb"):
        parse_file("policy.docx", max_uncompressed_bytes=10_000)
