"""Page sizes the API will serve."""

from __future__ import annotations

from rest_framework.pagination import CursorPagination, LimitOffsetPagination
from rest_framework.request import Request


class BoundedLimitOffsetPagination(LimitOffsetPagination):
    """LimitOffsetPagination with a ceiling on ?limit= and ?offset=.

    Without one, ?limit=2**63 reaches PostgreSQL as a LIMIT past bigint (a DataError, so a
    500), and a huge page is a cheap way to make the server serialise a whole table."""

    max_limit = 500
    # Past bigint PostgreSQL refuses the OFFSET; far below it, an offset is only ever empty.
    max_offset = 10**12

    def get_offset(self, request: Request) -> int:
        return min(super().get_offset(request), self.max_offset)


class BoundedCursorPagination(CursorPagination):
    """Cursor pages for the lists that grow without bound (documents, chunks, conversations).

    A cursor page is one range scan on an index however deep it is, where an OFFSET reads
    and drops every row before the page; and rows written while a client pages through
    are neither repeated nor skipped. ?limit= sets the page size, up to max_page_size. The
    ordering must be unique: a cursor on a repeated value falls back to an offset, which
    CursorPagination caps at offset_cutoff rows.
    """

    page_size_query_param = "limit"
    max_page_size = 500
    ordering: str | tuple[str, ...] = "-pk"


class WrittenOrderCursorPagination(BoundedCursorPagination):
    """Oldest first. Chunks are bulk-inserted in reading order, so within one version of a
    document this is their reading order."""

    ordering = "pk"


class RecentActivityCursorPagination(BoundedCursorPagination):
    """Most recently active first. updated_at can tie or move while a client pages; a tie
    costs an offset within the cursor, and a row touched mid-way moves to the front."""

    ordering = ("-updated_at", "-pk")


class NewestCreatedFirstCursorPagination(BoundedCursorPagination):
    """Newest first by created_at, for rows whose key is not in creation order (UUIDs)."""

    ordering = "-created_at"
