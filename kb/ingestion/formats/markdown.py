"""Markdown (CommonMark with tables): headings nest, fences are code, table rows name columns."""

from __future__ import annotations

import re
from typing import Any

from kb.ingestion.document import ParsedDocument, ParseLimits
from kb.ingestion.formats.html import fragment_text
from kb.ingestion.sniff import MARKDOWN_MIME
from kb.ingestion.text import BlockBuilder, clean, decode_text, prose, stem, table_row_text

_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?\n)(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.DOTALL)
_FM_TITLE = re.compile(r"""^title\s*:\s*(?:"([^"\n]*)"|'([^'\n]*)'|([^\n#]*))""", re.MULTILINE)


def _inline_text(token: Any) -> str:
    parts: list[str] = []
    for child in token.children or ():
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
        elif child.type == "image":
            parts.append(child.content)  # alt text
    return "".join(parts)


def _split_front_matter(source: str) -> tuple[str, str]:
    """The front matter's title ("" if none) and the source without its front matter."""
    match = _FRONT_MATTER.match(source)
    if not match:
        return "", source
    front_title = ""
    title_match = _FM_TITLE.search(match.group(1))
    if title_match:
        front_title = next(g for g in title_match.groups() if g is not None).strip()
    return front_title, source[match.end():]


def _add_tokens(tokens: list[Any], builder: BlockBuilder) -> None:
    containers: list[str] = []
    header: list[str] = []
    row: list[str] = []
    table_has_body = False
    for index, token in enumerate(tokens):
        kind = token.type
        if kind == "heading_open":
            builder.heading(_inline_text(tokens[index + 1]), int(token.tag[1:]))
        elif kind == "inline" and tokens[index - 1].type == "paragraph_open":
            builder.add(_inline_text(token),
                        "list_item" if "list_item" in containers else "paragraph")
        elif kind in ("fence", "code_block"):
            builder.add(token.content, "code")
        elif kind == "html_block":
            builder.add(fragment_text(token.content), "paragraph")
        elif kind.endswith("_open") and kind in ("list_item_open", "blockquote_open"):
            containers.append(kind[: -len("_open")])
        elif kind in ("list_item_close", "blockquote_close") and containers:
            containers.pop()
        elif kind == "table_open":
            header, table_has_body = [], False
        elif kind == "tr_open":
            row = []
        elif kind == "inline" and tokens[index - 1].type in ("th_open", "td_open"):
            row.append(prose(_inline_text(token)))
        elif kind == "tr_close":
            if tokens[index - 1].type == "th_close" and not header and not table_has_body:
                header = row
            else:
                table_has_body = True
                builder.add(table_row_text(header, row), "table_row")
        elif kind == "table_close" and not table_has_body and header:
            builder.add(" | ".join(header), "table_row")


def parse_markdown(name: str, data: bytes, limits: ParseLimits) -> ParsedDocument:
    """The title is the front matter's, else the first h1, else the file name."""
    from markdown_it import MarkdownIt

    source, encoding = decode_text(name, data)
    front_title, source = _split_front_matter(clean(source))
    md = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    builder = BlockBuilder()
    _add_tokens(md.parse(source), builder)
    title = front_title or builder.first_heading(1) or stem(name)
    metadata: dict[str, Any] = {"encoding": encoding}
    if front_title:
        metadata["front_matter_title"] = front_title
    return builder.build(title=title, mime_type=MARKDOWN_MIME, metadata=metadata)
