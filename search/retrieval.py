"""Candidate retrieval in PostgreSQL: BM25 over the postings index and HNSW vector search,
both in one statement when the query's vector is known, and the shown chunks' text after.

This module is the one place where search SQL is hand-written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from django.conf import settings
from django.db import connection

from search.postgres_extension import extension_installed


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
                keyword, vector_similarity=candidate.vector_similarity, vector_rank=candidate.vector_rank,
            )
        candidates = list(by_chunk.values())
        return Retrieved(
            candidates=candidates,
            query_lexemes=self.query_lexemes,
            vector_count=vector.vector_count,
            bm25_count=self.bm25_count,
            bm25_engine=self.bm25_engine,
        )


def _filter_sql(filters: SearchFilters, params: dict, chunk: str = "c", document: str = "d") -> str:
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


def _bm25_ctes(filters: SearchFilters, params: dict, *, native: bool) -> str:
    """BM25 as Lucene scores it, over the lexemes PostgreSQL's text search produces:

        score(D, Q) = Σ_{t ∈ Q} idf(t) · tf(t, D) · (k1 + 1) / (tf(t, D) + k1 · (1 − b + b · |D| / avgdl))
        idf(t)      = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5))

    Q is the set of distinct lexemes of to_tsvector(collection config, query); tf(t, D) is
    the number of positions of t in the chunk's tsvector; |D| the chunk's lexeme count; N,
    df and avgdl are per collection and cover searchable chunks only. The query is never
    parsed as a tsquery, so no user input can be a syntax error.

    Without filters, the top `limit` come from the kb_bm25 extension's C function when
    `native` (from the same weights), or else from SQL; both prune with MaxScore, which
    never changes the result (see _bm25_pruned). With filters, every posting is scored
    in SQL.
    """
    join = where = ""
    if filters.needs_chunk_join:
        join = " JOIN kb_chunk c ON c.id = p.chunk_id JOIN kb_document d ON d.id = c.document_id"
        where = " WHERE TRUE" + _filter_sql(filters, params)
    full = f"""
        SELECT p.chunk_id, sum({_CONTRIBUTION}) AS score
        FROM weighted_terms w
        JOIN search_posting p ON p.collection_id = w.collection_id AND p.lexeme = w.lexeme{join}{where}
        GROUP BY p.chunk_id
        ORDER BY score DESC, p.chunk_id
        LIMIT %(limit)s"""
    if filters.needs_chunk_join:
        bm25 = f"bm25 AS ({full}\n    )"
    elif native:
        bm25 = _BM25_NATIVE
    else:
        bm25 = _bm25_pruned(full)
    return f"""
    query_terms AS (
        SELECT col.id AS collection_id, u.lexeme
        FROM kb_collection col
        CROSS JOIN LATERAL unnest(to_tsvector(col.text_search_config::regconfig, %(query)s)) AS u
        WHERE col.id = ANY(%(collections)s)
    ),
    weighted_terms AS MATERIALIZED (
        -- Everything that does not depend on the chunk, once per term, so each posting
        -- costs a multiply-add and a division. float8 throughout: numeric arithmetic
        -- (what a bare 0.5 literal brings in) is several times slower per posting.
        -- A posting's contribution is weight · tf / (tf + ...) < weight: its upper bound.
        SELECT t.collection_id, t.lexeme, t.document_frequency,
               ln(1 + (s.chunk_count - t.document_frequency + 0.5::float8)
                      / (t.document_frequency + 0.5::float8)) * (%(k1)s::float8 + 1) AS weight,
               %(k1)s::float8 * (1 - %(b)s::float8) AS length_base,
               %(k1)s::float8 * %(b)s::float8 / (s.total_length::float8 / s.chunk_count) AS length_slope
        FROM query_terms q
        JOIN search_termstatistic t ON t.collection_id = q.collection_id AND t.lexeme = q.lexeme
        JOIN search_collectionstatistic s ON s.collection_id = q.collection_id
        WHERE t.document_frequency > 0 AND s.chunk_count > 0
    ),
    {bm25},
    bm25_ranked AS (
        SELECT chunk_id, score, row_number() OVER (ORDER BY score DESC, chunk_id) AS rank FROM bm25
    )"""


_CONTRIBUTION = (
    "w.weight * p.term_frequency / (p.term_frequency + w.length_base + w.length_slope * p.chunk_length)"
)

# search/postgres/kb_bm25.c sums the same contributions, with MaxScore pruning of its own.
_BM25_NATIVE = """
    bm25 AS (
        SELECT top.chunk_id, top.score
        FROM (
            SELECT array_agg(collection_id) AS collection_ids, array_agg(lexeme) AS lexemes,
                   array_agg(document_frequency) AS document_frequencies, array_agg(weight) AS weights,
                   array_agg(length_base) AS length_bases, array_agg(length_slope) AS length_slopes
            FROM weighted_terms
        ) terms
        -- STRICT: no terms (array_agg gives NULL) is no rows.
        CROSS JOIN LATERAL kb_bm25_top_chunks(
            'search_posting'::regclass, terms.collection_ids, terms.lexemes, terms.document_frequencies,
            terms.weights, terms.length_bases, terms.length_slopes, %(limit)s
        ) top
    )"""

# Common terms whose summed upper bounds stay under this share of the largest term's
# bound are tried as non-essential (the guess that decides how much is pruned; a wrong
# guess costs time, never correctness).
_NONESSENTIAL_SHARE = 0.6

# What a primary-key lookup of one posting costs, in postings read by a scan (measured
# on the 100k-chunk benchmark: 3.6 µs a lookup; 8 to 20 gave the same latencies).
_LOOKUP_COST = 10


def _bm25_pruned(full: str) -> str:
    """The exact top `limit` by BM25, scoring the commonest terms' postings only where needed.

    MaxScore (Turtle and Flood, 1995) over whole posting lists, in one statement:

    1. The commonest terms, whose upper bounds sum to `bound`, are *non-essential*;
       the rest are essential. Their share of postings is large (typically 80%).
    2. Every chunk with an essential term gets its partial score from those terms.
       The limit-th best partial score, θ, is a lower bound on the final limit-th score.
    3. If bound < θ, a chunk without an essential term scores at most bound < θ, so
       it cannot be in the top `limit`; and a chunk whose partial score + bound < θ
       cannot either. Only the survivors get their non-essential postings added: by
       primary-key lookups when there are few survivors (each lookup costs about
       _LOOKUP_COST postings' worth of a scan), otherwise by scanning the non-essential
       postings against a hash of the survivors. Neither aggregates every posting.
    4. Otherwise (θ too low, too few matches) every posting is scored, as without
       pruning. Exactly one branch runs: each is gated by a one-time filter.

    A one-word query is just its term's top postings: a chunk has one posting per term,
    so there is nothing to add up. That branch computes none of the steps above.
    """
    return f"""
    term_split AS MATERIALIZED (
        SELECT w.*,
               sum(w.weight) OVER (ORDER BY w.weight, w.lexeme)
                   < {_NONESSENTIAL_SHARE} * max(w.weight) OVER () AS nonessential
        FROM weighted_terms w
    ),
    query_shape AS MATERIALIZED (
        SELECT count(*) AS terms FROM term_split
    ),
    essential_scores AS MATERIALIZED (
        SELECT p.chunk_id, sum({_CONTRIBUTION}) AS score
        FROM term_split w
        JOIN search_posting p ON p.collection_id = w.collection_id AND p.lexeme = w.lexeme
        WHERE NOT w.nonessential
        GROUP BY p.chunk_id
    ),
    pruning AS MATERIALIZED (
        SELECT bound, threshold, (NOT any_nonessential OR bound < threshold) AS safe
        FROM (
            SELECT coalesce(sum(weight) FILTER (WHERE nonessential), 0) AS bound,
                   coalesce(bool_or(nonessential), false) AS any_nonessential
            FROM term_split
        ) b,
        (
            SELECT CASE WHEN count(*) >= %(limit)s THEN min(score) ELSE 0 END AS threshold
            FROM (SELECT score FROM essential_scores ORDER BY score DESC LIMIT %(limit)s) top
        ) t
    ),
    survivors AS MATERIALIZED (
        SELECT e.chunk_id, e.score
        FROM essential_scores e, pruning
        WHERE pruning.safe AND e.score + pruning.bound >= pruning.threshold
    ),
    nonessential_plan AS MATERIALIZED (
        SELECT (SELECT count(*) FROM survivors) * count(*) * {_LOOKUP_COST}
                   < coalesce(sum(w.document_frequency), 0) AS by_lookup
        FROM term_split w
        WHERE w.nonessential
    ),
    nonessential_scores AS (
        (
            SELECT s.chunk_id, sum({_CONTRIBUTION}) AS score
            FROM survivors s
            CROSS JOIN term_split w
            CROSS JOIN LATERAL (
                -- Fenced, so each (survivor, term) is one primary-key lookup.
                SELECT p.term_frequency, p.chunk_length FROM search_posting p
                WHERE p.collection_id = w.collection_id AND p.lexeme = w.lexeme AND p.chunk_id = s.chunk_id
                OFFSET 0
            ) p
            WHERE w.nonessential AND (SELECT by_lookup FROM nonessential_plan)
            GROUP BY s.chunk_id
        )
        UNION ALL
        (
            SELECT postings.chunk_id, sum(postings.contribution) AS score
            FROM (
                -- Fenced, so these postings are scanned against a hash of the survivors
                -- rather than looked up per survivor (the other branch).
                SELECT p.chunk_id, {_CONTRIBUTION} AS contribution
                FROM term_split w
                JOIN search_posting p ON p.collection_id = w.collection_id AND p.lexeme = w.lexeme
                WHERE w.nonessential AND NOT (SELECT by_lookup FROM nonessential_plan)
                OFFSET 0
            ) postings
            WHERE postings.chunk_id IN (SELECT chunk_id FROM survivors)
            GROUP BY postings.chunk_id
        )
    ),
    bm25 AS (
        (
            -- A one-word query: the top postings are the answer. Nothing is materialized,
            -- as the CTEs above are computed only if a branch that reads them runs.
            SELECT p.chunk_id, {_CONTRIBUTION} AS score
            FROM term_split w
            JOIN search_posting p ON p.collection_id = w.collection_id AND p.lexeme = w.lexeme
            WHERE (SELECT terms FROM query_shape) = 1
            ORDER BY score DESC, p.chunk_id
            LIMIT %(limit)s
        )
        UNION ALL
        (
            SELECT s.chunk_id, s.score + coalesce(n.score, 0) AS score
            FROM survivors s LEFT JOIN nonessential_scores n ON n.chunk_id = s.chunk_id
            WHERE (SELECT terms FROM query_shape) > 1 AND (SELECT safe FROM pruning)
            ORDER BY score DESC, s.chunk_id
            LIMIT %(limit)s
        )
        UNION ALL
        (
            SELECT * FROM ({full}
            ) everything
            WHERE (SELECT terms FROM query_shape) > 1 AND NOT (SELECT safe FROM pruning)
        )
    )"""


def vector_literal(values: Sequence[float]) -> str:
    """A vector as pgvector's text input, for a `%s::vector` parameter in raw SQL."""
    return "[" + ",".join(repr(float(x)) for x in values) + "]"


def _vector_ctes(filters: SearchFilters, params: dict, *, model_id: int, dimensions: int,
                 exact: bool) -> str:
    """Cosine similarity on the model's own HNSW index (partial, over embedding::vector(d)).

    The ORDER BY repeats the index expression and the WHERE its predicate, so the planner
    can use the index; `exact` adds 0 to the distance, which no index can serve, to get an
    exact scan over the filtered rows when HNSW's candidate list was starved by filters.
    """
    distance = f"(e.embedding::vector({dimensions})) <=> %(qvec)s::vector({dimensions})"
    order = f"({distance}) + 0" if exact else distance
    document_join = (" JOIN kb_document d ON d.id = c.document_id"
                     if filters.metadata or filters.created_after or filters.created_before else "")
    return f"""
    vec AS (
        SELECT e.chunk_id, {distance} AS distance
        FROM kb_chunkembedding e
        JOIN kb_chunk c ON c.id = e.chunk_id{document_join}
        WHERE e.embedding_model_id = {int(model_id)}
          AND c.searchable AND c.collection_id = ANY(%(collections)s){_filter_sql(filters, params)}
        ORDER BY {order}
        LIMIT %(limit)s
    ),
    vec_ranked AS (
        SELECT chunk_id, 1 - distance AS similarity,
               row_number() OVER (ORDER BY distance, chunk_id) AS rank
        FROM vec
    )"""


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
) -> Retrieved:
    """Top-`limit` BM25 and/or vector candidates (ids and scores), in one statement."""
    use_vector = query_vector is not None and model_id is not None
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
    native = use_bm25 and _bm25_native(filters)
    if use_bm25:
        ctes.append(_bm25_ctes(filters, params, native=native))
    if use_vector:
        params["qvec"] = vector_literal(query_vector)
        ctes.append(_vector_ctes(filters, params, model_id=model_id, dimensions=dimensions,
                                 exact=exact_vector))
    if use_bm25 and use_vector:
        candidates = """
    candidates AS (
        SELECT coalesce(b.chunk_id, v.chunk_id) AS chunk_id, b.score AS bm25_score, b.rank AS bm25_rank,
               v.similarity, v.rank AS vector_rank
        FROM bm25_ranked b FULL OUTER JOIN vec_ranked v ON v.chunk_id = b.chunk_id
    )"""
    elif use_bm25:
        candidates = """
    candidates AS (
        SELECT chunk_id, score AS bm25_score, rank AS bm25_rank,
               NULL::float8 AS similarity, NULL::bigint AS vector_rank
        FROM bm25_ranked
    )"""
    else:
        candidates = """
    candidates AS (
        SELECT chunk_id, NULL::float8 AS bm25_score, NULL::bigint AS bm25_rank,
               similarity, rank AS vector_rank
        FROM vec_ranked
    )"""
    lexemes = (
        "(SELECT array_agg(DISTINCT lexeme) FROM query_terms)" if use_bm25 else "NULL::text[]"
    )
    # Ids and scores only: reading the text of 100 candidates a side cost 3 to 4 ms a
    # statement, for the 10 that are shown (chunk_details reads theirs).
    sql = f"""
    WITH {",".join([*ctes, candidates])}
    SELECT k.chunk_id, k.bm25_score, k.bm25_rank, k.similarity, k.vector_rank, {lexemes}
    FROM candidates k
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    candidates_out = []
    lexemes_out: list[str] = []
    for row in rows:
        candidates_out.append(Candidate(
            chunk_id=row[0], bm25_score=row[1], bm25_rank=row[2], vector_similarity=row[3],
            vector_rank=row[4],
        ))
        lexemes_out = row[5] or lexemes_out
    if use_bm25 and not rows:
        lexemes_out = query_lexemes(query=query, collection_ids=filters.collection_ids)
    return Retrieved(
        candidates=candidates_out,
        query_lexemes=list(lexemes_out),
        vector_count=sum(1 for c in candidates_out if c.vector_rank is not None),
        bm25_count=sum(1 for c in candidates_out if c.bm25_rank is not None),
        bm25_engine=("kb_bm25" if native else "sql") if use_bm25 else None,
    )


def chunk_details(chunk_ids: Sequence[int]) -> dict[int, ChunkDetails]:
    """The text, place and document of each of these chunks that is still searchable.

    Read after retrieval, for the results shown or reranked; a chunk deleted or disabled
    since is missing from the answer.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.id, c.document_id, coalesce(nullif(d.title, ''), d.original_filename), c.text, "
            "c.heading_path, c.page_start, c.page_end "
            "FROM kb_chunk c JOIN kb_document d ON d.id = c.document_id "
            "WHERE c.id = ANY(%s) AND c.searchable",
            [list(chunk_ids)],
        )
        rows = cursor.fetchall()
    details = {}
    for chunk_id, document_id, title, text, heading_path, page_start, page_end in rows:
        if isinstance(heading_path, str):
            heading_path = json.loads(heading_path)
        details[chunk_id] = ChunkDetails(
            chunk_id=chunk_id, document_id=document_id, document_title=title, text=text,
            heading_path=heading_path or [], page_start=page_start, page_end=page_end,
        )
    return details


def query_term_coverage(*, chunk_ids: Sequence[int], lexemes: Sequence[str]) -> dict[int, float]:
    """For each chunk, the share of the query's idf that its own terms match:

        coverage(D, Q) = Σ_{t ∈ Q ∩ D} idf(t) / Σ_{t ∈ Q} idf(t)

    with idf as BM25 computes it over the chunk's collection; a query term the collection
    has never seen (df = 0) gets the largest idf, so an unknown word weighs most. Q is the
    query's lexemes (SearchResult.query_lexemes). One indexed lookup per (chunk, term).
    """
    if not chunk_ids or not lexemes:
        return {}
    sql = """
    WITH q AS (SELECT DISTINCT unnest(%(lexemes)s::text[]) AS lexeme),
    chunks AS (
        SELECT c.id AS chunk_id, c.collection_id FROM kb_chunk c WHERE c.id = ANY(%(chunks)s)
    ),
    weighted AS (
        SELECT ch.chunk_id, q.lexeme, ch.collection_id,
               ln(1 + (s.chunk_count - coalesce(t.document_frequency, 0) + 0.5::float8)
                      / (coalesce(t.document_frequency, 0) + 0.5::float8)) AS idf
        FROM chunks ch
        CROSS JOIN q
        JOIN search_collectionstatistic s ON s.collection_id = ch.collection_id
        LEFT JOIN search_termstatistic t ON t.collection_id = ch.collection_id AND t.lexeme = q.lexeme
    )
    SELECT w.chunk_id,
           coalesce(sum(w.idf) FILTER (WHERE EXISTS (
               SELECT 1 FROM search_posting p
               WHERE p.collection_id = w.collection_id AND p.lexeme = w.lexeme AND p.chunk_id = w.chunk_id
           )), 0) / nullif(sum(w.idf), 0)
    FROM weighted w
    GROUP BY w.chunk_id
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, {"lexemes": list(lexemes), "chunks": list(chunk_ids)})
        return {chunk_id: float(share or 0.0) for chunk_id, share in cursor.fetchall()}


def _bm25_native(filters: SearchFilters) -> bool:
    """Whether BM25 for these filters runs in the kb_bm25 extension rather than in SQL."""
    return (settings.KB_BM25_ENGINE == "auto" and not filters.needs_chunk_join
            and extension_installed(connection))


def query_lexemes(*, query: str, collection_ids: tuple[int, ...]) -> list[str]:
    """The lexemes a query reduces to under the collections' text-search configurations."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT DISTINCT u.lexeme FROM kb_collection col "
            "CROSS JOIN LATERAL unnest(to_tsvector(col.text_search_config::regconfig, %s)) AS u "
            "WHERE col.id = ANY(%s)",
            [query, list(collection_ids)],
        )
        return [row[0] for row in cursor.fetchall()]


def ts_rank_top(*, query: str, collection_id: int, limit: int = 10) -> list[tuple[int, float]]:
    """Postgres ts_rank over the same tsvectors and matches as BM25, for the benchmark.

    ts_rank is not BM25 (no idf, no length saturation); it is here only as a baseline.
    """
    sql = """
    WITH q AS (
        SELECT to_tsquery('simple', string_agg(quote_literal(u.lexeme), ' | ')) AS tsq
        FROM kb_collection col
        CROSS JOIN LATERAL unnest(to_tsvector(col.text_search_config::regconfig, %(query)s)) AS u
        WHERE col.id = %(collection)s
    )
    SELECT c.id, ts_rank(c.search_vector, q.tsq) AS rank
    FROM kb_chunk c, q
    WHERE c.collection_id = %(collection)s AND c.searchable AND c.search_vector @@ q.tsq
    ORDER BY rank DESC, c.id
    LIMIT %(limit)s
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, {"query": query, "collection": collection_id, "limit": limit})
        return cursor.fetchall()
