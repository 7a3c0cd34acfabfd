"""Markdown: headings, code, tables, titles and inline markup."""

from __future__ import annotations

import pytest

from kb.ingestion.sniff import MARKDOWN_MIME
from tests.kb.ingestion.samples import block_texts, parse_file


def test_markdown_structure():
    """ATX and setext headings nest; a fenced block is one code block with its blank line."""
    parsed = parse_file("guide.md")
    assert parsed.mime_type == MARKDOWN_MIME
    assert parsed.title == "Deploying the Tide Tables Service"
    assert "owner: platform team" not in parsed.text  # front matter is not content
    assert "Configuration" in block_texts(parsed, "heading")  # setext heading
    codes = block_texts(parsed, "code")
    assert codes[0] == ("docker build -t tides:latest .\n\n# the tag must match the release "
                        "number\ndocker tag tides:latest registry.example.org/tides:2.4.1")
    assert codes[1] == "tides deploy --tag 2.4.0"  # indented code
    rollback = next(b for b in parsed.blocks if b.text.startswith("If the new release"))
    assert rollback.heading_path == ("Deploying the Tide Tables Service", "Configuration",
                                     "Rolling back")
    assert block_texts(parsed, "list_item")[1] == "A production role in the cloud console"


def test_markdown_table_rows_carry_the_header():
    """Each table row is one block that names its columns."""
    rows = block_texts(parse_file("guide.md"), "table_row")
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
    assert parse_file("howto.md", source).title == title


def test_markdown_inline_markup_is_plain_text():
    """Links keep their text, emphasis and inline code lose their markers."""
    parsed = parse_file("x.md", b"See [the docs](https://example.org) for **bold** and `code`.")
    assert block_texts(parsed) == ["See the docs for bold and code."]
