"""Decoding bytes (BOMs, stray bytes, legacy code pages), cleaning text and building blocks."""

from __future__ import annotations

import pytest

from kb.ingestion.document import ParseError
from kb.ingestion.sniff import TEXT_MIME
from kb.ingestion.text import BlockBuilder, code_text, decode_text, prose
from tests.kb.ingestion.samples import parse_file


def test_latin1_text_is_detected():
    """A latin-1 file decodes to the right accents and reports its encoding."""
    parsed = parse_file("notes-latin1.txt")
    assert parsed.mime_type == TEXT_MIME
    assert parsed.metadata["encoding"] == "latin-1"
    assert parsed.title == "notes-latin1"
    assert parsed.blocks[0].text == "Procès-verbal de la réunion du comité des fêtes"
    assert "François Müller, Zoë Dubois et Jérôme Garçon" in parsed.text
    assert len(parsed.blocks) == 4


@pytest.mark.parametrize(("data", "encoding", "text"), [
    ("\ufeffBOM text é".encode(), "utf-8", "BOM text é"),
    ("Plain utf-8 ☃ text".encode(), "utf-8", "Plain utf-8 ☃ text"),
    ("UTF-16 with BOM ü 日本".encode("utf-16"), "utf-16", "UTF-16 with BOM ü 日本"),
    ("He said “hi” – it costs €5.".encode("cp1252"), "cp1252", "He said “hi” – it costs €5."),
    ("Съешь же ещё этих мягких французских булок, да выпей чаю.".encode("cp1251"), "cp1251",
     "Съешь же ещё этих мягких французских булок, да выпей чаю."),
])
def test_text_encodings(data, encoding, text):
    """UTF-8 with or without BOM, UTF-16 with BOM and legacy code pages decode correctly."""
    parsed = parse_file("t.txt", data)
    assert parsed.metadata["encoding"] == encoding
    assert parsed.text == text


def test_utf8_with_a_bad_byte_is_still_text():
    """One stray byte in otherwise UTF-8 text does not make the file binary."""
    data = "Grüße aus München. ".encode() * 20 + b"\xff" + b" end."
    parsed = parse_file("t.txt", data)
    assert "end." in parsed.text


def test_decode_text_refuses_bytes_with_nul_and_names_the_file():
    """NUL bytes without a UTF-16/32 pattern are binary: a ParseError that names the file."""
    with pytest.raises(ParseError, match=r"^blob\.txt is not text: it contains binary data\.$"):
        decode_text("blob.txt", b"abc\x00def")


def test_prose_and_code_text_clean_differently():
    """Prose is one line without controls or soft hyphens; code keeps its lines and indent."""
    assert prose("  Soft\u00adhyphen\r\n and\x07   bell  ") == "Softhyphen and bell"
    assert code_text("\n\n  def f():\r\n      return 1   \n\n") == "  def f():\n      return 1"


def test_block_builder_offsets_and_heading_paths():
    """Blocks are slices of the joined text and carry the headings above them."""
    builder = BlockBuilder()
    builder.heading("Guide", 1)
    builder.add("  Intro   text. ", "paragraph")
    builder.heading("Setup", 2)
    builder.add("Step one.", "list_item")
    builder.heading("Other", 1)
    builder.add("Done.", "paragraph")
    parsed = builder.build(title="  The   Guide ", mime_type="text/plain", metadata={})
    assert parsed.title == "The Guide"
    assert [b.heading_path for b in parsed.blocks] == [
        (), ("Guide",), ("Guide",), ("Guide", "Setup"), (), ("Other",)]
    for block in parsed.blocks:
        assert parsed.text[block.char_start:block.char_end] == block.text
