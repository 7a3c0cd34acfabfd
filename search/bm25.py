"""BM25 in PostgreSQL: its formula, the SQL that computes it, and the engines that rank by it.

The statement's CTEs are built here (bm25_ctes) and run by search.retrieval, beside the
vector half (search.vector). Who computes the top chunks is an engine (BM25Engine),
chosen in one place (bm25_engine): SQL everywhere, the kb_bm25 extension's C function
(search/postgres/, search.postgres_extension) where it is installed, both with the same
scores from the same weights, or, on request, pg_textsearch's index (search.textsearch),
which weighs differently and whose results are checked for starvation (retrieval).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from django.conf import settings
from django.db import connection

from search.filters import SearchFilters, filter_sql
from search.postgres_extension import extension_installed
from search.routing import search_rows
from search.textsearch import TEXT_CONFIG, textsearch_index_ready


class BM25Engine(Protocol):
    """Ranks chunks by BM25 from the statement's `weighted_terms`."""

    # What Retrieved.bm25_engine and the retrieve span report.
    name: str
    # Whether filters applied after its own ranking can leave fewer rows than asked for.
    may_starve: bool

    def top_chunks_cte(self, *, filters: SearchFilters, params: dict) -> str:
        """The `bm25` CTE: the top %(limit)s (chunk_id, score) pairs, best first."""
        ...


class SqlBM25:
    """BM25 in SQL: MaxScore-pruned without filters, every posting scored with them."""

    name = "sql"
    may_starve = False

    def top_chunks_cte(self, *, filters: SearchFilters, params: dict) -> str:
        full = _bm25_full(filters, params)
        if filters.needs_chunk_join:
            return f"bm25 AS ({full}\n    )"
        return _bm25_pruned(full)


class KbBM25Function:
    """BM25 in the kb_bm25 extension's C function, which sums the same contributions
    (search/postgres/kb_bm25.c) with MaxScore pruning of its own. It knows no filters."""

    name = "kb_bm25"
    may_starve = False

    def top_chunks_cte(self, *, filters: SearchFilters, params: dict) -> str:
        return _BM25_NATIVE


class PgTextsearchBM25:
    """BM25 from pg_textsearch's index (Block-Max WAND) over kb_chunk.text, with its own
    corpus-wide statistics (search.textsearch says how they differ), through the one SQL
    function that reads it (search.textsearch, kb_textsearch_top_chunks).

    The index scan yields its top rows before the caller's collections filter them, so a
    collection small among many can leave fewer than `limit`: retrieval then asks an exact
    engine (`may_starve`). Like the C function it knows no filters that join chunks.
    """

    name = "pg_textsearch"
    may_starve = True

    def top_chunks_cte(self, *, filters: SearchFilters, params: dict) -> str:
        return """
    bm25 AS (
        SELECT chunk_id, score
        FROM kb_textsearch_top_chunks(%(query)s, %(collections)s::bigint[], %(limit)s)
        WHERE score > 0
    )"""


SQL_ENGINE = SqlBM25()
KB_BM25_FUNCTION = KbBM25Function()
PG_TEXTSEARCH = PgTextsearchBM25()


def bm25_engine(filters: SearchFilters) -> BM25Engine:
    """The engine that computes BM25 for these filters: KB_BM25_ENGINE, what the database
    has, and what the engine can serve (neither the C function nor pg_textsearch knows
    filters that join chunks; pg_textsearch serves collections of its one text-search
    configuration)."""
    if (
        settings.KB_BM25_ENGINE == "pg_textsearch"
        and not filters.needs_chunk_join
        and textsearch_index_ready(connection)
        and _collections_configured(filters.collection_ids, TEXT_CONFIG)
    ):
        return PG_TEXTSEARCH
    return exact_bm25_engine(filters)


def exact_bm25_engine(filters: SearchFilters) -> BM25Engine:
    """The engine with Okapi scores over per-collection statistics: the C function where it
    is installed and the filters allow, SQL otherwise."""
    if (
        settings.KB_BM25_ENGINE != "sql"
        and not filters.needs_chunk_join
        and extension_installed(connection)
    ):
        return KB_BM25_FUNCTION
    return SQL_ENGINE


def _collections_configured(collection_ids: Sequence[int], config: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(bool_and(text_search_config = %s), false) FROM kb_collection "
            "WHERE id = ANY(%s)",
            [config, list(collection_ids)],
        )
        (configured,) = cursor.fetchone()
    return configured


def bm25_ctes(filters: SearchFilters, params: dict, *, engine: BM25Engine) -> str:
    """BM25 as Lucene scores it, over the lexemes PostgreSQL's text search produces:

        score(D, Q) = Σ_{t ∈ Q} idf(t) · tf(t, D) · (k1 + 1)
                      / (tf(t, D) + k1 · (1 − b + b · |D| / avgdl))
        idf(t)      = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5))

    Q is the set of distinct lexemes of to_tsvector(collection config, query); tf(t, D) is
    the number of positions of t in the chunk's tsvector; |D| the chunk's lexeme count; N,
    df and avgdl are per collection and cover searchable chunks only. The query is never
    parsed as a tsquery, so no user input can be a syntax error.

    Without filters, the top `limit` come from the kb_bm25 extension's C function or from
    SQL (`engine`); both prune with MaxScore, which never changes the result (see
    _bm25_pruned). With filters, every posting is scored in SQL. pg_textsearch (on
    request) ranks with its own statistics instead and uses neither CTE above.
    """
    bm25 = engine.top_chunks_cte(filters=filters, params=params)
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
               %(k1)s::float8 * %(b)s::float8 / (s.total_length::float8 / s.chunk_count)
                   AS length_slope
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
    "w.weight * p.term_frequency"
    " / (p.term_frequency + w.length_base + w.length_slope * p.chunk_length)"
)

# search/postgres/kb_bm25.c sums the same contributions, with MaxScore pruning of its own.
_BM25_NATIVE = """
    bm25 AS (
        SELECT top.chunk_id, top.score
        FROM (
            SELECT array_agg(collection_id) AS collection_ids, array_agg(lexeme) AS lexemes,
                   array_agg(document_frequency) AS document_frequencies,
                   array_agg(weight) AS weights,
                   array_agg(length_base) AS length_bases, array_agg(length_slope) AS length_slopes
            FROM weighted_terms
        ) terms
        -- STRICT: no terms (array_agg gives NULL) is no rows.
        CROSS JOIN LATERAL kb_bm25_top_chunks(
            'search_posting'::regclass, terms.collection_ids, terms.lexemes,
            terms.document_frequencies, terms.weights, terms.length_bases, terms.length_slopes,
            %(limit)s
        ) top
    )"""

# Common terms whose summed upper bounds stay under this share of the largest term's
# bound are tried as non-essential (the guess that decides how much is pruned; a wrong
# guess costs time, never correctness).
_NONESSENTIAL_SHARE = 0.6

# What a primary-key lookup of one posting costs, in postings read by a scan (measured
# on the 100k-chunk benchmark: 3.6 µs a lookup; 8 to 20 gave the same latencies).
_LOOKUP_COST = 10


def _bm25_full(filters: SearchFilters, params: dict) -> str:
    """The top `limit` by BM25 with every matching posting scored (and the filters applied)."""
    join = where = ""
    if filters.needs_chunk_join:
        join = " JOIN kb_chunk c ON c.id = p.chunk_id JOIN kb_document d ON d.id = c.document_id"
        where = " WHERE TRUE" + filter_sql(filters, params)
    return f"""
        SELECT p.chunk_id, sum({_CONTRIBUTION}) AS score
        FROM weighted_terms w
        JOIN search_posting p
          ON p.collection_id = w.collection_id AND p.lexeme = w.lexeme{join}{where}
        GROUP BY p.chunk_id
        ORDER BY score DESC, p.chunk_id
        LIMIT %(limit)s"""


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
    return f"""{_maxscore_survivors()},{_maxscore_nonessential()},
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


def _maxscore_survivors() -> str:
    """MaxScore's steps 1 to 3 up to the survivors: the split, θ, the bound (_bm25_pruned)."""
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
    )"""


def _maxscore_nonessential() -> str:
    """The survivors' non-essential postings, by lookup or by scan (_bm25_pruned's step 3)."""
    return f"""
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
                WHERE p.collection_id = w.collection_id AND p.lexeme = w.lexeme
                  AND p.chunk_id = s.chunk_id
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
    )"""


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
        LEFT JOIN search_termstatistic t
               ON t.collection_id = ch.collection_id AND t.lexeme = q.lexeme
    )
    SELECT w.chunk_id,
           coalesce(sum(w.idf) FILTER (WHERE EXISTS (
               SELECT 1 FROM search_posting p
               WHERE p.collection_id = w.collection_id AND p.lexeme = w.lexeme
                 AND p.chunk_id = w.chunk_id
           )), 0) / nullif(sum(w.idf), 0)
    FROM weighted w
    GROUP BY w.chunk_id
    """
    rows = search_rows(sql, {"lexemes": list(lexemes), "chunks": list(chunk_ids)})
    return {chunk_id: float(share or 0.0) for chunk_id, share in rows}


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
