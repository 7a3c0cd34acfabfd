"""Chunking parsed documents: exact slices, structure, token limits and overlap."""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path

import pytest

from kb.ingestion.chunking import ChunkDraft, chunk_document, embedding_input
from kb.ingestion.document import Block, ParsedDocument
from kb.ingestion.parsing import parse_document

SAMPLES = Path(__file__).resolve().parents[3] / "fixtures" / "samples"
SAMPLE_NAMES = ["manual.pdf", "policy.docx", "article.html", "guide.md", "notes-latin1.txt"]


def words(text: str) -> int:
    """Whitespace token counter, a stand-in for a real tokenizer."""
    return len(text.split())


@pytest.fixture(scope="module")
def minilm():
    """Token counter of the real embedding model (all-MiniLM-L6-v2), special tokens included."""
    from tokenizers import Tokenizer

    from kb.providers.onnx_embeddings import BUNDLED_DIR

    tokenizer = Tokenizer.from_file(str(BUNDLED_DIR / "all-MiniLM-L6-v2" / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return lambda text: len(tokenizer.encode(text).ids)


def make_doc(*specs: tuple, title: str = "Doc") -> ParsedDocument:
    """Build a ParsedDocument from (text, kind, heading_path[, page]) tuples, as parsers do."""
    blocks, parts, offset = [], [], 0
    for spec in specs:
        text, kind, path = spec[0], spec[1], tuple(spec[2])
        page = spec[3] if len(spec) > 3 else None
        if parts:
            parts.append("\n\n")
            offset += 2
        blocks.append(Block(text=text, kind=kind, heading_path=path, page=page,
                            char_start=offset, char_end=offset + len(text)))
        parts.append(text)
        offset += len(text)
    return ParsedDocument(title=title, text="".join(parts), blocks=tuple(blocks),
                          mime_type="text/plain", metadata={})


def sample(name: str) -> ParsedDocument:
    return parse_document(filename=name, data=(SAMPLES / name).read_bytes())


def assert_valid(parsed: ParsedDocument, chunks: list[ChunkDraft], count, max_tokens: int):
    """The invariants every chunking must satisfy."""
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert parsed.text[chunk.char_start:chunk.char_end] == chunk.text
        assert chunk.text == chunk.text.strip() or chunk.text.lstrip(" ") == chunk.text.strip()
        assert chunk.token_count == count(chunk.text)
        assert chunk.token_count <= max_tokens
    # Every block's text is covered by some chunk.
    covered = [(c.char_start, c.char_end) for c in chunks]
    for block in parsed.blocks:
        assert any(s <= block.char_start < e for s, e in covered)
        assert any(s < block.char_end <= e for s, e in covered)
    # Chunks move forward.
    for before, after in itertools.pairwise(chunks):
        assert after.char_start > before.char_start
        assert after.char_end > before.char_end


# ---------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("name", SAMPLE_NAMES)
@pytest.mark.parametrize("max_tokens", [24, 64, 256])
def test_chunks_are_exact_slices_for_every_format(name, max_tokens):
    """For every sample format, chunk text is exactly parsed.text[char_start:char_end]."""
    parsed = sample(name)
    chunks = chunk_document(parsed=parsed, count_tokens=words, max_tokens=max_tokens,
                            overlap_tokens=min(8, max_tokens // 4))
    assert chunks
    assert_valid(parsed, chunks, words, max_tokens)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_real_tokenizer_limits_hold(name, minilm):
    """With the model's own tokenizer every chunk fits max_tokens, special tokens included."""
    parsed = sample(name)
    for max_tokens in (32, 128, 256):
        chunks = chunk_document(parsed=parsed, count_tokens=minilm, max_tokens=max_tokens,
                                overlap_tokens=16)
        assert_valid(parsed, chunks, minilm, max_tokens)


def test_output_is_deterministic():
    """The same document always yields the same chunks."""
    parsed = sample("guide.md")
    first = chunk_document(parsed=parsed, count_tokens=words, max_tokens=20, overlap_tokens=5)
    second = chunk_document(parsed=parsed, count_tokens=words, max_tokens=20, overlap_tokens=5)
    assert first == second


# ---------------------------------------------------------------------------- structure


def test_pdf_chunks_keep_pages():
    """PDF chunks carry the pages they came from."""
    parsed = sample("manual.pdf")
    chunks = chunk_document(parsed=parsed, count_tokens=words, max_tokens=256)
    shutdown = next(c for c in chunks if "Stop pump B first" in c.text)
    assert (shutdown.page_start, shutdown.page_end) == (3, 3)
    assert all(c.page_start is not None and c.page_start <= c.page_end for c in chunks)


def test_chunk_spanning_pages_reports_the_range():
    """A chunk that runs over a page break reports first and last page."""
    parsed = make_doc(("End of page one.", "paragraph", (), 1),
                      ("Start of page two.", "paragraph", (), 2))
    (chunk,) = chunk_document(parsed=parsed, count_tokens=words)
    assert (chunk.page_start, chunk.page_end) == (1, 2)


def test_non_pdf_chunks_have_no_pages():
    """Formats without pages leave page_start and page_end empty."""
    chunks = chunk_document(parsed=sample("guide.md"), count_tokens=words)
    assert all(c.page_start is None and c.page_end is None for c in chunks)


def test_heading_path_follows_the_section():
    """A chunk's heading_path is the section it came from, including its own heading."""
    parsed = sample("guide.md")
    chunks = chunk_document(parsed=parsed, count_tokens=words, max_tokens=40)
    rollback = next(c for c in chunks if "redeploy the previous tag" in c.text)
    assert rollback.heading_path == ("Deploying the Tide Tables Service", "Configuration",
                                     "Rolling back")
    assert rollback.text.startswith("Rolling back")


def test_new_section_starts_a_new_chunk():
    """Blocks under different headings are not packed together when the sections are big."""
    body = "A sentence with exactly seven words here. " * 5
    parsed = make_doc(("Alpha", "heading", ()), (body.strip(), "paragraph", ("Alpha",)),
                      ("Beta", "heading", ()), (body.strip(), "paragraph", ("Beta",)))
    chunks = chunk_document(parsed=parsed, count_tokens=words, max_tokens=256)
    assert [c.heading_path for c in chunks] == [("Alpha",), ("Beta",)]
    assert chunks[1].text.startswith("Beta")


def test_tiny_section_joins_its_sub_section():
    """A heading directly followed by a sub-heading is not a chunk on its own."""
    parsed = make_doc(("Guide", "heading", ()), ("Install", "heading", ("Guide",)),
                      ("Run the installer and follow the prompts.", "paragraph",
                       ("Guide", "Install")))
    (chunk,) = chunk_document(parsed=parsed, count_tokens=words, max_tokens=256)
    assert chunk.text.startswith("Guide\n\nInstall\n\nRun the installer")
    assert chunk.heading_path == ("Guide",)


def test_tiny_section_does_not_join_an_unrelated_chapter():
    """A tiny section stays alone rather than merge into a different top-level chapter."""
    parsed = make_doc(("One", "heading", ()), ("Intro", "heading", ("One",)),
                      ("Short.", "paragraph", ("One", "Intro")),
                      ("Two", "heading", ()), ("Other chapter text.", "paragraph", ("Two",)))
    chunks = chunk_document(parsed=parsed, count_tokens=words, max_tokens=256)
    assert [c.heading_path for c in chunks] == [("One",), ("Two",)]


def test_no_chunk_is_only_a_heading():
    """A heading is packed with the start of its section even when the section is long."""
    sentence = "Every sentence in this paragraph has nine words in it."
    parsed = make_doc(("Routine checks", "heading", ()),
                      (" ".join([sentence] * 4), "paragraph", ("Routine checks",)))
    chunks = chunk_document(parsed=parsed, count_tokens=words, max_tokens=38, overlap_tokens=0)
    assert chunks[0].text.startswith("Routine checks\n\nEvery sentence")
    assert all(c.text != "Routine checks" for c in chunks)


def test_code_block_is_never_split_across_chunks():
    """A code block that fits a chunk moves whole to the next chunk instead of being cut."""
    prose = "word " * 50
    code = "\n".join(f"line_{i} = compute({i})" for i in range(30))
    parsed = make_doc((prose.strip(), "paragraph", ()), (code, "code", ()))
    chunks = chunk_document(parsed=parsed, count_tokens=words, max_tokens=100, overlap_tokens=0)
    assert [c.text for c in chunks if "line_0" in c.text] == [code]


def test_table_row_is_never_split():
    """Table rows stay whole; a chunk boundary falls between rows."""
    rows = [f"Name: item {i} | Price: {i}.00 EUR | Stock: {i * 3} units" for i in range(40)]
    parsed = make_doc(*[(row, "table_row", ("Prices",)) for row in rows])
    chunks = chunk_document(parsed=parsed, count_tokens=words, max_tokens=50, overlap_tokens=10)
    for chunk in chunks:
        assert set(chunk.text.split("\n\n")) <= set(rows)


def test_oversized_code_block_splits_on_lines():
    """A code block larger than max_tokens is split only at line ends."""
    lines = [f"    result_{i} = transform(value_{i}, factor={i})" for i in range(200)]
    code = "def run():\n" + "\n".join(lines)
    parsed = make_doc((code, "code", ()))
    chunks = chunk_document(parsed=parsed, count_tokens=words, max_tokens=60, overlap_tokens=8)
    assert len(chunks) > 5
    all_lines = set(code.split("\n"))
    for chunk in chunks:
        assert chunk.token_count <= 60
        assert set(chunk.text.split("\n")) <= all_lines  # whole lines, indentation kept


def test_huge_single_paragraph_splits_on_sentences():
    """A paragraph far over max_tokens is cut at sentence ends, quickly."""
    sentences = [f"Sentence number {i} talks about topic {i % 7} in some detail."
                 for i in range(3000)]
    parsed = make_doc((" ".join(sentences), "paragraph", ()))
    started = time.perf_counter()
    chunks = chunk_document(parsed=parsed, count_tokens=words, max_tokens=128, overlap_tokens=16)
    assert time.perf_counter() - started < 5
    assert_valid(parsed, chunks, words, 128)
    for chunk in chunks:
        assert chunk.text.startswith("Sentence number") and chunk.text.endswith("detail.")


def test_unbroken_string_is_split_as_a_last_resort():
    """A single whitespace-free run longer than max_tokens is still cut within the limit."""
    blob = "QUJD" * 5000
    parsed = make_doc(("Key:", "paragraph", ()), (blob, "paragraph", ()))
    chunks = chunk_document(parsed=parsed, count_tokens=lambda t: len(t) // 4 + len(t.split()),
                            max_tokens=100, overlap_tokens=0)
    assert "".join(c.text for c in chunks if c.text != "Key:").replace("Key:\n\n", "") == blob
    assert all(c.token_count <= 100 for c in chunks)


# ---------------------------------------------------------------------------- overlap


def _long_section() -> ParsedDocument:
    sentences = [f"Fact {i} is stated here in eight words." for i in range(60)]
    return make_doc(("Facts", "heading", ()),
                    (" ".join(sentences[:30]), "paragraph", ("Facts",)),
                    (" ".join(sentences[30:]), "paragraph", ("Facts",)))


def test_overlap_carries_whole_sentences_within_a_section():
    """The next chunk in a section starts with the last sentences of the previous one."""
    parsed = _long_section()
    chunks = chunk_document(parsed=parsed, count_tokens=words, max_tokens=64, overlap_tokens=16)
    assert len(chunks) > 3
    for before, after in itertools.pairwise(chunks):
        assert after.char_start < before.char_end  # they overlap
        shared = parsed.text[after.char_start:before.char_end]
        assert 0 < words(shared) <= 16
        assert re.match(r"Fact \d+ is", shared)  # starts at a sentence start


def test_zero_overlap_gives_disjoint_chunks():
    """With overlap_tokens=0 chunks do not share text."""
    chunks = chunk_document(parsed=_long_section(), count_tokens=words, max_tokens=64,
                            overlap_tokens=0)
    for before, after in itertools.pairwise(chunks):
        assert after.char_start > before.char_end


def test_overlap_never_crosses_a_heading():
    """The first chunk of a new section does not repeat the previous section's text."""
    text = " ".join(f"Point {i} matters a lot." for i in range(40))
    parsed = make_doc(("First", "heading", ()), (text, "paragraph", ("First",)),
                      ("Second", "heading", ()), (text, "paragraph", ("Second",)))
    chunks = chunk_document(parsed=parsed, count_tokens=words, max_tokens=50, overlap_tokens=20)
    second = next(c for c in chunks if c.heading_path == ("Second",))
    assert second.text.startswith("Second")
    previous = chunks[second.ordinal - 1]
    assert previous.char_end < second.char_start


# ---------------------------------------------------------------------------- edge cases


def test_tiny_document_is_one_chunk():
    """A one-line document becomes exactly one chunk."""
    parsed = make_doc(("Hello.", "paragraph", ()))
    assert chunk_document(parsed=parsed, count_tokens=words) == [ChunkDraft(
        ordinal=0, text="Hello.", token_count=1, heading_path=(), char_start=0, char_end=6,
        page_start=None, page_end=None)]


def test_empty_document_has_no_chunks():
    """A document without blocks yields no chunks."""
    assert chunk_document(parsed=make_doc(), count_tokens=words) == []


def test_unicode_emoji_and_cjk(minilm):
    """Emoji, combining accents and CJK text without spaces chunk into exact slices."""
    cjk = "東京は日本の首都です。人口は約千四百万人です。" * 60
    emoji = "Family 👨‍👩‍👧‍👦 trip to the café 🇫🇷 with naïve friends. " * 40
    parsed = make_doc(("日本について", "heading", ()), (cjk, "paragraph", ("日本について",)),
                      (emoji.strip(), "paragraph", ("日本について",)))
    for count in (words, minilm):
        chunks = chunk_document(parsed=parsed, count_tokens=count, max_tokens=48,
                                overlap_tokens=8)
        assert_valid(parsed, chunks, count, 48)
        for chunk in chunks:
            assert not chunk.text.startswith(("\u200d", "\u0301", "\ufe0f"))
    cjk_chunks = chunk_document(parsed=parsed, count_tokens=minilm, max_tokens=48)
    middle = [c for c in cjk_chunks if "東京" in c.text][1:-1]
    assert middle and all(c.text.endswith("。") for c in middle)  # cut at sentence ends


def test_unbroken_emoji_run_is_not_cut_inside_a_sequence(minilm):
    """The last-resort character split keeps ZWJ emoji sequences whole."""
    family = "👨‍👩‍👧‍👦"
    parsed = make_doc((family * 300, "paragraph", ()))
    chunks = chunk_document(parsed=parsed, count_tokens=minilm, max_tokens=40, overlap_tokens=0)
    assert len(chunks) > 1
    for chunk in chunks:
        assert chunk.text.startswith("👨") and chunk.text.endswith("👦")


def test_special_tokens_are_accounted_for():
    """A tokenizer that adds fixed special tokens still yields chunks within max_tokens."""
    def with_specials(text: str) -> int:
        return words(text) + 2

    parsed = _long_section()
    chunks = chunk_document(parsed=parsed, count_tokens=with_specials, max_tokens=40,
                            overlap_tokens=8)
    assert_valid(parsed, chunks, with_specials, 40)
    assert max(c.token_count for c in chunks) > 30  # the budget is used, not wasted


def test_tokens_are_counted_on_pieces_not_growing_strings():
    """Tokenizer work stays proportional to the document, not quadratic in chunk size."""
    counted = 0

    def counting(text: str) -> int:
        nonlocal counted
        counted += len(text)
        return words(text)

    paragraphs = [f"Paragraph {i} explains one more step of the process in detail." for i in
                  range(2000)]
    parsed = make_doc(*[(p, "paragraph", ()) for p in paragraphs])
    chunk_document(parsed=parsed, count_tokens=counting, max_tokens=256, overlap_tokens=32)
    assert counted < 3 * len(parsed.text)


@pytest.mark.parametrize(("max_tokens", "overlap"), [(0, 0), (10, 10), (10, -1)])
def test_invalid_limits_are_rejected(max_tokens, overlap):
    """Nonsensical limits are a programming error (ValueError), not silent output."""
    with pytest.raises(ValueError):
        chunk_document(parsed=make_doc(("x", "paragraph", ())), count_tokens=words,
                       max_tokens=max_tokens, overlap_tokens=overlap)


# ---------------------------------------------------------------------------- embedding input


def test_embedding_input_puts_context_first():
    """Title and heading path come before the chunk text."""
    assert embedding_input(title="Manual", heading_path=("Pumps", "Starting"),
                           text="Start pump A.") == "Manual > Pumps > Starting\n\nStart pump A."


def test_embedding_input_skips_repeats_and_blanks():
    """A heading equal to the title is not repeated; no context means just the text."""
    assert embedding_input(title="Guide", heading_path=("Guide", "Setup"),
                           text="Body.") == "Guide > Setup\n\nBody."
    assert embedding_input(title="", heading_path=(), text="Body.") == "Body."
