"""Page sizes the API will serve."""

from __future__ import annotations

from rest_framework.pagination import LimitOffsetPagination
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
