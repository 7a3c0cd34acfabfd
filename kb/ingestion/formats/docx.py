"""Word documents (DOCX): styles give headings and lists; tables are read row by row."""

from __future__ import annotations

import io
import re
import zipfile
from typing import Any

from kb.ingestion.document import ParsedDocument, ParseError, ParseLimits
from kb.ingestion.sniff import DOCX_MIME
from kb.ingestion.text import BlockBuilder, human_size, prose, stem

_HEADING_STYLE = re.compile(r"heading\s*([1-9])", re.IGNORECASE)


def _docx_style(paragraph: Any) -> tuple[str, int | None]:
    """Style name and heading level, following base styles so custom headings count."""
    try:
        style = paragraph.style
    except Exception:
        return "", None  # broken style references are common in converted files
    names = []
    for _ in range(4):
        if style is None:
            break
        names.append(style.name or "")
        style = style.base_style
    for style_name in names:
        if style_name.lower() == "title":
            return style_name, 0
        match = _HEADING_STYLE.fullmatch(style_name.strip())
        if match:
            return style_name, int(match.group(1))
    return (names[0] if names else ""), None


def _check_zip_expansion(name: str, data: bytes, limit: int, label: str) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except Exception as exc:  # zipfile raises NotImplementedError, ValueError... on damage
        raise ParseError(f"{name} is a damaged {label}: {exc}") from exc
    if sum(info.file_size for info in infos) > limit:
        raise ParseError(f"{name} expands to more than {human_size(limit)}; "
                         f"it looks like a zip bomb, not a real {label}.")


def _add_table(table: Any, builder: BlockBuilder) -> None:
    for row in table.rows:
        cells, seen = [], set()
        for cell in row.cells:
            # Merged cells come back once per grid column; keep one copy.
            if id(cell._tc) in seen:
                continue
            seen.add(id(cell._tc))
            cells.append(prose(cell.text))
        if any(cells):
            builder.add(" | ".join(cells), "table_row")


def _core_properties(document: Any) -> tuple[str, dict[str, Any]]:
    """The core title ("" if none) and the author and dates as metadata."""
    metadata: dict[str, Any] = {}
    core_title = ""
    try:
        core = document.core_properties
        core_title = (core.title or "").strip()
        if core.author:
            metadata["author"] = core.author
        for key in ("created", "modified"):
            value = getattr(core, key, None)
            if value is not None:
                metadata[key] = value.isoformat()
    except Exception:
        pass  # broken document properties should not lose the text
    return core_title, metadata


def parse_docx(name: str, data: bytes, limits: ParseLimits) -> ParsedDocument:
    """Heading styles give the heading path, numbered paragraphs are list items."""
    import docx
    from docx.oxml.ns import qn
    from docx.table import Table

    _check_zip_expansion(name, data, limits.max_uncompressed_bytes, "Word document")
    document = docx.Document(io.BytesIO(data))
    builder = BlockBuilder()
    for item in document.iter_inner_content():
        if isinstance(item, Table):
            _add_table(item, builder)
            continue
        style_name, level = _docx_style(item)
        text = item.text
        if level is not None:
            builder.heading(text, level)
            continue
        ppr = item._p.pPr
        is_list = style_name.lower().startswith("list") or (
            ppr is not None and ppr.find(qn("w:numPr")) is not None)
        builder.add(text, "list_item" if is_list else "paragraph")
    core_title, metadata = _core_properties(document)
    title = core_title or builder.first_heading(0) or builder.first_heading() \
        or stem(name)
    return builder.build(title=title, mime_type=DOCX_MIME, metadata=metadata)
