"""Which format a file is: magic bytes first, the file name's extension second."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import PurePath

from kb.ingestion.document import ParseError
from kb.ingestion.text import bom_encoding, utf16_without_bom

PDF_MIME = "application/pdf"
DOCX_MIME = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
HTML_MIME = "text/html"
MARKDOWN_MIME = "text/markdown"
TEXT_MIME = "text/plain"
ZIP_MIME = "application/zip"
BINARY_MIME = "application/octet-stream"

SUPPORTED_MIME_TYPES: frozenset[str] = frozenset(
    {PDF_MIME, DOCX_MIME, HTML_MIME, MARKDOWN_MIME, TEXT_MIME, ZIP_MIME}
)
# Archives are expanded by kb.ingestion.archives.extract_archive; parse_document parses documents.
ARCHIVE_MIME_TYPES: frozenset[str] = frozenset({ZIP_MIME})

# How many leading bytes sniff_mime_type needs to see; callers may pass more.
SNIFF_BYTES = 8192


_LABELS = {
    PDF_MIME: "PDF",
    DOCX_MIME: "Word document (DOCX)",
    HTML_MIME: "HTML page",
    MARKDOWN_MIME: "Markdown",
    TEXT_MIME: "plain text",
    ZIP_MIME: "zip archive",
    BINARY_MIME: "binary data of unknown type",
    "application/msword": "legacy Word document (.doc)",
    "application/vnd.ms-excel": "legacy Excel workbook (.xls)",
    "application/vnd.ms-powerpoint": "legacy PowerPoint file (.ppt)",
    "application/x-ole-storage": "legacy Microsoft Office file",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "Excel workbook (XLSX)",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation":
        "PowerPoint file (PPTX)",
    "application/vnd.oasis.opendocument.text": "OpenDocument text (ODT)",
    "application/epub+zip": "EPUB e-book",
    "application/rtf": "RTF document",
    "application/postscript": "PostScript file",
    "application/gzip": "gzip archive",
    "application/x-bzip2": "bzip2 archive",
    "application/x-xz": "xz archive",
    "application/x-7z-compressed": "7-Zip archive",
    "application/vnd.rar": "RAR archive",
    "application/x-tar": "tar archive",
    "application/x-executable": "executable program",
    "application/vnd.sqlite3": "SQLite database",
    "image/png": "PNG image",
    "image/jpeg": "JPEG image",
    "image/gif": "GIF image",
    "image/webp": "WebP image",
    "image/tiff": "TIFF image",
    "video/mp4": "MP4 video",
}

_EXTENSION_TYPES = {
    ".pdf": PDF_MIME,
    ".docx": DOCX_MIME,
    ".html": HTML_MIME,
    ".htm": HTML_MIME,
    ".xhtml": HTML_MIME,
    ".md": MARKDOWN_MIME,
    ".markdown": MARKDOWN_MIME,
    ".mdown": MARKDOWN_MIME,
    ".mkd": MARKDOWN_MIME,
    ".mkdn": MARKDOWN_MIME,
    ".txt": TEXT_MIME,
    ".text": TEXT_MIME,
    ".log": TEXT_MIME,
    ".rst": TEXT_MIME,
    ".csv": TEXT_MIME,
    ".zip": ZIP_MIME,
    ".doc": "application/msword",
    ".xls": "application/vnd.ms-excel",
    ".ppt": "application/vnd.ms-powerpoint",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ".odt": "application/vnd.oasis.opendocument.text",
    ".epub": "application/epub+zip",
}

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"{\\rtf", "application/rtf"),
    (b"%!PS", "application/postscript"),
    (b"\x1f\x8b", "application/gzip"),
    (b"\xfd7zXZ\x00", "application/x-xz"),
    (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (b"Rar!\x1a\x07", "application/vnd.rar"),
    (b"\x7fELF", "application/x-executable"),
    (b"SQLite format 3\x00", "application/vnd.sqlite3"),
)
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"


def _extension(filename: str) -> str:
    return PurePath(filename.replace("\\", "/")).suffix.lower()


def claimed_mime_type(filename: str) -> str | None:
    """The type the file name's extension claims, whatever the content says."""
    return _EXTENSION_TYPES.get(_extension(filename))


_CONTROL_BYTES = bytes(b for b in range(32) if b < 9 or b > 13)


def _looks_binary(head: bytes) -> bool:
    if bom_encoding(head) or utf16_without_bom(head):
        return False
    if b"\x00" in head:
        return True
    # Deleting the control bytes in C and comparing lengths counts them without a Python loop.
    controls = len(head) - len(head.translate(None, _CONTROL_BYTES))
    return controls > 0.1 * max(1, len(head))


_HTML_STRONG = re.compile(
    rb"^\s*(?:<\?xml[^>]*>\s*)?(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html)[\s>]",
    re.IGNORECASE | re.DOTALL,
)
_HTML_WEAK = re.compile(
    rb"^\s*(?:<!--.*?-->\s*)*<(?:head|body|title|meta|script|style|div|p|table|h[1-6]|a|b|br|font|"
    rb"iframe)[\s/>]",
    re.IGNORECASE | re.DOTALL,
)


def _zip_subtype(head: bytes, ext_type: str | None) -> str:
    """Tell OOXML/ODF/EPUB apart from a plain zip using only the first local headers."""
    if head[30:38] == b"mimetype":
        declared = head[38:120].split(b"PK", 1)[0].decode("ascii", "replace").strip()
        if declared:
            return declared
    if b"word/" in head:
        return DOCX_MIME
    if b"xl/" in head:
        return "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    if b"ppt/" in head:
        return "application/vnd.openxmlformats-officedocument.presentationml.presentation"
    # The parts may lie beyond the head; trust a matching Office extension until the full
    # archive is checked in parse_document.
    if ext_type is not None and ext_type != ZIP_MIME and ext_type.startswith("application/vnd."):
        return ext_type
    return ZIP_MIME


def sniff_mime_type(*, filename: str, head: bytes) -> str:
    """Content type from magic bytes first, extension second (an extension that lies loses)."""
    ext_type = claimed_mime_type(filename)
    # Acrobat accepts the header anywhere in the first KiB, so junk before it is still a PDF.
    if b"%PDF-" in head[:1024]:
        return PDF_MIME
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip_subtype(head, ext_type)
    if head.startswith(_OLE_MAGIC):
        if ext_type in ("application/msword", "application/vnd.ms-excel",
                        "application/vnd.ms-powerpoint"):
            return ext_type
        return "application/x-ole-storage"
    for magic, mime in _MAGIC:
        if head.startswith(magic):
            return mime
    if head[4:8] == b"ftyp":
        return "video/mp4"
    if head[257:262] == b"ustar":
        return "application/x-tar"
    if head.startswith(b"BZh") and head[3:4].isdigit() and head[4:10] == b"1AY&SY":
        return "application/x-bzip2"
    if _looks_binary(head):
        return BINARY_MIME
    text_head = _head_as_ascii(head)
    if _HTML_STRONG.match(text_head):
        return HTML_MIME
    if ext_type == HTML_MIME:
        return HTML_MIME
    if ext_type == MARKDOWN_MIME:
        # READMEs often open with <p align="center">; only a full HTML document overrides .md.
        return MARKDOWN_MIME
    if _HTML_WEAK.match(text_head):
        return HTML_MIME
    return TEXT_MIME


def _head_as_ascii(head: bytes) -> bytes:
    """Drop BOMs and UTF-16 NULs so byte regexes can look for markup."""
    encoding = bom_encoding(head) or utf16_without_bom(head)
    if encoding and encoding.startswith(("utf-16", "utf-32")):
        try:
            return head.decode(encoding, "ignore").encode("ascii", "ignore")
        except LookupError:
            return head
    return head[3:] if head.startswith(b"\xef\xbb\xbf") else head


def refine_zip_type(name: str, data: bytes, sniffed: str) -> str:
    """Look inside a zip to tell a real DOCX from an archive or another Office format."""
    try:
        names = set(zipfile.ZipFile(io.BytesIO(data)).namelist())
    except Exception as exc:  # zipfile raises NotImplementedError, ValueError... on damage
        label = "Word document" if sniffed == DOCX_MIME else "zip archive"
        raise ParseError(f"{name} is a damaged {label}: {exc}") from exc
    if "word/document.xml" in names:
        return DOCX_MIME
    if sniffed == DOCX_MIME:
        return ZIP_MIME  # claimed to be Word but holds no Word document
    return sniffed


def mime_label(mime: str) -> str:
    """The name editors know a content type by: "Word document (DOCX)", "PNG image"."""
    return _LABELS.get(mime, mime)
