"""HTML pages: boilerplate removed, structure kept, titles and charsets, hostile nesting."""

from __future__ import annotations

import time
import warnings

import pytest

from kb.ingestion.parsing import parse_document
from kb.ingestion.sniff import HTML_MIME
from tests.kb.ingestion.samples import block_texts, parse_file


def test_html_boilerplate_is_removed():
    """Navigation, footer, aside, scripts and styles do not reach the text."""
    parsed = parse_file("article.html")
    assert parsed.mime_type == HTML_MIME
    for boilerplate in ("Bin collections", "All rights reserved", "tracking", "font-family",
                        "Recycling guide", "noopener", "Privacy"):
        assert boilerplate not in parsed.text
    assert "Composting turns kitchen and garden waste" in parsed.text


def test_html_structure_is_kept():
    """h1-h6 are headings, <pre> is one code block, table rows carry their column names."""
    parsed = parse_file("article.html")
    assert parsed.title == "Composting at Home | Green Streets Council"
    assert block_texts(parsed, "heading")[:2] == ["Composting at Home", "What you can compost"]
    (code,) = block_texts(parsed, "code")
    assert code.startswith("def needs_turning(readings):\n    # a heap below 40")
    assert "return min(readings[-3:]) < 40" in code
    assert "Greens: Grass cuttings | Browns: Dry leaves" in block_texts(parsed, "table_row")
    assert len(block_texts(parsed, "list_item")) == 3
    row = next(b for b in parsed.blocks if b.kind == "table_row")
    assert row.heading_path == ("Composting at Home", "What you can compost")


def test_short_html_page_keeps_headings():
    """A short page is not flattened into one paragraph."""
    html = (b"<html><head><title>Opening hours</title></head><body><nav><a href=/>Home</a></nav>"
            b"<h1>Opening hours</h1><p>We open at nine.</p><h2>Holidays</h2>"
            b"<p>Closed on public holidays.</p><pre>Mon-Fri 9-17\nSat    10-14</pre>"
            b"<footer>Copyright</footer></body></html>")
    parsed = parse_file("hours.html", html)
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
    parsed = parse_file("inline.html", html)
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
    parsed = parse_file("deep.html", html)
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
    assert parse_file("untitled-page.html", html).title == title


def test_html_declared_charset_is_used():
    """A windows-1252 page that declares its charset decodes correctly."""
    html = ('<html><head><meta charset="windows-1252"><title>Caf\u00e9</title></head>'
            "<body><p>\u201cQuoted\u201d caf\u00e9 prices \u2013 \u20ac3.</p></body></html>")
    parsed = parse_file("cafe.html", html.encode("cp1252"))
    assert parsed.title == "Caf\u00e9"
    assert "\u201cQuoted\u201d caf\u00e9 prices \u2013 \u20ac3." in parsed.text


@pytest.mark.parametrize("filename, data", [
    ("page.html", b'<?xml version="1.0"?><html><body><p>XHTML body text.</p></body></html>'),
    ("notes.md", b'# Notes\n\n<?xml version="1.0"?><note>Inline markup text.</note>\n'),
])
def test_xml_looking_html_parses_without_a_warning_even_after_filters_were_reset(filename, data):
    """HTML that looks like XML is parsed as HTML on purpose: no XMLParsedAsHTMLWarning,
    also after something (a catch_warnings block) restored the filters of an earlier time."""
    parse_document(filename=filename, data=data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # what pytest's per-test restore did to the filter
        warnings.simplefilter("always")
        parsed = parse_document(filename=filename, data=data)

    assert "text" in parsed.text
    assert not [w for w in caught if w.category.__name__ == "XMLParsedAsHTMLWarning"]
