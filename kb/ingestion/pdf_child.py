"""The PDF extraction child: `python -m kb.ingestion.pdf_child MAX_PAGES MEMORY_BYTES CPU_SECONDS`.

It reads one PDF on stdin and writes `[status, payload]` as JSON on stdout (see
kb.ingestion.parsing._run_pdf_extraction, which starts it and enforces the wall-clock deadline).
"""

from __future__ import annotations

import json
import resource
import sys


def _limit(kind: int, value: int) -> None:
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, hard))


def main(argv: list[str]) -> int:
    """Extract one PDF read from stdin under memory and CPU limits; the exit code is 0 if it ran."""
    max_pages, memory_bytes, cpu_seconds = (int(arg) for arg in argv)
    # The address-space limit turns a decompression bomb into a MemoryError here instead of
    # the kernel's OOM killer picking a process; the CPU limit ends this child even if the
    # parent that enforces the deadline was killed first and can no longer kill it.
    _limit(resource.RLIMIT_AS, memory_bytes)
    _limit(resource.RLIMIT_CPU, cpu_seconds)
    from kb.ingestion.parsing import _extract_pdf

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
