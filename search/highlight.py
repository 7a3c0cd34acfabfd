"""Snippets with the query's terms marked, built from the lexemes BM25 matched."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from django.utils.html import escape


def highlighted_snippet(text: str, lexemes: Sequence[str], *, width: int = 240) -> str:
    """An HTML-safe window of text around the densest run of query terms, terms in <mark>.

    English stemming maps words to lexemes that are (almost always) prefixes of them, so
    a word matches when it starts with a query lexeme; exact for the `simple` config.
    """
    prefixes = frozenset(lexeme.lower() for lexeme in lexemes if len(lexeme) >= 2)
    pattern = _words_starting_with(prefixes)
    spans = [match.span() for match in pattern.finditer(text)] if pattern else []
    start = _best_window_start(text, spans, width)
    end = min(len(text), start + width)
    if start > 0:
        space = text.find(" ", start, start + 30)
        start = space + 1 if space != -1 else start
    if end < len(text):
        space = text.rfind(" ", end - 30, end)
        end = space if space > start else end
    pieces: list[str] = []
    cursor = start
    for span_start, span_end in spans:
        if span_start < start or span_end > end:
            continue
        pieces.append(escape(text[cursor:span_start]))
        pieces.append(f"<mark>{escape(text[span_start:span_end])}</mark>")
        cursor = span_end
    pieces.append(escape(text[cursor:end]))
    prefix = "… " if start > 0 else ""
    suffix = " …" if end < len(text) else ""
    return prefix + "".join(pieces).strip() + suffix


@lru_cache(maxsize=256)
def _words_starting_with(stems: frozenset[str]) -> re.Pattern | None:
    """Whole words that start with any of the stems, in one regex scan of the text."""
    if not stems:
        return None
    # Longest first, so the alternation tries the most specific stem first.
    alternatives = "|".join(re.escape(stem) for stem in sorted(stems, key=lambda s: (-len(s), s)))
    return re.compile(rf"(?<!\w)(?:{alternatives})\w*", re.IGNORECASE)


def _best_window_start(text: str, spans: list[tuple[int, int]], width: int) -> int:
    if not spans or len(text) <= width:
        return 0
    best_start, best_count = 0, -1
    right = 0
    for left, (span_start, _) in enumerate(spans):
        while right < len(spans) and spans[right][1] <= span_start + width:
            right += 1
        if right - left > best_count:
            best_count, best_start = right - left, span_start
    # Lead in a little so the first term is not the first word.
    return max(0, min(best_start - width // 5, len(text) - width))
