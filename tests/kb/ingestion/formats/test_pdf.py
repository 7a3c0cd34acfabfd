"""PDFs: pages, outline headings, re-flowed paragraphs, and the child process's limits."""

from __future__ import annotations

import concurrent.futures
import io
import multiprocessing
import random
import re
import time
import zlib

import psutil
import pytest
from pypdf import PdfReader, PdfWriter

from kb.ingestion.document import ParseError, ParseLimits, ParserUnavailableError
from kb.ingestion.formats import pdf
from kb.ingestion.parsing import parse_document
from kb.ingestion.sniff import PDF_MIME
from tests.kb.ingestion.samples import block_texts, parse_file, sample_bytes
from tests.pdfs import one_page_pdf, pathological_pdf


def _pdf_bytes(writer: PdfWriter) -> bytes:
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_pdf_blocks_keep_their_page_numbers():
    """Each PDF block carries the 1-based page it came from."""
    parsed = parse_file("manual.pdf")
    assert parsed.mime_type == PDF_MIME
    assert parsed.metadata["pages"] == 3
    pages = {b.page for b in parsed.blocks}
    assert pages == {1, 2, 3}
    by_text = {b.text.split(".")[0]: b.page for b in parsed.blocks}
    assert by_text["Never open the valve chamber while the pumps are running"] == 1
    assert by_text["Stop pump B first, then pump A"] == 3


def test_pdf_title_author_and_outline_headings():
    """Title and author come from the PDF info; bookmarks give heading blocks and paths."""
    parsed = parse_file("manual.pdf")
    assert parsed.title == "Harbour Pump Station Operations Manual"
    assert parsed.metadata["author"] == "Port Engineering Team"
    headings = block_texts(parsed, "heading")
    assert "3. Routine checks" in headings
    routine = next(b for b in parsed.blocks if b.text.startswith("Every two hours"))
    assert routine.heading_path == ("Harbour Pump Station Operations Manual", "3. Routine checks")
    assert routine.page == 2


def test_pdf_paragraphs_are_reflowed_and_dehyphenated():
    """Lines join into paragraphs and a line-break hyphen is removed ("mainte-nance")."""
    parsed = parse_file("manual.pdf")
    assert "maintenance window" in parsed.text
    assert "mainte-" not in parsed.text
    paragraph = next(b for b in parsed.blocks if b.text.startswith("Never open the valve"))
    assert paragraph.text.endswith("before you touch any coupling.")


def test_pdf_page_numbers_are_dropped():
    """A bare page number at the foot of a page is not a paragraph."""
    parsed = parse_file("manual.pdf")
    assert not any(re.fullmatch(r"\d+", text) for text in block_texts(parsed))


def test_pdf_paragraph_heuristics():
    """Short lines ending a sentence close a paragraph; bullets start new ones."""
    lines = ["A long line of text that fills the whole width of the page nicely and",
             "continues on the next line until the paragraph finally ends here.",
             "Short ending.",
             "Next paragraph starts here with another long line that fills the page",
             "and ends.",
             "• first bullet",
             "• second bullet"]
    assert pdf._pdf_paragraphs(lines) == [
        "A long line of text that fills the whole width of the page nicely and continues on the "
        "next line until the paragraph finally ends here. Short ending.",
        "Next paragraph starts here with another long line that fills the page and ends.",
        "• first bullet",
        "• second bullet",
    ]


def test_password_protected_pdf_is_refused():
    """A PDF that needs a password fails with a message that says so."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(sample_bytes("manual.pdf"))))
    writer.encrypt(user_password="secret", owner_password="owner", algorithm="RC4-128")
    with pytest.raises(ParseError, match="password-protected"):
        parse_file("locked.pdf", _pdf_bytes(writer))


def test_pdf_encrypted_without_user_password_is_read():
    """Owner-password-only encryption (no password to open) does not block reading."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(sample_bytes("manual.pdf"))))
    writer.encrypt(user_password="", owner_password="owner", algorithm="RC4-128")
    parsed = parse_file("restricted.pdf", _pdf_bytes(writer))
    assert "maintenance window" in parsed.text


@pytest.mark.parametrize("cut", [0.2, 0.5, 0.9])
def test_truncated_pdf_is_a_parse_error(cut):
    """A PDF cut short is reported as damaged, not as a crash."""
    data = sample_bytes("manual.pdf")
    with pytest.raises(ParseError, match="PDF"):
        parse_file("cut.pdf", data[: int(len(data) * cut)])


def test_corrupt_pdf_is_a_parse_error():
    """A PDF header followed by garbage is a readable ParseError."""
    data = b"%PDF-1.4\n" + random.Random(7).randbytes(4000)
    with pytest.raises(ParseError, match="damaged or not a valid PDF"):
        parse_file("corrupt.pdf", data)


def test_image_only_pdf_is_reported_as_scanned():
    """A PDF without a text layer says it looks scanned instead of producing nothing."""
    writer = PdfWriter()
    writer.add_blank_page(width=612, height=792)
    writer.add_blank_page(width=612, height=792)
    with pytest.raises(ParseError, match="scanned or image-only"):
        parse_file("scan.pdf", _pdf_bytes(writer))


def test_pdf_page_limit():
    """A PDF with more pages than max_pdf_pages is refused with both numbers."""
    with pytest.raises(ParseError, match="3 pages; the limit is 2"):
        parse_file("manual.pdf", max_pdf_pages=2)


def _pdf_children() -> list:
    return [child for child in psutil.Process().children(recursive=True)
            if pdf._PDF_CHILD_MODULE in " ".join(child.cmdline())]


def test_slow_pdf_is_killed_at_the_timeout():
    """A pathological PDF's reader is killed at parse_timeout_seconds and leaves no process."""
    started = time.monotonic()
    with pytest.raises(ParseError, match=r"took longer than 1 s"):
        parse_file("slow.pdf", pathological_pdf(600_000), parse_timeout_seconds=1)
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
    data = sample_bytes(name) if name == "manual.pdf" else pathological_pdf(600_000)
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
        future = pool.submit(parse_file, "slow.pdf", pathological_pdf(600_000),
                             parse_timeout_seconds=1)
        with pytest.raises(ParseError, match="took longer than 1 s"):
            future.result(timeout=30)
    assert time.monotonic() - started < 10
    assert _pdf_children() == []


def test_pdf_that_needs_too_much_memory_fails_with_the_limit():
    """A 70 MB content stream exceeds the child's memory limit; the message names the limit."""
    limit = 128 * 1024 * 1024
    # The limit itself is livable.
    assert parse_file("manual.pdf", max_parse_memory_bytes=limit).blocks
    bomb = one_page_pdf(zlib.compress(b"BT (a) Tj ET " + b" " * (70 * 1024 * 1024), 9))
    with pytest.raises(ParseError, match="more than the 128 MB of memory"):
        parse_file("bomb.pdf", bomb, max_parse_memory_bytes=limit)


def test_crashing_pdf_reader_is_a_parse_error(monkeypatch):
    """If the reader dies from a signal, the editor sees that the file is probably damaged."""
    monkeypatch.setattr(pdf, "_PDF_CHILD_MODULE", "tests.kb.ingestion.crashing_pdf_child")
    with pytest.raises(ParseError, match=r"crashed on manual\.pdf; the file is probably damaged"):
        parse_file("manual.pdf")


def test_pdf_reader_that_cannot_run_blames_the_server_not_the_file(monkeypatch):
    """A reader that fails to start is the server's fault: the message says so, not the file's."""
    monkeypatch.setattr(pdf, "_PDF_CHILD_MODULE", "kb.ingestion.no_such_module")
    with pytest.raises(ParserUnavailableError) as raised:
        parse_file("manual.pdf")
    message = str(raised.value)
    assert "problem on the server, not with the file" in message
    assert "No module named" in message and "damaged" not in message
    monkeypatch.setattr(pdf.sys, "executable", "/nonexistent/python")
    with pytest.raises(ParserUnavailableError, match="could not run its PDF reader"):
        parse_file("manual.pdf")


def test_pdf_parse_overhead_is_small():
    """Starting the reader's child interpreter for a small PDF costs about a second at most."""
    parse_file("manual.pdf")
    started = time.perf_counter()
    for _ in range(3):
        parse_file("manual.pdf")
    assert (time.perf_counter() - started) / 3 < 1.5
