"""The PDF extraction child: `python -m kb.ingestion.pdf_child MAX_PAGES MEMORY_BYTES CPU_SECONDS`.

It reads one PDF on stdin and writes `[status, payload]` as JSON on stdout (see
kb.ingestion.formats.pdf._run_pdf_extraction, which starts it and enforces the wall-clock
deadline). Only this module runs in the child; pypdf is imported once the limits are set.
"""

from __future__ import annotations

import io
import json
import resource
import sys
from typing import Any

from kb.ingestion.text import prose


def _limit(kind: int, value: int) -> None:
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, hard))


def _extract_pdf(data: bytes, max_pages: int) -> tuple[str, Any]:
    """Raw page texts, outline and metadata, or an error message.

    MemoryError propagates, so the child can name the memory limit instead of the file."""
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                # Many PDFs are "encrypted" with an empty user password only to stop editing.
                if not reader.decrypt(""):
                    return "error", "it is password-protected; remove the password and upload again"
            except (DependencyError, NotImplementedError, FileNotDecryptedError):
                return "error", "it is password-protected or encrypted in a way we cannot read"
        page_count = len(reader.pages)
        if page_count > max_pages:
            return "error", f"it has {page_count} pages; the limit is {max_pages}"
        pages, failed = _page_texts(reader)
        if pages and len(failed) == len(pages):
            return "error", "it is damaged: no page could be read"
        outline: list[tuple[int, str, int]] = []
        try:
            _collect_outline(reader, reader.outline, 0, outline)
        except Exception:
            outline = []  # a broken outline only loses heading paths
        meta = _info(reader)
        return "ok", {"pages": pages, "outline": outline, "meta": meta, "failed": failed}
    except FileNotDecryptedError:
        return "error", "it is password-protected; remove the password and upload again"
    except MemoryError:
        raise
    except Exception as exc:  # pypdf raises anything on hostile input
        detail = f"{type(exc).__name__}: {exc}"[:200]
        return "error", f"it is damaged or not a valid PDF ({detail})"


def _page_texts(reader: Any) -> tuple[list[str], list[int]]:
    """The text of every page, and the 1-based numbers of the pages that could not be read."""
    pages: list[str] = []
    failed: list[int] = []
    for number, page in enumerate(reader.pages, start=1):
        try:
            pages.append(page.extract_text() or "")
        except MemoryError:
            raise
        except Exception:  # one broken page should not cost the rest of the document
            pages.append("")
            failed.append(number)
    return pages, failed


def _info(reader: Any) -> dict[str, str]:
    meta: dict[str, str] = {}
    try:
        info = reader.metadata
        if info is not None:
            for key in ("title", "author", "subject"):
                value = getattr(info, key, None)
                if value:
                    meta[key] = str(value)
    except Exception:
        pass  # metadata is optional
    return meta


def _collect_outline(reader: Any, items: Any, depth: int,
                     out: list[tuple[int, str, int]]) -> None:
    for item in items:
        if len(out) >= 5000 or depth > 8:
            return
        if isinstance(item, list):
            _collect_outline(reader, item, depth + 1, out)
            continue
        page = reader.get_destination_page_number(item)
        title = prose(str(getattr(item, "title", "") or ""))
        if title and page is not None and page >= 0:
            out.append((depth, title, page))


def main(argv: list[str]) -> int:
    """Extract one PDF read from stdin under memory and CPU limits; the exit code is 0 if it ran."""
    max_pages, memory_bytes, cpu_seconds = (int(arg) for arg in argv)
    # The address-space limit turns a decompression bomb into a MemoryError here instead of
    # the kernel's OOM killer picking a process; the CPU limit ends this child even if the
    # parent that enforces the deadline was killed first and can no longer kill it.
    _limit(resource.RLIMIT_AS, memory_bytes)
    _limit(resource.RLIMIT_CPU, cpu_seconds)
    data = sys.stdin.buffer.read()
    try:
        result = _extract_pdf(data, max_pages)
    except MemoryError:
        result = ("error", f"reading it needs more than the {memory_bytes // (1024 * 1024)} MB "
                           "of memory the server allows for one PDF")
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
