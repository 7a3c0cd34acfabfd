"""HTML pages: boilerplate removed, then trafilatura's article or a walk of the structure."""

from __future__ import annotations

import re
import warnings
from typing import Any

from kb.ingestion.document import ParsedDocument, ParseLimits
from kb.ingestion.sniff import HTML_MIME
from kb.ingestion.text import BlockBuilder, decode_text, prose, stem, table_row_text

_CHARSET_IN_HTML = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""",
                              re.IGNORECASE)


def _ignore_xml_parsed_as_html(warning: type[Warning]) -> None:
    # An upload named .html is parsed as HTML even when it looks like XML (XHTML does):
    # that is the point, not something to warn about in the worker's log. One filter on
    # the class, added only when missing: catch_warnings would swap the process's filters
    # under other threads, each filterwarnings call resets every module's warning cache,
    # and whatever restores the filters (a catch_warnings block, pytest after each test)
    # may have removed it since.
    if not any(action == "ignore" and category is warning
               for action, _, category, _, _ in warnings.filters):
        warnings.filterwarnings("ignore", category=warning)


def fragment_text(fragment: str) -> str:
    """The text of an HTML fragment, such as the inline HTML of a Markdown file."""
    from bs4 import BeautifulSoup, XMLParsedAsHTMLWarning

    # Markdown's inline HTML, which may look like XML too (as in parse_html).
    _ignore_xml_parsed_as_html(XMLParsedAsHTMLWarning)
    return BeautifulSoup(fragment, "lxml").get_text(" ")


_BOILERPLATE_TAGS = ("script", "style", "noscript", "template", "iframe", "svg", "canvas", "nav",
                     "footer", "aside", "form", "button", "select", "textarea", "object", "embed",
                     "dialog")
_BOILERPLATE_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search", "dialog"}
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.IGNORECASE)
# Real pages nest a few dozen levels; far deeper trees are hostile and would exhaust the
# recursion of the structural walk and of the extractors, so they are read as flat text.
_MAX_HTML_DEPTH = 400
_BLOCK_TAGS = {"address", "article", "aside", "blockquote", "body", "dd", "details", "div", "dl",
               "dt", "fieldset", "figcaption", "figure", "footer", "header", "hr", "li", "main",
               "nav", "ol", "p", "pre", "section", "table", "tbody", "thead", "tfoot", "tr", "td",
               "th", "ul", "h1", "h2", "h3", "h4", "h5", "h6", "summary", "caption", "html"}


def _html_title(soup: Any) -> str:
    if soup.title and soup.title.get_text(strip=True):
        return str(soup.title.get_text(" ", strip=True))
    og = soup.find("meta", attrs={"property": "og:title"})
    if og and og.get("content", "").strip():
        return str(og["content"])
    h1 = soup.find("h1")
    return str(h1.get_text(" ", strip=True)) if h1 else ""


def _is_boilerplate(tag: Any, in_main: bool, page_has_main: bool) -> bool:
    name = (tag.name or "").lower()
    if name in _BOILERPLATE_TAGS:
        return True
    if name == "header" and not in_main:
        # A header inside the article holds its title; the page-wide one holds logo and menu.
        # Pages without <main>/<article> often put their only h1 in <header>, so keep that one.
        return page_has_main or tag.find(["h1", "h2"]) is None
    attrs = tag.attrs or {}
    return (attrs.get("role") in _BOILERPLATE_ROLES or "hidden" in attrs
            or attrs.get("aria-hidden") == "true"
            or bool(_HIDDEN_STYLE.search(str(attrs.get("style") or ""))))


def _strip_boilerplate(soup: Any) -> int:
    """Remove the page furniture that semantic HTML marks as such; return the tree depth."""
    from bs4 import Tag

    page_has_main = soup.find(["article", "main"]) is not None
    doomed = []
    depth = 0
    # Iterative on purpose: hostile pages nest tens of thousands of elements deep.
    stack = [(soup, False, 0)]
    while stack:
        node, in_main, level = stack.pop()
        depth = max(depth, level)
        for child in node.children:
            if not isinstance(child, Tag):
                continue
            if _is_boilerplate(child, in_main, page_has_main):
                doomed.append(child)
            else:
                stack.append((child, in_main or child.name in ("article", "main"), level + 1))
    for tag in doomed:
        tag.decompose()
    return depth


def _flat_html(soup: Any, builder: BlockBuilder) -> None:
    """Paragraphs from the page's text lines, for trees too deep to walk."""
    for line in soup.get_text("\n").split("\n"):
        builder.add(line, "paragraph")


def _html_text(tag: Any) -> str:
    """Text of an element; block children and <br> separate words, inline tags do not."""
    from bs4 import NavigableString, Tag
    from bs4.element import Comment, Doctype, ProcessingInstruction

    parts = []
    for node in tag.descendants:
        if isinstance(node, NavigableString):
            if not isinstance(node, (Comment, Doctype, ProcessingInstruction)):
                parts.append(str(node))
        elif isinstance(node, Tag) and (node.name in _BLOCK_TAGS or node.name == "br"):
            parts.append(" ")
    return "".join(parts)


def _walk_html(node: Any, builder: BlockBuilder) -> None:
    """Structural fallback: headings, pre, list items and table rows from the cleaned DOM."""
    from bs4 import NavigableString, Tag
    from bs4.element import Comment, Doctype, ProcessingInstruction

    inline: list[str] = []

    def flush() -> None:
        if inline:
            builder.add("".join(inline), "paragraph")
            inline.clear()

    for child in node.children:
        if isinstance(child, (Comment, Doctype, ProcessingInstruction)):
            continue
        if isinstance(child, NavigableString):
            inline.append(str(child))
            continue
        if not isinstance(child, Tag):
            continue
        name = child.name.lower() if child.name else ""
        if name in ("h1", "h2", "h3", "h4", "h5", "h6"):
            flush()
            builder.heading(_html_text(child), int(name[1]))
        elif name == "pre":
            flush()
            builder.add(child.get_text(), "code")
        elif name == "li":
            flush()
            nested = [n.extract() for n in child.find_all(["ul", "ol", "table", "pre"])]
            builder.add(_html_text(child), "list_item")
            for sub in nested:
                _walk_html_container(sub, builder)
        elif name == "table":
            flush()
            _html_table(child, builder)
        elif name == "br":
            inline.append(" ")
        elif name == "p":
            flush()
            builder.add(_html_text(child), "paragraph")
        elif name in _BLOCK_TAGS or name == "head":
            flush()
            if name != "head":
                _walk_html(child, builder)
        else:
            inline.append(_html_text(child))
    flush()


def _walk_html_container(node: Any, builder: BlockBuilder) -> None:
    if node.name == "table":
        _html_table(node, builder)
    elif node.name == "pre":
        builder.add(node.get_text(), "code")
    else:
        _walk_html(node, builder)


def _html_table(table: Any, builder: BlockBuilder) -> None:
    header: list[str] = []
    emitted = False
    for tr in table.find_all("tr"):
        if tr.find_parent("table") is not table:
            continue  # nested tables are read with their own rows
        cells = tr.find_all(["th", "td"], recursive=False)
        texts = [prose(_html_text(cell)) for cell in cells]
        if not any(texts):
            continue
        if cells and all(cell.name == "th" for cell in cells) and not header:
            header = texts
            continue
        builder.add(table_row_text(header, texts), "table_row")
        emitted = True
    if header and not emitted:
        builder.add(" | ".join(header), "table_row")


def _xml_text(element: Any) -> str:
    """Text of a trafilatura XML element; <lb/> becomes a space so words do not fuse."""
    parts = [element.text or ""]
    for child in element:
        parts.append(" " if child.tag == "lb" else _xml_text(child))
        parts.append(child.tail or "")
    return "".join(parts)


def _walk_trafilatura(element: Any, builder: BlockBuilder) -> None:
    for child in element:
        tag = child.tag
        if tag == "head":
            rend = child.get("rend") or "h2"
            level = int(rend[1]) if re.fullmatch(r"h[1-6]", rend) else 2
            builder.heading(_xml_text(child), level)
        elif tag == "code":
            builder.add(_xml_text(child), "code")
        elif tag == "list":
            for item in child:
                if item.tag != "item":
                    continue
                nested = [sub for sub in item if sub.tag in ("list", "table", "code")]
                for sub in nested:
                    item.remove(sub)
                builder.add(_xml_text(item), "list_item")
                _walk_trafilatura(nested, builder)
        elif tag == "table":
            header: list[str] = []
            emitted = False
            for row in child.iter("row"):
                cells = [prose(_xml_text(cell)) for cell in row if cell.tag == "cell"]
                if not any(cells):
                    continue
                if not header and not emitted and all(
                        cell.get("role") == "head" for cell in row if cell.tag == "cell"):
                    header = cells
                    continue
                builder.add(table_row_text(header, cells), "table_row")
                emitted = True
            if header and not emitted:
                builder.add(" | ".join(header), "table_row")
        elif tag in ("p", "quote", "item"):
            builder.add(_xml_text(child), "paragraph")
        elif tag in ("main", "div", "doc"):
            _walk_trafilatura(child, builder)


def _trafilatura_builder(html: str) -> BlockBuilder | None:
    from lxml import etree

    try:
        # Imported lazily and guarded: trafilatura needs lxml_html_clean, and a missing extra
        # should degrade to the structural walk rather than break every HTML upload.
        import trafilatura

        xml = trafilatura.extract(html, output_format="xml", include_comments=False,
                                  include_tables=True, include_formatting=False,
                                  include_links=False, include_images=False, deduplicate=False)
    except Exception:
        return None  # an extractor bug must fall back to the structural walk, not fail the upload
    if not xml:
        return None
    root = etree.fromstring(xml.encode("utf-8"))
    builder = BlockBuilder()
    main = root.find("main")
    _walk_trafilatura(main if main is not None else root, builder)
    return builder


def parse_html(name: str, data: bytes, limits: ParseLimits) -> ParsedDocument:
    """The main content without page furniture: trafilatura's reading or the structural walk."""
    from bs4 import BeautifulSoup, XMLParsedAsHTMLWarning

    declared = _CHARSET_IN_HTML.search(data[:4096])
    html, encoding = decode_text(name, data,
                                 declared=declared.group(1).decode("ascii") if declared else None)
    _ignore_xml_parsed_as_html(XMLParsedAsHTMLWarning)
    soup = BeautifulSoup(html, "lxml")
    title = _html_title(soup)
    if _strip_boilerplate(soup) > _MAX_HTML_DEPTH:
        builder = BlockBuilder()
        _flat_html(soup, builder)
        return builder.build(title=title or stem(name), mime_type=HTML_MIME,
                             metadata={"encoding": encoding, "extractor": "flat-text"})
    extracted = _trafilatura_builder(str(soup))
    fallback = BlockBuilder()
    _walk_html(soup, fallback)  # after str(soup): the walk detaches nested lists
    # trafilatura's main extractor finds the article among non-semantic boilerplate, but on
    # short pages it falls back to a baseline that flattens everything into one paragraph;
    # then the structural walk of the already de-boilerplated DOM is the better reading.
    use_walk = extracted is None or not extracted.blocks or (
        len(extracted.blocks) == 1 and len(fallback.blocks) > 1
        and len(extracted.blocks[0].text) >= 0.8 * sum(len(b.text) for b in fallback.blocks))
    builder = fallback if use_walk or extracted is None else extracted
    title = title or builder.first_heading(1) or stem(name)
    metadata: dict[str, Any] = {"encoding": encoding,
                                "extractor": "html-structure" if use_walk else "trafilatura"}
    return builder.build(title=title, mime_type=HTML_MIME, metadata=metadata)
