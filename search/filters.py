"""The restrictions a search applies inside the SQL of both retrievers (search.bm25,
search.vector)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class SearchFilters:
    """Restrictions applied inside the SQL of both retrievers, so k results still come back."""

    collection_ids: tuple[int, ...]
    document_ids: tuple[int, ...] = ()
    # Document.metadata must contain these key/value pairs (JSON containment, @>).
    metadata: dict = field(default_factory=dict)
    created_after: datetime | None = None
    created_before: datetime | None = None

    @property
    def needs_chunk_join(self) -> bool:
        return bool(self.document_ids or self.metadata or self.created_after or self.created_before)


def filter_sql(filters: SearchFilters, params: dict, chunk: str = "c", document: str = "d") -> str:
    """The filters as ` AND ...` clauses over `chunk` and `document`, their values added to
    params."""
    clauses = []
    if filters.document_ids:
        params["f_documents"] = list(filters.document_ids)
        clauses.append(f"{chunk}.document_id = ANY(%(f_documents)s)")
    if filters.metadata:
        params["f_metadata"] = json.dumps(filters.metadata)
        clauses.append(f"{document}.metadata @> %(f_metadata)s::jsonb")
    if filters.created_after:
        params["f_after"] = filters.created_after
        clauses.append(f"{document}.created_at >= %(f_after)s")
    if filters.created_before:
        params["f_before"] = filters.created_before
        clauses.append(f"{document}.created_at < %(f_before)s")
    return "".join(f" AND {clause}" for clause in clauses)
