"""parse_document: invariants of every parse, lying extensions, limits and hostile input."""

from __future__ import annotations

import io
import random
import re
import zipfile

import pytest

from kb.ingestion import parsing
from kb.ingestion.document import BLOCK_KINDS, ParseError, ParseLimits, ParserUnavailableError
from kb.ingestion.parsing import parse_document
from kb.ingestion.sniff import DOCX_MIME, PDF_MIME, TEXT_MIME
from tests.kb.ingestion.samples import SAMPLE_NAMES, SAMPLES, block_texts, parse_file, sample_bytes

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


# ---------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_blocks_are_exact_slices_of_the_text(name):
    """Every block is text[char_start:char_end] and blocks are joined by blank lines."""
    parsed = parse_file(name)
    assert parsed.blocks
    for block in parsed.blocks:
        assert parsed.text[block.char_start:block.char_end] == block.text
        assert block.text.strip() == block.text or block.kind == "code"
        assert block.text
    assert parsed.text == "\n\n".join(b.text for b in parsed.blocks)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_samples_have_clean_text(name):
    """No control characters, no runs of spaces in prose, known kinds only."""
    parsed = parse_file(name)
    assert not _CONTROL.search(parsed.text)
    for block in parsed.blocks:
        assert block.kind in BLOCK_KINDS
        if block.kind != "code":
            assert "  " not in block.text and "\n" not in block.text


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_files_are_small(name):
    """Committed samples stay small enough to keep the repository light."""
    assert (SAMPLES / name).stat().st_size < 60 * 1024


def test_a_reader_missing_from_the_install_blames_the_server(monkeypatch):
    """An ImportError inside a parser is a broken server, not a damaged file."""
    def missing(name, data, limits):
        raise ModuleNotFoundError("No module named 'docx'")

    monkeypatch.setitem(parsing._PARSERS, DOCX_MIME, missing)
    with pytest.raises(ParserUnavailableError, match="problem on the server, not with the file"):
        parse_file("policy.docx")


# ---------------------------------------------------------------------------- extension lies


def test_pdf_extension_with_html_content_is_refused():
    """A saved login page named .pdf is refused with what the content really is."""
    html = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Log in</body></html>"
    with pytest.raises(ParseError, match="extension says PDF but the content is an HTML page"):
        parse_file("invoice.pdf", html)


def test_pdf_extension_with_junk_is_refused():
    """Random bytes named .pdf are refused, naming the mismatch."""
    with pytest.raises(ParseError, match="extension says PDF but the content is"):
        parse_file("junk.pdf", random.Random(1).randbytes(3000))


def test_pdf_extension_with_plain_text_is_parsed_as_text():
    """Real text wearing a .pdf name is parsed as text: the content decides."""
    parsed = parse_file("notes.pdf", b"Meeting notes.\n\nAction items follow.")
    assert parsed.mime_type == TEXT_MIME
    assert block_texts(parsed) == ["Meeting notes.", "Action items follow."]
    assert parsed.metadata["claimed_type"] == PDF_MIME


def test_docx_extension_on_a_plain_zip_is_refused():
    """A zip renamed to .docx is not a Word document."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", "hello")
    with pytest.raises(ParseError, match="extension says Word document"):
        parse_file("fake.docx", buffer.getvalue())


def test_binary_junk_with_txt_extension_is_not_text():
    """Binary bytes named .txt fail with "not text" instead of producing mojibake."""
    with pytest.raises(ParseError, match="not text"):
        parse_file("junk.txt", random.Random(2).randbytes(3000))
    no_nul = bytes(b for b in random.Random(3).randbytes(6000) if b)[:3000]
    with pytest.raises(ParseError, match="not text"):
        parse_file("junk2.txt", no_nul)


# ---------------------------------------------------------------------------- generic failures


def test_empty_file_is_a_parse_error():
    """An empty upload says it is empty."""
    with pytest.raises(ParseError, match="empty"):
        parse_file("empty.txt", b"")


def test_whitespace_only_file_has_no_text():
    """A file of blanks parses to nothing and says so."""
    with pytest.raises(ParseError, match="no text"):
        parse_file("blank.md", b"   \n\n\t  \n")


def test_file_over_the_size_limit_is_refused():
    """Files over max_file_bytes are refused before any parser runs."""
    with pytest.raises(ParseError, match=r"the limit is 1\.0 KB"):
        parse_file("big.txt", b"word " * 1000, max_file_bytes=1024)


def test_unsupported_type_names_the_type_and_the_supported_ones():
    """An image upload says it is an image and lists what is supported."""
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    with pytest.raises(ParseError, match=r"PNG image.*not supported.*PDF"):
        parse_file("photo.png", png)


def test_zip_is_not_parsed_as_one_document():
    """Zips go through extract_archive; parse_document explains that."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", "hello")
    with pytest.raises(ParseError, match="zip archive"):
        parse_file("bundle.zip", buffer.getvalue())


def _mutations(data: bytes, seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        choice = rng.random()
        if choice < 0.4:
            out.append(data[: rng.randrange(1, len(data))])
        else:
            mutated = bytearray(data)
            for _ in range(rng.randrange(1, 20)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            out.append(bytes(mutated))
    return out


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_damaged_files_only_ever_raise_parse_error(name):
    """Truncated or bit-flipped versions of every sample parse or raise ParseError, nothing else."""
    for variant in _mutations(sample_bytes(name), seed=len(name), count=12):
        try:
            parse_document(filename=name, data=variant,
                           limits=ParseLimits(parse_timeout_seconds=20))
        except ParseError as exc:
            assert str(exc)
