"""Text shared by every format: decoding bytes, normalising extracted text, building blocks."""

from __future__ import annotations

import re
import unicodedata
from pathlib import PurePath
from typing import Any

from kb.ingestion.document import Block, ParsedDocument, ParseError

# ---------------------------------------------------------------------------- encodings

_BOMS: tuple[tuple[bytes, str], ...] = (
    # UTF-32 first: its little-endian BOM starts with the UTF-16 one.
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


def bom_encoding(head: bytes) -> str | None:
    """The encoding a byte-order mark at the start names, if there is one."""
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    return None


def utf16_without_bom(head: bytes) -> str | None:
    """Spot BOM-less UTF-16 by its NUL byte on one side of (mostly ASCII) characters."""
    sample = head[:4096]
    if len(sample) < 8:
        return None
    even, odd = sample[0::2], sample[1::2]
    if odd.count(0) > 0.4 * len(odd) and even.count(0) < 0.05 * len(even):
        return "utf-16-le"
    if even.count(0) > 0.4 * len(even) and odd.count(0) < 0.05 * len(odd):
        return "utf-16-be"
    return None


_NON_ASCII = re.compile("[^\x00-\x7f]")
# Bytes where cp1252 has printable characters (curly quotes, euro) but latin-1 has controls.
_C1_BYTES = re.compile(b"[\x80-\x9f]")


def decode_text(name: str, data: bytes, *, declared: str | None = None) -> tuple[str, str]:
    """Decode text bytes and name the encoding; ParseError if they are not text."""
    encoding = bom_encoding(data) or utf16_without_bom(data[:4096])
    if encoding:
        try:
            return _checked_text(name, data.decode(encoding)), encoding.replace("-sig", "")
        except UnicodeDecodeError as exc:
            raise ParseError(f"{name} is not text: it is not valid {encoding}.") from exc
    if b"\x00" in data:
        raise ParseError(f"{name} is not text: it contains binary data.")
    try:
        return _checked_text(name, data.decode("utf-8")), "utf-8"
    except UnicodeDecodeError:
        pass
    # Mostly-valid UTF-8 with a stray byte (a bad copy-paste) is still UTF-8, not cp1252
    # mojibake; legacy 8-bit text fails on nearly every non-ASCII byte instead.
    sample = data[:1_000_000].decode("utf-8", errors="replace")
    errors = sample.count("\ufffd")
    if len(_NON_ASCII.findall(sample)) - errors >= 10 * errors:
        return _checked_text(name, data.decode("utf-8", errors="replace")), "utf-8"
    if declared:
        try:
            return _checked_text(name, data.decode(declared)), declared.lower()
        except (LookupError, UnicodeDecodeError):
            pass
    from charset_normalizer import from_bytes
    from charset_normalizer.md import mess_ratio

    # charset-normalizer breaks ties between Western code pages arbitrarily (French in latin-1
    # comes back as cp1250), so try the commonest legacy encoding first and keep it when the
    # result reads cleanly; wrong guesses (Cyrillic, Greek, Polish) score a mess ratio near 1.
    try:
        western = data.decode("cp1252")
    except UnicodeDecodeError:
        western = None
    if western is not None and mess_ratio(western[:65536], 1.0) < 0.15:
        has_c1 = _C1_BYTES.search(data) is not None
        return _checked_text(name, western), "cp1252" if has_c1 else "latin-1"
    best = from_bytes(data).best()
    if best is None:
        raise ParseError(f"{name} is not text: its bytes do not decode in any known encoding.")
    return _checked_text(name, str(best)), best.encoding


def _checked_text(name: str, text: str) -> str:
    sample = text[:65536]
    bad = sum(1 for ch in sample if (ch < " " and ch not in "\t\n\r\f") or ch == "\ufffd")
    if bad > max(8, 0.02 * len(sample)):  # a few stray controls in a short file are noise
        raise ParseError(f"{name} is not text: it is full of control characters (binary data?).")
    return text


# ---------------------------------------------------------------------------- cleaning

_LINEBREAKS = str.maketrans({"\r": "\n", "\x0b": "\n", "\x0c": "\n", "\x85": "\n",
                             "\u2028": "\n", "\u2029": "\n"})
# C0/C1 controls except tab and newline, BOM/noncharacters, lone surrogates (they cannot be
# stored as UTF-8), and the soft hyphen, which is an invisible hyphenation hint.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u00ad\ufeff\ufffe\uffff\ud800-\udfff]")
_WS = re.compile(r"\s+")


def clean(text: str) -> str:
    """One kind of line break, no control characters, NFC: all extracted text goes through it."""
    text = text.replace("\r\n", "\n").translate(_LINEBREAKS)
    return unicodedata.normalize("NFC", _CONTROL.sub("", text))


def prose(text: str) -> str:
    """Cleaned text on one line, runs of whitespace collapsed: headings, paragraphs, cells."""
    return _WS.sub(" ", clean(text)).strip()


def code_text(text: str) -> str:
    """Cleaned code: lines and indentation kept, trailing blanks and blank edges dropped."""
    lines = [line.rstrip() for line in clean(text).split("\n")]
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


def table_row_text(header: list[str], cells: list[str]) -> str:
    """One table row as text, each cell named by its column header when the header fits."""
    # Each row carries its column names so a row retrieved on its own still makes sense.
    if header and len(header) == len(cells):
        return " | ".join(f"{h}: {c}" if h else c
                          for h, c in zip(header, cells, strict=True) if c or h)
    return " | ".join(cells)


def stem(filename: str) -> str:
    """The file name without folders or extension: the title of last resort."""
    name = PurePath(filename.replace("\\", "/")).name
    return PurePath(name).stem or name or "Untitled"


def human_size(size: int) -> str:
    """A byte count as editors read it: "1.5 MB"."""
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MB"
    if size >= 1024:
        return f"{size / 1024:.1f} KB"
    return f"{size} bytes"


class BlockBuilder:
    """Accumulates blocks, tracks the heading stack and keeps offsets into the joined text."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._blocks: list[Block] = []
        self._length = 0
        self._stack: list[tuple[int, str]] = []

    @property
    def path(self) -> tuple[str, ...]:
        """The headings above the next block, outermost first."""
        return tuple(text for _, text in self._stack)

    @property
    def blocks(self) -> list[Block]:
        """The blocks so far, in document order."""
        return self._blocks

    def heading(self, text: str, level: int, *, page: int | None = None, emit: bool = True) -> None:
        """Open a section at level (closing deeper ones); emit=False only sets the path."""
        text = prose(text)
        if not text:
            return
        while self._stack and self._stack[-1][0] >= level:
            self._stack.pop()
        if emit:
            self._append(text, "heading", page, level)
        self._stack.append((level, text))

    def add(self, text: str, kind: str, *, page: int | None = None) -> None:
        """Append one block of kind under the current heading path; blank text adds nothing."""
        text = code_text(text) if kind == "code" else prose(text)
        if text:
            self._append(text, kind, page, None)

    def _append(self, text: str, kind: str, page: int | None, level: int | None) -> None:
        if self._parts:
            self._parts.append("\n\n")
            self._length += 2
        start = self._length
        self._parts.append(text)
        self._length += len(text)
        self._blocks.append(Block(text=text, kind=kind, heading_path=self.path, page=page,
                                  char_start=start, char_end=self._length, level=level))

    def first_heading(self, level: int | None = None) -> str:
        """Text of the first heading (of that level), or "" if there is none."""
        for block in self._blocks:
            if block.kind == "heading" and (level is None or block.level == level):
                return block.text
        return ""

    def build(self, *, title: str, mime_type: str, metadata: dict[str, Any]) -> ParsedDocument:
        """The parsed document: the blocks joined by blank lines, offsets pointing into it."""
        return ParsedDocument(title=prose(title)[:500], text="".join(self._parts),
                              blocks=tuple(self._blocks), mime_type=mime_type, metadata=metadata)
