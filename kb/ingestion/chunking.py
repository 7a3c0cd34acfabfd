"""Split a parsed document into token-bounded chunks that are exact slices of its text.

How chunks are cut:
- Blocks are packed greedily, in order, while they fit in max_tokens. A chunk never mixes
  sections (blocks under different heading paths), with one exception: a chunk that holds a
  whole tiny section (under an eighth of the budget, typically a heading followed directly by
  a sub-heading, or a one-line section) continues into the next section when that section is
  a sibling or a child. Its heading_path is then the common prefix of both paths.
- A heading is packed together with the block that follows it, so no chunk ends on a heading.
- A block is split only when it alone exceeds max_tokens: code on line boundaries, other
  text on sentence boundaries, then on whitespace, then (last resort) on characters.
- Overlap: a chunk that continues a section starts with the last whole sentences (code: lines,
  tables: rows) of the previous chunk, up to overlap_tokens. Overlap never crosses a section.
- Every chunk is parsed.text[char_start:char_end], so a citation can point into the source.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kb.ingestion.document import Block, ParsedDocument

# Chunks are also capped in characters, because some tokenizers map a very long unbroken
# string (base64, a hash list) to a single unknown token; 16 characters per token is several
# times what real prose or code needs.
_MAX_CHARS_PER_TOKEN = 16
_TINY_SECTION_FRACTION = 8


@dataclass(frozen=True)
class ChunkDraft:
    """A chunk ready to embed; text is exactly ParsedDocument.text[char_start:char_end]."""

    ordinal: int
    text: str
    token_count: int
    heading_path: tuple[str, ...]
    char_start: int
    char_end: int
    page_start: int | None
    page_end: int | None


@dataclass(frozen=True)
class _Atom:
    """The smallest packable span: a whole block, or a piece of a block too big for one chunk."""

    start: int
    end: int
    tokens: int
    page: int | None
    section: int
    kind: str


class _Cost:
    """Token cost of a span, without the special tokens the tokenizer adds to every input."""

    def __init__(self, count_tokens: Callable[[str], int]) -> None:
        self._count = count_tokens
        # Tokenizers such as BERT's add [CLS]/[SEP] to every call; counting them per sentence
        # would overstate a chunk built from many sentences.
        self.overhead = max(0, count_tokens(""))

    def __call__(self, text: str) -> int:
        return max(0, self._count(text) - self.overhead)


def _section_key(block: Block) -> tuple[str, ...]:
    # A heading belongs to the section it opens, so it is packed with the content below it.
    return (*block.heading_path, block.text) if block.kind == "heading" else block.heading_path


_SENTENCE = re.compile(r"""[.!?…]+["'”’»)\]]*(?=\s)|[。！？]+[」』”’)）]*""")
_ABBREVIATIONS = frozenset({"e.g", "i.e", "mr", "mrs", "ms", "dr", "prof", "st", "vs", "no",
                            "fig", "approx", "cf", "inc", "ltd", "jr", "sr", "etc", "al"})


def _sentence_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans = []
    seg = start
    for match in _SENTENCE.finditer(text, start, end):
        cut = match.end()
        nxt = cut
        while nxt < end and text[nxt].isspace():
            nxt += 1
        if nxt >= end:
            break
        if match.group()[0] in ".!?…":
            if text[nxt].islower():
                continue  # "approx. five", "e.g. this": not a sentence start
            # Only the word before the stop matters; never slice the whole run (quadratic).
            words = text[max(seg, match.start() - 24):match.start()].rsplit(None, 1)
            word = words[-1].lower() if words else ""
            if match.group()[0] == "." and (word in _ABBREVIATIONS or (
                    len(word) == 1 and word.isalpha())):
                continue  # "Dr. Smith", "J. Smith"
        spans.append((seg, cut))
        seg = nxt
    spans.append((seg, end))
    return [(s, e) for s, e in spans if e > s]


def _line_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans = []
    pos = start
    while pos < end:
        newline = text.find("\n", pos, end)
        stop = end if newline == -1 else newline
        if text[pos:stop].strip():
            spans.append((pos, stop))  # keep indentation: it is part of the code
        pos = stop + 1
    return spans


_WORD = re.compile(r"\S+")


def _word_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    return [m.span() for m in _WORD.finditer(text, start, end)]


def _joins_previous(ch: str) -> bool:
    """Characters that must stay with the one before them (combining marks, ZWJ, selectors)."""
    return (unicodedata.combining(ch) > 0 or ch in "\u200d\ufe0e\ufe0f"
            or "\U0001f3fb" <= ch <= "\U0001f3ff")


def _char_spans(text: str, start: int, end: int, budget: int, max_chars: int,
                cost: _Cost) -> list[tuple[int, int]]:
    """Last resort for one unbroken run: the longest prefixes that fit, found by bisection."""
    spans = []
    while start < end:
        hi = min(end, start + max_chars)
        if cost(text[start:hi]) > budget:
            lo, top = start + 1, hi  # cost(text[start:top]) is over budget; lo is assumed to fit
            while top - lo > 1:
                mid = (lo + top) // 2
                if cost(text[start:mid]) <= budget:
                    lo = mid
                else:
                    top = mid
            hi = lo
        cut = hi
        while start + 1 < cut < end and (_joins_previous(text[cut]) or text[cut - 1] == "\u200d"):
            cut -= 1  # do not cut an emoji sequence or an accent off its base character
        spans.append((start, cut))
        start = cut
    return spans


def _split_block(text: str, block: Block, budget: int, max_chars: int,
                 cost: _Cost) -> list[tuple[int, int, int]]:
    """Spans with costs, each within budget, covering a block too big for one chunk."""
    first = _line_spans if block.kind == "code" else _sentence_spans
    levels: list[Callable[[int, int], list[tuple[int, int]]]] = [
        lambda s, e: first(text, s, e),
        lambda s, e: _word_spans(text, s, e),
        lambda s, e: _char_spans(text, s, e, budget, max_chars, cost),
    ]

    def split(start: int, end: int, level: int) -> list[tuple[int, int, int]]:
        out = []
        for s, e in levels[level](start, end):
            tokens = cost(text[s:e])
            if (tokens <= budget and e - s <= max_chars) or level == len(levels) - 1:
                out.append((s, e, tokens))
            else:
                out.extend(split(s, e, level + 1))
        return out

    return split(block.char_start, block.char_end, 0)


def _overlap(text: str, previous: list[_Atom], section: int, limit: int,
             cost: _Cost) -> list[_Atom]:
    """The last sentences (code: lines, tables: rows) of the previous chunk, within limit."""
    picked: list[_Atom] = []
    total = 0
    for atom in reversed(previous):
        if atom.section != section or atom.kind == "heading" or limit <= 0:
            break
        if atom.kind == "table_row":
            units = [(atom.start, atom.end)]
        elif atom.kind == "code":
            units = _line_spans(text, atom.start, atom.end)
        else:
            units = _sentence_spans(text, atom.start, atom.end)
        for start, end in reversed(units):
            tokens = atom.tokens if len(units) == 1 else cost(text[start:end])
            if total + tokens > limit:
                return picked[::-1]
            picked.append(_Atom(start, end, tokens, atom.page, atom.section, atom.kind))
            total += tokens
    return picked[::-1]


def _common_prefix(paths: list[tuple[str, ...]]) -> tuple[str, ...]:
    prefix = paths[0]
    for path in paths[1:]:
        size = 0
        while size < min(len(prefix), len(path)) and prefix[size] == path[size]:
            size += 1
        prefix = prefix[:size]
    return prefix


def _section_groups(parsed: ParsedDocument, cost: _Cost, budget: int, max_chars: int
                    ) -> tuple[list[tuple[str, ...]], list[list[list[_Atom]]]]:
    """Sections (runs of consecutive blocks with the same heading path) and, per section, its
    groups: atoms that must stay in one chunk (a heading and the first thing under it)."""
    text = parsed.text
    paths: list[tuple[str, ...]] = []
    groups_by_section: list[list[list[_Atom]]] = []
    for block in parsed.blocks:
        key = _section_key(block)
        if not paths or paths[-1] != key:
            paths.append(key)
            groups_by_section.append([])
        section = len(paths) - 1
        tokens = cost(block.text)
        groups = groups_by_section[-1]
        heading = groups[-1] if groups and groups[-1][-1].kind == "heading" else None
        if tokens > budget or len(block.text) > max_chars:
            spans = _split_block(text, block, budget, max_chars, cost)
        elif heading and block.kind in ("paragraph", "list_item") and (
                sum(a.tokens for a in heading) + tokens > budget):
            # Rather than leave the heading alone in a chunk, let its first sentences join it.
            spans = _split_block(text, block, budget, max_chars, cost)
        else:
            spans = [(block.char_start, block.char_end, tokens)]
        for start, end, span_tokens in spans:
            atom = _Atom(start, end, span_tokens, block.page, section, block.kind)
            previous = groups[-1] if groups else None
            # A heading travels with the first thing under it when both fit in one chunk.
            if previous and previous[-1].kind == "heading" and (
                    sum(a.tokens for a in previous) + atom.tokens <= budget
                    and end - previous[0].start <= max_chars):
                previous.append(atom)
            else:
                groups.append([atom])
    return paths, groups_by_section


def _pack(text: str, paths: list[tuple[str, ...]], groups_by_section: list[list[list[_Atom]]],
          *, cost: _Cost, budget: int, max_chars: int, overlap_tokens: int) -> list[list[_Atom]]:
    """Fill chunks with whole groups in order; see the module docstring for the rules."""
    chunks: list[list[_Atom]] = []
    current: list[_Atom] = []
    current_tokens = 0
    whole_sections = False  # current started at a section start and carries no overlap
    tiny = max(1, budget // _TINY_SECTION_FRACTION)
    for section, groups in enumerate(groups_by_section):
        if not groups:
            continue
        first_tokens = sum(a.tokens for a in groups[0])
        if current:
            last_path = paths[current[-1].section]
            related = paths[section][: max(0, len(last_path) - 1)] == last_path[:-1]
            if not (whole_sections and current_tokens < tiny and related
                    and current_tokens + first_tokens <= budget
                    and groups[0][-1].end - current[0].start <= max_chars):
                chunks.append(current)
                current, current_tokens = [], 0
        if not current:
            whole_sections = True
        for group in groups:
            tokens = sum(a.tokens for a in group)
            if current and (current_tokens + tokens > budget
                            or group[-1].end - current[0].start > max_chars):
                chunks.append(current)
                limit = min(overlap_tokens, budget - tokens)
                current = _overlap(text, current, section, limit, cost)
                # The character cap wins over overlap.
                while current and group[-1].end - current[0].start > max_chars:
                    current.pop(0)
                current_tokens = sum(a.tokens for a in current)
                whole_sections = False
            current.extend(group)
            current_tokens += tokens
    if current:
        chunks.append(current)
    return chunks


def _draft(ordinal: int, atoms: list[_Atom], text: str, paths: list[tuple[str, ...]],
           count_tokens: Callable[[str], int]) -> ChunkDraft:
    start, end = atoms[0].start, atoms[-1].end
    chunk_text = text[start:end]
    pages = [a.page for a in atoms if a.page is not None]
    return ChunkDraft(
        ordinal=ordinal,
        text=chunk_text,
        token_count=count_tokens(chunk_text),
        heading_path=_common_prefix([paths[a.section] for a in atoms]),
        char_start=start,
        char_end=end,
        page_start=min(pages) if pages else None,
        page_end=max(pages) if pages else None,
    )


def chunk_document(*, parsed: ParsedDocument, count_tokens: Callable[[str], int],
                   max_tokens: int = 256, overlap_tokens: int = 32) -> list[ChunkDraft]:
    """Pack a document's blocks into chunks of at most max_tokens, following its sections."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be positive")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError("overlap_tokens must be at least 0 and less than max_tokens")
    cost = _Cost(count_tokens)
    budget = max_tokens - cost.overhead
    if budget < 1:
        raise ValueError("max_tokens leaves no room after the tokenizer's special tokens")
    max_chars = budget * _MAX_CHARS_PER_TOKEN
    paths, groups_by_section = _section_groups(parsed, cost, budget, max_chars)
    chunks = _pack(parsed.text, paths, groups_by_section, cost=cost, budget=budget,
                   max_chars=max_chars, overlap_tokens=overlap_tokens)
    return [_draft(ordinal, atoms, parsed.text, paths, count_tokens)
            for ordinal, atoms in enumerate(chunks)]


def embedding_input(*, title: str, heading_path: Sequence[str], text: str) -> str:
    """The text given to the embedder: title and heading path as context, then the chunk."""
    context: list[str] = []
    seen: set[str] = set()
    for part in (title, *heading_path):
        part = " ".join(part.split())
        if part and part.casefold() not in seen:
            seen.add(part.casefold())
            context.append(part)
    return f"{' > '.join(context)}\n\n{text}" if context else text
