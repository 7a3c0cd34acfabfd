"""Vector search in PostgreSQL: cosine similarity on each embedding model's own HNSW index.

The index is a partial one per model over `embedding::halfvec(d)` (`vector(d)` where
pgvector predates halfvec, or an index made before), created and dropped with the model's
lifecycle (kb.embeddings.embedding_model_index_create): kb owns the embedding models and
does not import search. The query here repeats the index's expression and predicate, or
the planner cannot use it.
"""

from __future__ import annotations

from collections.abc import Sequence

from kb.embeddings import hnsw_vector_type
from search.filters import SearchFilters, filter_sql


def vector_literal(values: Sequence[float]) -> str:
    """A vector as pgvector's text input, for a `%s::vector` parameter in raw SQL."""
    return "[" + ",".join(repr(float(x)) for x in values) + "]"


def vector_ctes(filters: SearchFilters, params: dict, *, model_id: int, dimensions: int,
                exact: bool) -> str:
    """Cosine similarity on the model's own HNSW index (partial, over embedding::halfvec(d)).

    The ORDER BY repeats the index expression and the WHERE its predicate, so the planner
    can use the index; `exact` adds 0 to the distance, which no index can serve, to get an
    exact scan over the filtered rows when HNSW's candidate list was starved by filters.
    """
    cast = f"{hnsw_vector_type(model_id=model_id)}({int(dimensions)})"
    distance = f"(e.embedding::{cast}) <=> %(qvec)s::{cast}"
    order = f"({distance}) + 0" if exact else distance
    document_join = (" JOIN kb_document d ON d.id = c.document_id"
                     if filters.metadata or filters.created_after or filters.created_before else "")
    return f"""
    vec AS (
        SELECT e.chunk_id, {distance} AS distance
        FROM kb_chunkembedding e
        JOIN kb_chunk c ON c.id = e.chunk_id{document_join}
        WHERE e.embedding_model_id = {int(model_id)}
          AND c.searchable AND c.collection_id = ANY(%(collections)s){filter_sql(filters, params)}
        ORDER BY {order}
        LIMIT %(limit)s
    ),
    vec_ranked AS (
        SELECT chunk_id, 1 - distance AS similarity,
               row_number() OVER (ORDER BY distance, chunk_id) AS rank
        FROM vec
    )"""
