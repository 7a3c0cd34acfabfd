"""Candidate retrieval in PostgreSQL: BM25 (search.bm25) and HNSW vector search
(search.vector) in one statement when the query's vector is known, and the shown chunks'
text after.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

from django.conf import settings

from search.bm25 import (
    BM25Engine,
    bm25_ctes,
    bm25_engine,
    exact_bm25_engine,
    query_lexemes,
)
from search.filters import SearchFilters
from search.routing import search_rows
from search.vector import vector_ctes, vector_literal


@dataclass
class Candidate:
    """A chunk one retriever or both ranked: ids and scores only (chunk_details has the text)."""

    chunk_id: int
    bm25_score: float | None = None
    bm25_rank: int | None = None
    vector_similarity: float | None = None
    vector_rank: int | None = None


@dataclass(frozen=True)
class ChunkDetails:
    """What a result shows of its chunk: the text, where it is, and its document."""

    chunk_id: int
    document_id: int
    document_title: str
    text: str
    heading_path: list
    page_start: int | None
    page_end: int | None


@dataclass
class Retrieved:
    candidates: list[Candidate]
    query_lexemes: list[str]
    vector_count: int = 0
    bm25_count: int = 0
    # Which computed BM25: "kb_bm25" (the extension's C function), "sql", or None (not asked).
    bm25_engine: str | None = None

    def with_vector_candidates(self, vector: Retrieved) -> Retrieved:
        """These (BM25) candidates and a separate vector retrieval's, one per chunk.

        The candidates are new objects, so the BM25 side can be combined again with an
        exact vector re-run.
        """
        by_chunk = {candidate.chunk_id: candidate for candidate in self.candidates}
        for candidate in vector.candidates:
            keyword = by_chunk.get(candidate.chunk_id)
            by_chunk[candidate.chunk_id] = candidate if keyword is None else replace(
                keyword, vector_similarity=candidate.vector_similarity,
                vector_rank=candidate.vector_rank,
            )
        candidates = list(by_chunk.values())
        return Retrieved(
            candidates=candidates,
            query_lexemes=self.query_lexemes,
            vector_count=vector.vector_count,
            bm25_count=self.bm25_count,
            bm25_engine=self.bm25_engine,
        )


def retrieve_candidates(
    *,
    query: str,
    query_vector: list[float] | None,
    filters: SearchFilters,
    use_bm25: bool,
    model_id: int | None = None,
    dimensions: int | None = None,
    limit: int = 100,
    exact_vector: bool = False,
    bm25: BM25Engine | None = None,
) -> Retrieved:
    """Top-`limit` BM25 and/or vector candidates (ids and scores), in one statement.

    BM25 comes from `bm25`, as it ranks; or from the engine search.bm25.bm25_engine chooses,
    and then an engine that may starve a filtered query is backed by an exact one."""
    use_vector = query_vector is not None and model_id is not None and dimensions is not None
    if not filters.collection_ids or not (use_bm25 or use_vector):
        return Retrieved(candidates=[], query_lexemes=[])
    params: dict = {
        "query": query,
        "collections": list(filters.collection_ids),
        "limit": limit,
        "k1": float(settings.KB_BM25_K1),
        "b": float(settings.KB_BM25_B),
    }
    ctes = []
    engine = (bm25 or bm25_engine(filters)) if use_bm25 else None
    if engine is not None:
        ctes.append(bm25_ctes(filters, params, engine=engine))
    if query_vector is not None and model_id is not None and dimensions is not None:  # use_vector
        params["qvec"] = vector_literal(query_vector)
        ctes.append(vector_ctes(filters, params, model_id=model_id, dimensions=dimensions,
                                exact=exact_vector))
    rows = search_rows(_statement(ctes, use_bm25=use_bm25, use_vector=use_vector), params)
    retrieved = _retrieved(rows, query=query, filters=filters, engine=engine)
    if bm25 is None and engine is not None and engine.may_starve and retrieved.bm25_count < limit:
        # Its filters ran after its own top rows were chosen, so fewer than `limit` may
        # mean rows were filtered away, not that no more chunks match: an exact engine
        # answers instead. (When fewer match, both give the same few.)
        return retrieve_candidates(
            query=query, query_vector=query_vector, filters=filters, use_bm25=use_bm25,
            model_id=model_id, dimensions=dimensions, limit=limit, exact_vector=exact_vector,
            bm25=exact_bm25_engine(filters),
        )
    return retrieved


_CANDIDATES_BOTH = """
    candidates AS (
        SELECT coalesce(b.chunk_id, v.chunk_id) AS chunk_id,
               b.score AS bm25_score, b.rank AS bm25_rank,
               v.similarity, v.rank AS vector_rank
        FROM bm25_ranked b FULL OUTER JOIN vec_ranked v ON v.chunk_id = b.chunk_id
    )"""
_CANDIDATES_BM25 = """
    candidates AS (
        SELECT chunk_id, score AS bm25_score, rank AS bm25_rank,
               NULL::float8 AS similarity, NULL::bigint AS vector_rank
        FROM bm25_ranked
    )"""
_CANDIDATES_VECTOR = """
    candidates AS (
        SELECT chunk_id, NULL::float8 AS bm25_score, NULL::bigint AS bm25_rank,
               similarity, rank AS vector_rank
        FROM vec_ranked
    )"""


def _statement(ctes: list[str], *, use_bm25: bool, use_vector: bool) -> str:
    """The one statement: the halves' CTEs, joined on chunk id when both run."""
    if use_bm25 and use_vector:
        candidates = _CANDIDATES_BOTH
    elif use_bm25:
        candidates = _CANDIDATES_BM25
    else:
        candidates = _CANDIDATES_VECTOR
    lexemes = (
        "(SELECT array_agg(DISTINCT lexeme) FROM query_terms)" if use_bm25 else "NULL::text[]"
    )
    # Ids and scores only: reading the text of 100 candidates a side cost 3 to 4 ms a
    # statement, for the 10 that are shown (chunk_details reads theirs).
    return f"""
    WITH {",".join([*ctes, candidates])}
    SELECT k.chunk_id, k.bm25_score, k.bm25_rank, k.similarity, k.vector_rank, {lexemes}
    FROM candidates k
    """


def _retrieved(rows: list[tuple], *, query: str, filters: SearchFilters,
               engine: BM25Engine | None) -> Retrieved:
    candidates = []
    lexemes: list[str] = []
    for row in rows:
        candidates.append(Candidate(
            chunk_id=row[0], bm25_score=row[1], bm25_rank=row[2], vector_similarity=row[3],
            vector_rank=row[4],
        ))
        lexemes = row[5] or lexemes
    if engine is not None and not rows:
        lexemes = query_lexemes(query=query, collection_ids=filters.collection_ids)
    return Retrieved(
        candidates=candidates,
        query_lexemes=list(lexemes),
        vector_count=sum(1 for c in candidates if c.vector_rank is not None),
        bm25_count=sum(1 for c in candidates if c.bm25_rank is not None),
        bm25_engine=engine.name if engine is not None else None,
    )


def chunk_details(chunk_ids: Sequence[int]) -> dict[int, ChunkDetails]:
    """The text, place and document of each of these chunks that is still searchable.

    Read after retrieval, for the results shown or reranked; a chunk deleted or disabled
    since is missing from the answer.
    """
    rows = search_rows(
        "SELECT c.id, c.document_id, coalesce(nullif(d.title, ''), d.original_filename), "
        "c.text, c.heading_path, c.page_start, c.page_end "
        "FROM kb_chunk c JOIN kb_document d ON d.id = c.document_id "
        "WHERE c.id = ANY(%s) AND c.searchable",
        [list(chunk_ids)],
    )
    details = {}
    for chunk_id, document_id, title, text, heading_path, page_start, page_end in rows:
        if isinstance(heading_path, str):
            heading_path = json.loads(heading_path)
        details[chunk_id] = ChunkDetails(
            chunk_id=chunk_id, document_id=document_id, document_title=title, text=text,
            heading_path=heading_path or [], page_start=page_start, page_end=page_end,
        )
    return details
