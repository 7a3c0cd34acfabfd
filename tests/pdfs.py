"""Hostile PDFs built in code: tiny files that are slow or heavy to read."""

from __future__ import annotations

import io
import zlib


def pathological_pdf(text_operations: int) -> bytes:
    """A 10 KB PDF whose one page holds text_operations text operators: pypdf needs ~1 s per
    20,000."""
    content = b"BT /F1 12 Tf 72 720 Td " + b"(a) Tj 1 0 Td " * text_operations + b"ET"
    return one_page_pdf(zlib.compress(content, 9))


def one_page_pdf(deflated_content: bytes) -> bytes:
    """A valid one-page PDF around a Flate-compressed content stream."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(deflated_content)
        + deflated_content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.writelines(b"%010d 00000 n \n" % offset for offset in offsets)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n"
              % (len(objects) + 1, xref))
    return out.getvalue()
