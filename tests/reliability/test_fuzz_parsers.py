"""Hostile bytes through the parsers: only ParseError ever comes out, and nothing hangs.

Hypothesis feeds `parse_document` and `extract_archive` random bytes, the real samples in
fixtures/samples/ truncated, bit-flipped, spliced and renamed, Word files whose XML parts
are mutated and repacked, markup soup, and random (and then damaged) zips. The contract
under test:

- the only exception is `ParseError` (its message is shown to editors);
- every parse finishes well inside a deadline (PDFs run in a killable child with a short
  timeout here; a watchdog turns a real hang into a failure instead of a stuck CI);
- a successful parse is internally consistent: each block, and each chunk of any chunking,
  is exactly `text[char_start:char_end]`;
- an archive yields only safe relative names and never inflates past its limits.

The example counts are written to KB_RELIABILITY_STATS for docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import io
import signal
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kb.ingestion.archives import ArchiveLimits, extract_archive
from kb.ingestion.chunking import chunk_document
from kb.ingestion.document import ParsedDocument, ParseError, ParseLimits
from kb.ingestion.parsing import parse_document
from tests.reliability.stats import fuzz_count

# Random member names repeat; zipfile warns about each duplicate it is asked to write.
pytestmark = pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "samples"
SAMPLES = {path.name: path.read_bytes() for path in sorted(SAMPLES_DIR.iterdir())}

EXAMPLES = 200
# PDFs are read in a forked child that is killed at parse_timeout_seconds; the deadline
# leaves room for that (a timed-out PDF is a ParseError, which is the correct outcome).
LIMITS = ParseLimits(max_file_bytes=2 * 1024 * 1024, max_pdf_pages=50,
                     parse_timeout_seconds=5.0, max_uncompressed_bytes=4 * 1024 * 1024)
ARCHIVE_LIMITS = ArchiveLimits(max_total_uncompressed_bytes=256 * 1024, max_entries=24,
                               max_member_bytes=96 * 1024, max_compression_ratio=50.0)
WATCHDOG_SECONDS = 20
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=10_000,  # ms per example
    database=None,  # keep no .hypothesis/ directory in the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
EXTENSIONS = [".pdf", ".docx", ".html", ".htm", ".md", ".txt", ".csv", ".zip", ".doc", ".bin",
              ""]


@pytest.fixture(autouse=True)
def _isolated_settings():
    """Pure functions: replace the suite-wide Django settings fixture with nothing."""


class Hang(BaseException):
    """Raised by the watchdog. A BaseException, so a parser's `except Exception` can't eat it."""


@contextlib.contextmanager
def watchdog(seconds: int = WATCHDOG_SECONDS) -> Iterator[None]:
    """Turn a parse that never returns into a failure (SIGALRM; not inherited by forks)."""

    def expired(signum, frame):
        raise Hang(f"parsing did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def words(text: str) -> int:
    return len(text.split())


def quarter_chars(text: str) -> int:
    """~4 characters a token, the OpenAI estimate; splits long unbroken strings."""
    return (len(text) + 3) // 4


COUNTERS: list[Callable[[str], int]] = [words, quarter_chars]


def parse_or_parse_error(filename: str, data: bytes, *, stat: str | None = None
                        ) -> ParsedDocument | None:
    """parse_document's result, or None for a ParseError; any other exception propagates."""
    try:
        with watchdog():
            parsed = parse_document(filename=filename, data=data, limits=LIMITS)
    except ParseError as exc:
        assert str(exc), "a ParseError must carry a readable reason"
        if stat:
            fuzz_count(stat, "ParseError")
        return None
    if stat:
        fuzz_count(stat, "parsed")
    return parsed


def assert_consistent(parsed: ParsedDocument, data: st.DataObject) -> None:
    """Blocks and chunks are exact slices of the parsed text."""
    assert parsed.blocks
    for block in parsed.blocks:
        assert parsed.text[block.char_start:block.char_end] == block.text
    count = data.draw(st.sampled_from(COUNTERS), label="counter")
    max_tokens = data.draw(st.integers(4, 160), label="max_tokens")
    overlap = data.draw(st.integers(0, max_tokens // 2), label="overlap")
    with watchdog():
        chunks = chunk_document(parsed=parsed, count_tokens=count, max_tokens=max_tokens,
                                overlap_tokens=overlap)
    assert chunks
    for chunk in chunks:
        assert parsed.text[chunk.char_start:chunk.char_end] == chunk.text
        if count is words:
            # The chunker sums the cost of its pieces, so the bound is exact for a counter
            # that is additive over whitespace (as the bundled MiniLM tokenizer is); the
            # 4-characters estimate can overshoot by a token per piece (see the report).
            assert chunk.token_count <= max_tokens


# --- Strategies ----------------------------------------------------------------------------


@st.composite
def mutated_bytes(draw, original: bytes) -> bytes:
    """original damaged by 1-4 of: truncation, byte flips, insertions, deletions, repeats."""
    data = bytearray(original)
    for operation in draw(st.lists(
            st.sampled_from(["truncate", "flip", "insert", "delete", "repeat"]),
            min_size=1, max_size=4)):
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        if operation == "truncate":
            del data[position:]
        elif operation == "flip":
            for _ in range(draw(st.integers(1, 12))):
                index = draw(st.integers(0, len(data) - 1))
                data[index] ^= draw(st.integers(1, 255))
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=64))
        elif operation == "delete":
            del data[position:position + draw(st.integers(1, 256))]
        else:
            piece = bytes(data[position:position + draw(st.integers(1, 128))])
            data[position:position] = piece * draw(st.integers(1, 8))
    return bytes(data)


@st.composite
def mutated_samples(draw) -> tuple[str, bytes]:
    """A real sample, damaged, under its own name or another format's extension."""
    name = draw(st.sampled_from(sorted(SAMPLES)))
    data = draw(mutated_bytes(SAMPLES[name]))
    stem = PurePosixPath(name).stem
    filename = draw(st.sampled_from([name, *(stem + ext for ext in EXTENSIONS)]))
    return filename, data


@st.composite
def docx_with_mutated_parts(draw) -> tuple[str, bytes]:
    """policy.docx unpacked, one or two XML parts damaged or replaced, and repacked."""
    source = zipfile.ZipFile(io.BytesIO(SAMPLES["policy.docx"]))
    parts = {info.filename: source.read(info) for info in source.infolist()}
    xml_parts = sorted(name for name in parts if name.endswith((".xml", ".rels")))
    for target in draw(st.lists(st.sampled_from(xml_parts), min_size=1, max_size=2, unique=True)):
        if draw(st.booleans()):
            parts[target] = draw(mutated_bytes(parts[target]))
        else:
            parts[target] = draw(st.one_of(
                st.binary(max_size=256),
                st.just(b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxxxx">'
                        b'<!ENTITY y "&x;&x;&x;&x;&x;&x;&x;&x;&x;&x;">]><a>&y;&y;</a>'),
                st.just(b"<w:document xmlns:w='x'><w:body><w:p/></w:body></w:document>"),
            ))
    if draw(st.booleans()):
        parts.pop(draw(st.sampled_from(sorted(parts))))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in parts.items():
            archive.writestr(name, content)
    return draw(st.sampled_from(["policy.docx", "policy.zip", "policy.bin"])), buffer.getvalue()


MARKUP = ["# ", "## ", "###### ", "\n", "\n\n", "```", "```python\n", "~~~", "    ", "\t",
          "| a | b |\n|---|---|\n", "| ", " |", "- ", "* ", "1. ", "> ", "---\n", "***",
          "[x](javascript:alert(1))", "![i](data:,)", "<h1>", "</h1>", "<h2 id=x>", "<p>", "</p>",
          "<div>", "</div>", "<table><tr><th>h</th></tr><tr><td>", "</td></tr></table>",
          "<script>alert(1)</script>", "<style>p{}</style>", "<!--", "-->", "<![CDATA[",
          "<nav>menu</nav>", "<main>", "</main>", "<br>", "&amp;", "&#0;", "&#x110000;", "&nbsp;",
          "<meta charset=utf-16>", "<meta charset=\"bogus\">", "<?xml version='1.0'?>",
          "<!DOCTYPE html>", "<html>", "<title>", "</title>", "\x00", "\x0c", "\r\n", "\r",
          "\u2028", "\u200b", "\ufeff", "\u00ad", "\ufb01", "\ud7ff", "e\u0301", "Ω", "日本語。",
          "Word. ", "Sentence one. Sentence two! ", "e.g. ", "x" * 300, " word" * 40]


@st.composite
def markup_soup(draw) -> tuple[str, bytes]:
    """Text built from Markdown/HTML fragments and random text, in a random encoding."""
    pieces = draw(st.lists(st.one_of(st.sampled_from(MARKUP), st.text(max_size=40)),
                           min_size=1, max_size=60))
    text = "".join(pieces)
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32",
                                     "latin-1", "cp1252"]))
    data = text.encode(encoding, errors="replace")
    filename = "page" + draw(st.sampled_from([".md", ".html", ".txt", ".htm", ".csv", ""]))
    return filename, data


HOSTILE_NAMES = ["../evil.txt", "/etc/passwd", "C:\\win\\x.txt", "a/../../b.txt", ".hidden",
                 "__MACOSX/._a.txt", "dir/", "nul\x00.txt", "thumbs.db", "nested.zip",
                 "ok.txt", "OK.TXT", "docs/guide.md", "é/ü.md", "a" * 300 + ".txt",
                 "word/document.xml", "[Content_Types].xml", "./x/./y.txt", "x\\..\\y.txt"]


@st.composite
def random_zips(draw) -> tuple[bytes, bool]:
    """A zip of random members (hostile names, bombs, samples), maybe damaged afterwards."""
    buffer = io.BytesIO()
    methods = [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
    with zipfile.ZipFile(buffer, "w") as archive:
        for _ in range(draw(st.integers(0, 8))):
            name = draw(st.one_of(st.sampled_from(HOSTILE_NAMES),
                                  st.text(min_size=1, max_size=30)))
            content = draw(st.one_of(
                st.binary(max_size=512),
                st.sampled_from(sorted(SAMPLES)).map(SAMPLES.__getitem__),
                # Highly compressible: a small zip bomb for the ratio and size limits.
                st.integers(1, 400_000).map(lambda n: b"\x00" * n),
            ))
            info = zipfile.ZipInfo(name)
            info.compress_type = draw(st.sampled_from(methods))
            if draw(st.integers(0, 9)) == 0:
                info.external_attr = 0o120777 << 16  # a symbolic link
                info.create_system = 3
            archive.writestr(info, content)
    data = buffer.getvalue()
    damaged = draw(st.booleans())
    if damaged:
        data = draw(mutated_bytes(data))
    return data, damaged


# --- Properties ----------------------------------------------------------------------------


@FUZZ
@given(filename=st.sampled_from(["upload" + ext for ext in EXTENSIONS]),
       data=st.binary(min_size=0, max_size=4096))
def test_random_bytes_only_raise_parse_error(filename, data):
    """Random bytes under any name: a ParseError with a reason, or a consistent document."""
    parsed = parse_or_parse_error(filename, data, stat="parse_document: random bytes")
    if parsed is not None:
        assert all(parsed.text[b.char_start:b.char_end] == b.text for b in parsed.blocks)


@FUZZ
@given(case=mutated_samples(), data=st.data())
def test_damaged_samples_only_raise_parse_error_and_chunk_exactly(case, data):
    """Truncated, flipped and spliced real PDFs, DOCX, HTML, Markdown and text files."""
    parsed = parse_or_parse_error(*case, stat="parse_document: damaged samples")
    if parsed is not None:
        assert_consistent(parsed, data)


@FUZZ
@given(case=docx_with_mutated_parts(), data=st.data())
def test_docx_with_damaged_xml_only_raises_parse_error(case, data):
    """Valid zip, damaged Word XML inside (including entity expansion): ParseError or text."""
    parsed = parse_or_parse_error(*case, stat="parse_document: DOCX with damaged XML parts")
    if parsed is not None:
        assert_consistent(parsed, data)


@FUZZ
@given(case=markup_soup(), data=st.data())
def test_markup_soup_parses_to_exact_slices(case, data):
    """Markdown/HTML fragments in any encoding: consistent blocks and exact chunks."""
    parsed = parse_or_parse_error(*case, stat="parse_document: Markdown/HTML soup")
    if parsed is not None:
        assert_consistent(parsed, data)


@FUZZ
@given(case=random_zips())
def test_random_zips_extract_safely_within_limits(case):
    """Any zip, intact or damaged: ParseError, or safe names within the limits."""
    data, _damaged = case
    stat = "extract_archive: random and damaged zips"
    try:
        with watchdog():
            members, skipped = extract_archive(filename="upload.zip", data=data,
                                               limits=ARCHIVE_LIMITS)
    except ParseError as exc:
        assert str(exc)
        fuzz_count(stat, "ParseError")
        return
    fuzz_count(stat, "extracted")
    assert len(members) <= ARCHIVE_LIMITS.max_entries
    assert sum(len(m.data) for m in members) <= ARCHIVE_LIMITS.max_total_uncompressed_bytes
    names = [m.name for m in members]
    assert len({n.casefold() for n in names}) == len(names)
    for member in members:
        assert len(member.data) <= ARCHIVE_LIMITS.max_member_bytes
        parts = member.name.split("/")
        assert not member.name.startswith("/") and ".." not in parts and "" not in parts
        assert "\\" not in member.name and "\x00" not in member.name
        assert not any(part.startswith(".") for part in parts)
    assert all(s.reason for s in skipped)
    # And every extracted member goes on to the parser, which obeys the same contract.
    for member in members[:3]:
        parse_or_parse_error(member.name, member.data)


@FUZZ
@given(case=random_zips())
def test_zips_given_to_parse_document_only_raise_parse_error(case):
    """A zip handed straight to parse_document is refused (or read as DOCX), never a crash."""
    data, _damaged = case
    parse_or_parse_error("upload.docx", data, stat="parse_document: zips named .docx")
