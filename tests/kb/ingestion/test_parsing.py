"""Parsing uploaded files into blocks: formats, limits and hostile input."""

from __future__ import annotations

import concurrent.futures
import io
import multiprocessing
import random
import re
import time
import zipfile
import zlib
from pathlib import Path

import docx
import psutil
import pytest
from pypdf import PdfReader, PdfWriter

from kb.ingestion import parsing
from kb.ingestion.parsing import (
    DOCX_MIME,
    HTML_MIME,
    MARKDOWN_MIME,
    PDF_MIME,
    SUPPORTED_MIME_TYPES,
    TEXT_MIME,
    ZIP_MIME,
    ParsedDocument,
    ParseError,
    ParseLimits,
    ParserUnavailableError,
    parse_document,
    sniff_mime_type,
)
from tests.pdfs import one_page_pdf, pathological_pdf

SAMPLES = Path(__file__).resolve().parents[3] / "fixtures" / "samples"
SAMPLE_NAMES = ["manual.pdf", "policy.docx", "article.html", "guide.md", "notes-latin1.txt"]
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@pytest.fixture(autouse=True)
def _isolated_settings():
    """These are pure functions: replace the suite-wide Django settings fixture with nothing."""


def _sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def _parse(name: str, data: bytes | None = None, **limits: float) -> ParsedDocument:
    return parse_document(filename=name, data=_sample(name) if data is None else data,
                          limits=ParseLimits(**limits))


def _texts(parsed: ParsedDocument, kind: str | None = None) -> list[str]:
    return [b.text for b in parsed.blocks if kind is None or b.kind == kind]


def _pdf_bytes(writer: PdfWriter) -> bytes:
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _docx_bytes(document: docx.document.Document) -> bytes:
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


# ---------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_blocks_are_exact_slices_of_the_text(name):
    """Every block is text[char_start:char_end] and blocks are joined by blank lines."""
    parsed = _parse(name)
    assert parsed.blocks
    for block in parsed.blocks:
        assert parsed.text[block.char_start:block.char_end] == block.text
        assert block.text.strip() == block.text or block.kind == "code"
        assert block.text
    assert parsed.text == "\n\n".join(b.text for b in parsed.blocks)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_samples_have_clean_text(name):
    """No control characters, no runs of spaces in prose, known kinds only."""
    parsed = _parse(name)
    assert not _CONTROL.search(parsed.text)
    for block in parsed.blocks:
        assert block.kind in parsing.BLOCK_KINDS
        if block.kind != "code":
            assert "  " not in block.text and "\n" not in block.text


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_files_are_small(name):
    """Committed samples stay small enough to keep the repository light."""
    assert (SAMPLES / name).stat().st_size < 60 * 1024


def test_supported_types_cover_every_format():
    """PDF, DOCX, HTML, Markdown, plain text and zip are the supported types."""
    assert {PDF_MIME, DOCX_MIME, HTML_MIME, MARKDOWN_MIME, TEXT_MIME, ZIP_MIME} == set(
        SUPPORTED_MIME_TYPES)


# ---------------------------------------------------------------------------- sniffing


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
    assert sniff_mime_type(filename="x.txt", head=_sample("manual.pdf")[:8192]) == PDF_MIME
    assert sniff_mime_type(filename="x.bin", head=_sample("policy.docx")[:8192]) in (
        DOCX_MIME, ZIP_MIME)
    assert parse_document(filename="x.bin", data=_sample("policy.docx")).mime_type == DOCX_MIME
    assert sniff_mime_type(filename="x.txt", head=_sample("article.html")[:8192]) == HTML_MIME


# ---------------------------------------------------------------------------- PDF


def test_pdf_blocks_keep_their_page_numbers():
    """Each PDF block carries the 1-based page it came from."""
    parsed = _parse("manual.pdf")
    assert parsed.mime_type == PDF_MIME
    assert parsed.metadata["pages"] == 3
    pages = {b.page for b in parsed.blocks}
    assert pages == {1, 2, 3}
    by_text = {b.text.split(".")[0]: b.page for b in parsed.blocks}
    assert by_text["Never open the valve chamber while the pumps are running"] == 1
    assert by_text["Stop pump B first, then pump A"] == 3


def test_pdf_title_author_and_outline_headings():
    """Title and author come from the PDF info; bookmarks give heading blocks and paths."""
    parsed = _parse("manual.pdf")
    assert parsed.title == "Harbour Pump Station Operations Manual"
    assert parsed.metadata["author"] == "Port Engineering Team"
    headings = _texts(parsed, "heading")
    assert "3. Routine checks" in headings
    routine = next(b for b in parsed.blocks if b.text.startswith("Every two hours"))
    assert routine.heading_path == ("Harbour Pump Station Operations Manual", "3. Routine checks")
    assert routine.page == 2


def test_pdf_paragraphs_are_reflowed_and_dehyphenated():
    """Lines join into paragraphs and a line-break hyphen is removed ("mainte-nance")."""
    parsed = _parse("manual.pdf")
    assert "maintenance window" in parsed.text
    assert "mainte-" not in parsed.text
    paragraph = next(b for b in parsed.blocks if b.text.startswith("Never open the valve"))
    assert paragraph.text.endswith("before you touch any coupling.")


def test_pdf_page_numbers_are_dropped():
    """A bare page number at the foot of a page is not a paragraph."""
    parsed = _parse("manual.pdf")
    assert not any(re.fullmatch(r"\d+", text) for text in _texts(parsed))


def test_pdf_paragraph_heuristics():
    """Short lines ending a sentence close a paragraph; bullets start new ones."""
    lines = ["A long line of text that fills the whole width of the page nicely and",
             "continues on the next line until the paragraph finally ends here.",
             "Short ending.",
             "Next paragraph starts here with another long line that fills the page",
             "and ends.",
             "• first bullet",
             "• second bullet"]
    assert parsing._pdf_paragraphs(lines) == [
        "A long line of text that fills the whole width of the page nicely and continues on the "
        "next line until the paragraph finally ends here. Short ending.",
        "Next paragraph starts here with another long line that fills the page and ends.",
        "• first bullet",
        "• second bullet",
    ]


def test_password_protected_pdf_is_refused():
    """A PDF that needs a password fails with a message that says so."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(_sample("manual.pdf"))))
    writer.encrypt(user_password="secret", owner_password="owner", algorithm="RC4-128")
    with pytest.raises(ParseError, match="password-protected"):
        _parse("locked.pdf", _pdf_bytes(writer))


def test_pdf_encrypted_without_user_password_is_read():
    """Owner-password-only encryption (no password to open) does not block reading."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(_sample("manual.pdf"))))
    writer.encrypt(user_password="", owner_password="owner", algorithm="RC4-128")
    parsed = _parse("restricted.pdf", _pdf_bytes(writer))
    assert "maintenance window" in parsed.text


@pytest.mark.parametrize("cut", [0.2, 0.5, 0.9])
def test_truncated_pdf_is_a_parse_error(cut):
    """A PDF cut short is reported as damaged, not as a crash."""
    data = _sample("manual.pdf")
    with pytest.raises(ParseError, match="PDF"):
        _parse("cut.pdf", data[: int(len(data) * cut)])


def test_corrupt_pdf_is_a_parse_error():
    """A PDF header followed by garbage is a readable ParseError."""
    data = b"%PDF-1.4\n" + random.Random(7).randbytes(4000)
    with pytest.raises(ParseError, match="damaged or not a valid PDF"):
        _parse("corrupt.pdf", data)


def test_image_only_pdf_is_reported_as_scanned():
    """A PDF without a text layer says it looks scanned instead of producing nothing."""
    writer = PdfWriter()
    writer.add_blank_page(width=612, height=792)
    writer.add_blank_page(width=612, height=792)
    with pytest.raises(ParseError, match="scanned or image-only"):
        _parse("scan.pdf", _pdf_bytes(writer))


def test_pdf_page_limit():
    """A PDF with more pages than max_pdf_pages is refused with both numbers."""
    with pytest.raises(ParseError, match="3 pages; the limit is 2"):
        _parse("manual.pdf", max_pdf_pages=2)


def _pdf_children() -> list:
    return [child for child in psutil.Process().children(recursive=True)
            if parsing._PDF_CHILD_MODULE in " ".join(child.cmdline())]


def test_slow_pdf_is_killed_at_the_timeout():
    """A pathological PDF's reader is killed at parse_timeout_seconds and leaves no process."""
    started = time.monotonic()
    with pytest.raises(ParseError, match=r"took longer than 1 s"):
        _parse("slow.pdf", pathological_pdf(600_000), parse_timeout_seconds=1)
    assert time.monotonic() - started < 10
    assert _pdf_children() == []


def _parse_in_daemon(results, name: str, data: bytes, timeout: float) -> None:
    try:
        parsed = parse_document(filename=name, data=data,
                                limits=ParseLimits(parse_timeout_seconds=timeout))
        results.put(("ok", parsed.title))
    except Exception as exc:
        results.put((type(exc).__name__, str(exc)))


@pytest.mark.parametrize("name", ["manual.pdf", "slow.pdf"])
def test_pdf_parses_and_keeps_its_deadline_inside_a_daemonic_process(name):
    """django-q runs tasks in daemonic processes: a PDF parses there, and the deadline holds."""
    data = _sample(name) if name == "manual.pdf" else pathological_pdf(600_000)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    worker = context.Process(target=_parse_in_daemon, args=(results, name, data, 3), daemon=True)
    started = time.monotonic()
    worker.start()
    try:
        outcome, detail = results.get(timeout=60)
    finally:
        worker.join(10)
    if name == "manual.pdf":
        assert (outcome, detail) == ("ok", "Harbour Pump Station Operations Manual")
    else:
        assert outcome == "ParseError" and "took longer than 3 s" in detail
        assert time.monotonic() - started < 15


def test_pdf_deadline_holds_on_a_thread_that_is_not_the_main_one():
    """The web process parses on sync_to_async's threads, where signal alarms cannot work."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        started = time.monotonic()
        future = pool.submit(_parse, "slow.pdf", pathological_pdf(600_000),
                             parse_timeout_seconds=1)
        with pytest.raises(ParseError, match="took longer than 1 s"):
            future.result(timeout=30)
    assert time.monotonic() - started < 10
    assert _pdf_children() == []


def test_pdf_that_needs_too_much_memory_fails_with_the_limit():
    """A 70 MB content stream exceeds the child's memory limit; the message names the limit."""
    limit = 128 * 1024 * 1024
    assert _parse("manual.pdf", max_parse_memory_bytes=limit).blocks  # the limit itself is livable
    bomb = one_page_pdf(zlib.compress(b"BT (a) Tj ET " + b" " * (70 * 1024 * 1024), 9))
    with pytest.raises(ParseError, match="more than the 128 MB of memory"):
        _parse("bomb.pdf", bomb, max_parse_memory_bytes=limit)


def test_crashing_pdf_reader_is_a_parse_error(monkeypatch):
    """If the reader dies from a signal, the editor sees that the file is probably damaged."""
    monkeypatch.setattr(parsing, "_PDF_CHILD_MODULE", "tests.kb.ingestion.crashing_pdf_child")
    with pytest.raises(ParseError, match=r"crashed on manual\.pdf; the file is probably damaged"):
        _parse("manual.pdf")


def test_pdf_reader_that_cannot_run_blames_the_server_not_the_file(monkeypatch):
    """A reader that fails to start is the server's fault: the message says so, not the file's."""
    monkeypatch.setattr(parsing, "_PDF_CHILD_MODULE", "kb.ingestion.no_such_module")
    with pytest.raises(ParserUnavailableError) as raised:
        _parse("manual.pdf")
    message = str(raised.value)
    assert "problem on the server, not with the file" in message
    assert "No module named" in message and "damaged" not in message
    monkeypatch.setattr(parsing.sys, "executable", "/nonexistent/python")
    with pytest.raises(ParserUnavailableError, match="could not run its PDF reader"):
        _parse("manual.pdf")


def test_a_reader_missing_from_the_install_blames_the_server(monkeypatch):
    """An ImportError inside a parser is a broken server, not a damaged file."""
    def missing(name, data, limits):
        raise ModuleNotFoundError("No module named 'docx'")

    monkeypatch.setitem(parsing._PARSERS, DOCX_MIME, missing)
    with pytest.raises(ParserUnavailableError, match="problem on the server, not with the file"):
        _parse("policy.docx")


def test_pdf_parse_overhead_is_small():
    """Starting the reader's child interpreter for a small PDF costs about a second at most."""
    _parse("manual.pdf")
    started = time.perf_counter()
    for _ in range(3):
        _parse("manual.pdf")
    assert (time.perf_counter() - started) / 3 < 1.5


# ---------------------------------------------------------------------------- extension lies


def test_pdf_extension_with_html_content_is_refused():
    """A saved login page named .pdf is refused with what the content really is."""
    html = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Log in</body></html>"
    with pytest.raises(ParseError, match="extension says PDF but the content is an HTML page"):
        _parse("invoice.pdf", html)


def test_pdf_extension_with_junk_is_refused():
    """Random bytes named .pdf are refused, naming the mismatch."""
    with pytest.raises(ParseError, match="extension says PDF but the content is"):
        _parse("junk.pdf", random.Random(1).randbytes(3000))


def test_pdf_extension_with_plain_text_is_parsed_as_text():
    """Real text wearing a .pdf name is parsed as text: the content decides."""
    parsed = _parse("notes.pdf", b"Meeting notes.\n\nAction items follow.")
    assert parsed.mime_type == TEXT_MIME
    assert _texts(parsed) == ["Meeting notes.", "Action items follow."]
    assert parsed.metadata["claimed_type"] == PDF_MIME


def test_docx_extension_on_a_plain_zip_is_refused():
    """A zip renamed to .docx is not a Word document."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", "hello")
    with pytest.raises(ParseError, match="extension says Word document"):
        _parse("fake.docx", buffer.getvalue())


def test_binary_junk_with_txt_extension_is_not_text():
    """Binary bytes named .txt fail with "not text" instead of producing mojibake."""
    with pytest.raises(ParseError, match="not text"):
        _parse("junk.txt", random.Random(2).randbytes(3000))
    no_nul = bytes(b for b in random.Random(3).randbytes(6000) if b)[:3000]
    with pytest.raises(ParseError, match="not text"):
        _parse("junk2.txt", no_nul)


# ---------------------------------------------------------------------------- generic failures


def test_empty_file_is_a_parse_error():
    """An empty upload says it is empty."""
    with pytest.raises(ParseError, match="empty"):
        _parse("empty.txt", b"")


def test_whitespace_only_file_has_no_text():
    """A file of blanks parses to nothing and says so."""
    with pytest.raises(ParseError, match="no text"):
        _parse("blank.md", b"   \n\n\t  \n")


def test_file_over_the_size_limit_is_refused():
    """Files over max_file_bytes are refused before any parser runs."""
    with pytest.raises(ParseError, match=r"the limit is 1\.0 KB"):
        _parse("big.txt", b"word " * 1000, max_file_bytes=1024)


def test_unsupported_type_names_the_type_and_the_supported_ones():
    """An image upload says it is an image and lists what is supported."""
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    with pytest.raises(ParseError, match=r"PNG image.*not supported.*PDF"):
        _parse("photo.png", png)


def test_zip_is_not_parsed_as_one_document():
    """Zips go through extract_archive; parse_document explains that."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", "hello")
    with pytest.raises(ParseError, match="zip archive"):
        _parse("bundle.zip", buffer.getvalue())


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
    for variant in _mutations(_sample(name), seed=len(name), count=12):
        try:
            parse_document(filename=name, data=variant,
                           limits=ParseLimits(parse_timeout_seconds=20))
        except ParseError as exc:
            assert str(exc)


# ---------------------------------------------------------------------------- DOCX


def test_docx_headings_build_the_heading_path():
    """Heading N styles become heading blocks and nest into heading_path."""
    parsed = _parse("policy.docx")
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
    parsed = _parse("policy.docx")
    assert _texts(parsed, "table_row") == [
        "Plan | Download | Upload",
        "Standard | 20 Mbit/s | 5 Mbit/s",
        "Conference | 100 Mbit/s | 20 Mbit/s",
    ]
    assert _texts(parsed, "list_item") == [
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
    parsed = _parse("figures.docx", _docx_bytes(document))
    assert parsed.title == "Quarterly Figures"
    assert _texts(parsed, "table_row") == ["Region | Sales", "North | East | 12"]
    assert parsed.blocks[0].heading_path == ()


def test_damaged_docx_is_a_parse_error():
    """A .docx that is not a valid zip says it is damaged."""
    with pytest.raises(ParseError, match="damaged"):
        _parse("broken.docx", b"PK\x03\x04" + random.Random(4).randbytes(400))


def test_docx_that_expands_too_far_is_refused():
    """A DOCX whose parts inflate past max_uncompressed_bytes is treated as a zip bomb."""
    with pytest.raises(ParseError, match="zip bomb"):
        _parse("policy.docx", max_uncompressed_bytes=10_000)


# ---------------------------------------------------------------------------- HTML


def test_html_boilerplate_is_removed():
    """Navigation, footer, aside, scripts and styles do not reach the text."""
    parsed = _parse("article.html")
    assert parsed.mime_type == HTML_MIME
    for boilerplate in ("Bin collections", "All rights reserved", "tracking", "font-family",
                        "Recycling guide", "noopener", "Privacy"):
        assert boilerplate not in parsed.text
    assert "Composting turns kitchen and garden waste" in parsed.text


def test_html_structure_is_kept():
    """h1-h6 are headings, <pre> is one code block, table rows carry their column names."""
    parsed = _parse("article.html")
    assert parsed.title == "Composting at Home | Green Streets Council"
    assert _texts(parsed, "heading")[:2] == ["Composting at Home", "What you can compost"]
    (code,) = _texts(parsed, "code")
    assert code.startswith("def needs_turning(readings):\n    # a heap below 40")
    assert "return min(readings[-3:]) < 40" in code
    assert "Greens: Grass cuttings | Browns: Dry leaves" in _texts(parsed, "table_row")
    assert len(_texts(parsed, "list_item")) == 3
    row = next(b for b in parsed.blocks if b.kind == "table_row")
    assert row.heading_path == ("Composting at Home", "What you can compost")


def test_short_html_page_keeps_headings():
    """A short page is not flattened into one paragraph."""
    html = (b"<html><head><title>Opening hours</title></head><body><nav><a href=/>Home</a></nav>"
            b"<h1>Opening hours</h1><p>We open at nine.</p><h2>Holidays</h2>"
            b"<p>Closed on public holidays.</p><pre>Mon-Fri 9-17\nSat    10-14</pre>"
            b"<footer>Copyright</footer></body></html>")
    parsed = _parse("hours.html", html)
    assert [(b.kind, b.text) for b in parsed.blocks] == [
        ("heading", "Opening hours"),
        ("paragraph", "We open at nine."),
        ("heading", "Holidays"),
        ("paragraph", "Closed on public holidays."),
        ("code", "Mon-Fri 9-17\nSat    10-14"),
    ]
    assert parsed.blocks[3].heading_path == ("Opening hours", "Holidays")


def test_html_inline_markup_does_not_split_words():
    """Inline tags join their text; <br> and block children separate words."""
    html = (b"<html><body><p>Hel<b>lo</b> wor<i>ld</i>, line<br>two</p>"
            b"<table><tr><td><p>a</p><p>b</p></td><td>c</td></tr></table>"
            b"<ul><li>One <a href=x>link</a><ul><li>nested</li></ul></li></ul></body></html>")
    parsed = _parse("inline.html", html)
    assert [(b.kind, b.text) for b in parsed.blocks] == [
        ("paragraph", "Hello world, line two"),
        ("table_row", "a b | c"),
        ("list_item", "One link"),
        ("list_item", "nested"),
    ]


def test_deeply_nested_html_is_read_quickly():
    """Thousands of nested elements neither hang nor crash the parser."""
    html = b"<html><body>" + b"<div>" * 20000 + b"deep text" + b"</div>" * 20000 + b"</body></html>"
    started = time.monotonic()
    parsed = _parse("deep.html", html)
    assert time.monotonic() - started < 10
    assert parsed.text == "deep text"


@pytest.mark.parametrize(("head", "body", "title"), [
    ('<meta property="og:title" content="From OG">', "<h1>From H1</h1><p>Body text.</p>",
     "From OG"),
    ("", "<h1>From H1</h1><p>Body text.</p>", "From H1"),
    ("", "<p>Body text only.</p>", "untitled-page"),
])
def test_html_title_fallbacks(head, body, title):
    """Title comes from <title>, else og:title, else the first h1, else the file name."""
    html = f"<html><head>{head}</head><body>{body}</body></html>".encode()
    assert _parse("untitled-page.html", html).title == title


def test_html_declared_charset_is_used():
    """A windows-1252 page that declares its charset decodes correctly."""
    html = ('<html><head><meta charset="windows-1252"><title>Caf\u00e9</title></head>'
            "<body><p>\u201cQuoted\u201d caf\u00e9 prices \u2013 \u20ac3.</p></body></html>")
    parsed = _parse("cafe.html", html.encode("cp1252"))
    assert parsed.title == "Caf\u00e9"
    assert "\u201cQuoted\u201d caf\u00e9 prices \u2013 \u20ac3." in parsed.text


# ---------------------------------------------------------------------------- Markdown


def test_markdown_structure():
    """ATX and setext headings nest; a fenced block is one code block with its blank line."""
    parsed = _parse("guide.md")
    assert parsed.mime_type == MARKDOWN_MIME
    assert parsed.title == "Deploying the Tide Tables Service"
    assert "owner: platform team" not in parsed.text  # front matter is not content
    assert "Configuration" in _texts(parsed, "heading")  # setext heading
    codes = _texts(parsed, "code")
    assert codes[0] == ("docker build -t tides:latest .\n\n# the tag must match the release "
                        "number\ndocker tag tides:latest registry.example.org/tides:2.4.1")
    assert codes[1] == "tides deploy --tag 2.4.0"  # indented code
    rollback = next(b for b in parsed.blocks if b.text.startswith("If the new release"))
    assert rollback.heading_path == ("Deploying the Tide Tables Service", "Configuration",
                                     "Rolling back")
    assert _texts(parsed, "list_item")[1] == "A production role in the cloud console"


def test_markdown_table_rows_carry_the_header():
    """Each table row is one block that names its columns."""
    rows = _texts(_parse("guide.md"), "table_row")
    assert rows[0] == ("Variable: TIDES_PORT | Default: 8080 | "
                       "Meaning: Port the HTTP server listens on")
    assert len(rows) == 3


@pytest.mark.parametrize(("source", "title"), [
    (b"Intro.\n\n# First Heading\n\nText.", "First Heading"),
    (b"## Only a subheading\n\nText.", "howto"),
    (b"---\ntitle: 'Quoted Title'\n---\n# Other\n", "Quoted Title"),
])
def test_markdown_title(source, title):
    """Title is the front-matter title, else the first h1, else the file name."""
    assert _parse("howto.md", source).title == title


def test_markdown_inline_markup_is_plain_text():
    """Links keep their text, emphasis and inline code lose their markers."""
    parsed = _parse("x.md", b"See [the docs](https://example.org) for **bold** and `code`.")
    assert _texts(parsed) == ["See the docs for bold and code."]


# ---------------------------------------------------------------------------- plain text


def test_latin1_text_is_detected():
    """A latin-1 file decodes to the right accents and reports its encoding."""
    parsed = _parse("notes-latin1.txt")
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
    parsed = _parse("t.txt", data)
    assert parsed.metadata["encoding"] == encoding
    assert parsed.text == text


def test_text_paragraphs_and_whitespace():
    """Blank lines split paragraphs; spaces collapse; control characters and CRLF go away."""
    data = b"First   line\r\nsame paragraph.\r\n\r\n\r\nSecond\x07 para\x1b.\n  \n\tThird."
    parsed = _parse("t.txt", data)
    assert _texts(parsed) == ["First line same paragraph.", "Second para.", "Third."]


def test_utf8_with_a_bad_byte_is_still_text():
    """One stray byte in otherwise UTF-8 text does not make the file binary."""
    data = "Grüße aus München. ".encode() * 20 + b"\xff" + b" end."
    parsed = _parse("t.txt", data)
    assert "end." in parsed.text


@pytest.mark.parametrize("filename, data", [
    ("page.html", b'<?xml version="1.0"?><html><body><p>XHTML body text.</p></body></html>'),
    ("notes.md", b'# Notes\n\n<?xml version="1.0"?><note>Inline markup text.</note>\n'),
])
def test_xml_looking_html_parses_without_a_warning_even_after_filters_were_reset(filename, data):
    """HTML that looks like XML is parsed as HTML on purpose: no XMLParsedAsHTMLWarning,
    also after something (a catch_warnings block) restored the filters of an earlier time."""
    import warnings

    parse_document(filename=filename, data=data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # what pytest's per-test restore did to the filter
        warnings.simplefilter("always")
        parsed = parse_document(filename=filename, data=data)

    assert "text" in parsed.text
    assert not [w for w in caught if w.category.__name__ == "XMLParsedAsHTMLWarning"]
