"""Detecting the format from the content first and the file name second."""

from __future__ import annotations

import pytest

from kb.ingestion.parsing import parse_document
from kb.ingestion.sniff import (
    DOCX_MIME,
    HTML_MIME,
    MARKDOWN_MIME,
    PDF_MIME,
    SUPPORTED_MIME_TYPES,
    TEXT_MIME,
    ZIP_MIME,
    sniff_mime_type,
)
from tests.kb.ingestion.samples import sample_bytes


def test_supported_types_cover_every_format():
    """PDF, DOCX, HTML, Markdown, plain text and zip are the supported types."""
    assert {PDF_MIME, DOCX_MIME, HTML_MIME, MARKDOWN_MIME, TEXT_MIME, ZIP_MIME} == set(
        SUPPORTED_MIME_TYPES)


@pytest.mark.parametrize(("filename", "head", "expected"), [
    ("report.txt", b"%PDF-1.7\n...", PDF_MIME),
    ("report.pdf", b"just some text", TEXT_MIME),
    ("page.txt", b"<!DOCTYPE html><html><body>hi</body></html>", HTML_MIME),
    ("README.md", b'<p align="center"><img src="logo.png"></p>\n# Title', MARKDOWN_MIME),
    ("README.md", b"<!doctype html>\n<html><body>saved page</body></html>", HTML_MIME),
    ("notes", b"plain words", TEXT_MIME),
    ("fragment", b"<div><p>hello</p></div>", HTML_MIME),
    ("image.pdf", b"\x89PNG\r\n\x1a\n\x00\x00", "image/png"),
    ("data.txt", b"\x00\x01\x02\x03binary", "application/octet-stream"),
    ("archive.bin", b"PK\x03\x04\x14\x00\x00\x00", ZIP_MIME),
    ("letter.docx", b"PK\x03\x04\x14\x00\x00\x00", DOCX_MIME),
    ("old.doc", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x00", "application/msword"),
    ("utf16.txt", "hello".encode("utf-16"), TEXT_MIME),
])
def test_sniff_prefers_content_over_extension(filename, head, expected):
    """Magic bytes decide first; the extension only breaks ties between text formats."""
    assert sniff_mime_type(filename=filename, head=head) == expected


def test_sniff_recognises_real_samples():
    """The committed samples are recognised by content even under a misleading name."""
    assert sniff_mime_type(filename="x.txt", head=sample_bytes("manual.pdf")[:8192]) == PDF_MIME
    assert sniff_mime_type(filename="x.bin", head=sample_bytes("policy.docx")[:8192]) in (
        DOCX_MIME, ZIP_MIME)
    assert parse_document(filename="x.bin", data=sample_bytes("policy.docx")).mime_type == DOCX_MIME
    assert sniff_mime_type(filename="x.txt", head=sample_bytes("article.html")[:8192]) == HTML_MIME
