"""BM25 in PostgreSQL: exact Lucene scores, incremental index maintenance, hostile queries.

The scoring tests run against both engines: the kb_bm25 extension's C function and SQL.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from django.db import connection

from kb.models import Collection
from kb.services.documents import document_delete, document_disable, document_enable
from search import bm25, services
from search.filters import SearchFilters
from search.retrieval import retrieve_candidates

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

pytestmark = pytest.mark.django_db


def demo(name: str) -> bytes:
    return (FIXTURES / "demo" / name).read_bytes()


def chunk_lexemes(collection_id: int) -> dict[int, Counter]:
    """Each searchable chunk's lexeme → term frequency, read from its tsvector's positions."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.id, u.lexeme, coalesce(array_length(u.positions, 1), 1) "
            "FROM kb_chunk c CROSS JOIN LATERAL unnest(c.search_vector) AS u "
            "WHERE c.collection_id = %s AND c.searchable",
            [collection_id],
        )
        chunks: dict[int, Counter] = defaultdict(Counter)
        for chunk_id, lexeme, tf in cursor.fetchall():
            chunks[chunk_id][lexeme] = tf
    return chunks


def distinct_query_lexemes(config: str, query: str) -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT DISTINCT lexeme FROM unnest(to_tsvector(%s::regconfig, %s))",
                       [config, query])
        return {row[0] for row in cursor.fetchall()}


def reference_bm25(chunks: dict[int, Counter], terms: set[str], *, k1: float,
                   b: float) -> dict[int, float]:
    """Okapi BM25 with Lucene's idf, written out independently of the SQL."""
    n = len(chunks)
    lengths = {chunk_id: sum(tfs.values()) for chunk_id, tfs in chunks.items()}
    avgdl = sum(lengths.values()) / n
    df = Counter(term for tfs in chunks.values() for term in tfs if term in terms)
    scores: dict[int, float] = {}
    for chunk_id, tfs in chunks.items():
        score = 0.0
        matched = False
        for term in terms:
            tf = tfs.get(term, 0)
            if not tf:
                continue
            matched = True
            idf = math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5))
            score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[chunk_id] / avgdl))
        if matched:
            scores[chunk_id] = score
    return scores


@pytest.fixture(params=["native", "sql"])
def bm25_engine(request, settings):
    """Runs the test with BM25 from kb_bm25's C function, then from SQL."""
    settings.KB_BM25_ENGINE = "auto" if request.param == "native" else "sql"
    if request.param == "native":
        request.getfixturevalue("kb_bm25_installed")
    return request.param


@pytest.fixture
def demo_collection(shared_corpus, db):
    """The module's shared corpus: five real documents ingested through the pipeline."""
    return shared_corpus.collection


QUERIES = [
    "How are BM25 scores computed from the inverted index?",
    "vector embedding model HNSW",
    "Upload a zip archive of documents and see the progress",
    "citations the the the answer answer",  # repeated terms count once, stopwords drop out
    "passage",
]


@pytest.mark.parametrize(("k1", "b"), [(None, None), (1.2, 0.75), (2.0, 1.0)])
def test_scores_equal_reference_okapi_bm25(demo_collection, settings, bm25_engine, k1, b):
    """Every candidate's score equals Lucene's BM25 over the same lexemes, to 1e-6."""
    if k1 is not None:
        settings.KB_BM25_K1, settings.KB_BM25_B = k1, b
    k1, b = settings.KB_BM25_K1, settings.KB_BM25_B
    chunks = chunk_lexemes(demo_collection.pk)
    assert len(chunks) >= 8, "the fixture documents should give several chunks"

    for query in QUERIES:
        expected = reference_bm25(chunks, distinct_query_lexemes("english", query), k1=k1, b=b)
        retrieved = retrieve_candidates(
            query=query, query_vector=None,
            filters=SearchFilters(collection_ids=(demo_collection.pk,)), use_bm25=True, limit=1000,
        )
        got = {c.chunk_id: c.bm25_score for c in retrieved.candidates}
        assert expected, query
        assert set(got) == set(expected), query
        for chunk_id, score in expected.items():
            assert got[chunk_id] == pytest.approx(score, abs=1e-6, rel=0), (query, chunk_id)
        ranks = sorted(retrieved.candidates, key=lambda c: c.bm25_rank)
        assert [c.bm25_score for c in ranks] == sorted(got.values(), reverse=True)


def test_search_service_bm25_mode_returns_reference_order(demo_collection, reader, settings,
                                                          bm25_engine):
    """search(mode=bm25) returns the top k by the same scores, ties broken by chunk id."""
    query = QUERIES[0]
    expected = reference_bm25(
        chunk_lexemes(demo_collection.pk), distinct_query_lexemes("english", query),
        k1=settings.KB_BM25_K1, b=settings.KB_BM25_B,
    )
    result = services.search(
        params=services.SearchParams(query=query, k=5, mode="bm25",
                                     collections=(demo_collection.slug,)),
        user=reader, record_usage=False,
    )

    top = sorted(expected.items(), key=lambda item: (-item[1], item[0]))[:5]
    assert [hit.chunk_id for hit in result.hits] == [chunk_id for chunk_id, _ in top]
    assert [hit.score for hit in result.hits] == pytest.approx([score for _, score in top],
                                                               abs=1e-6)


def reference_top(expected: dict[int, float], limit: int) -> list[tuple[int, float]]:
    return sorted(expected.items(), key=lambda item: (-item[1], item[0]))[:limit]


def assert_top_matches_reference(collection, query: str, limit: int, *, k1: float,
                                 b: float) -> None:
    expected = reference_top(reference_bm25(chunk_lexemes(collection.pk),
                                            distinct_query_lexemes("english", query), k1=k1, b=b),
                             limit)
    retrieved = retrieve_candidates(
        query=query, query_vector=None, filters=SearchFilters(collection_ids=(collection.pk,)),
        use_bm25=True, limit=limit,
    )
    ranked = sorted(retrieved.candidates, key=lambda c: c.bm25_rank)
    assert [c.chunk_id for c in ranked] == [chunk_id for chunk_id, _ in expected], (query, limit)
    assert [c.bm25_score for c in ranked] == pytest.approx([s for _, s in expected], abs=1e-6)


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 8])
def test_top_k_equals_reference_at_every_cutoff(demo_collection, settings, bm25_engine, limit):
    """The top k (pruned by MaxScore in SQL) is exactly the reference top k, whatever k is."""
    for query in QUERIES:
        assert_top_matches_reference(demo_collection, query, limit,
                                     k1=settings.KB_BM25_K1, b=settings.KB_BM25_B)


@pytest.mark.parametrize(("engine", "lookup_cost"), [("sql", 0), ("sql", 10**9), ("native", None)],
                         ids=["sql-by-lookup", "sql-by-scan", "native"])
def test_top_k_is_exact_when_common_terms_are_pruned(collection, ingest_one, settings, monkeypatch,
                                                     request, engine, lookup_cost):
    """A rare term and a term in nearly every chunk: the common term's postings are only
    added to chunks that can still make the top k, and the result is still exact, whether
    they are looked up per surviving chunk or scanned against them. (In the C function,
    k = 1 leaves one candidate, which is looked up; k = 2 and 3 scan.)"""
    if engine == "sql":
        settings.KB_BM25_ENGINE = "sql"
        monkeypatch.setattr(bm25, "_LOOKUP_COST", lookup_cost)
    else:
        request.getfixturevalue("kb_bm25_installed")
    for i in range(12):
        ingest_one(collection, f"note-{i}.txt", f"Note {i}. The common ledger entry number {i}.")
    ingest_one(collection, "rare-1.txt", "The common ledger mentions a zyzzyva once.")
    ingest_one(collection, "rare-2.txt", "A zyzzyva, a zyzzyva: the common ledger has two.")

    # The one-word queries take their term's top postings, without MaxScore.
    for query in ("common zyzzyva", "zyzzyva ledger common", "common ledger", "zyzzyva", "ledger"):
        for limit in (1, 2, 3):
            assert_top_matches_reference(collection, query, limit,
                                         k1=settings.KB_BM25_K1, b=settings.KB_BM25_B)


def index_snapshot() -> tuple[set, set, set]:
    """(postings, document frequencies, collection statistics) as stored by the triggers."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT collection_id, lexeme, chunk_id, term_frequency, chunk_length "
                       "FROM search_posting")
        postings = set(cursor.fetchall())
        cursor.execute("SELECT collection_id, lexeme, document_frequency FROM search_termstatistic "
                       "WHERE document_frequency <> 0")
        terms = set(cursor.fetchall())
        cursor.execute("SELECT collection_id, chunk_count, total_length "
                       "FROM search_collectionstatistic "
                       "WHERE chunk_count <> 0 OR total_length <> 0")
        collections = set(cursor.fetchall())
    return postings, terms, collections


def index_recomputed() -> tuple[set, set, set]:
    """The same three, recomputed from scratch from kb_chunk's searchable rows."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.collection_id, u.lexeme, c.id, coalesce(array_length(u.positions, 1), 1), "
            "       search_tsvector_length(c.search_vector) "
            "FROM kb_chunk c CROSS JOIN LATERAL unnest(c.search_vector) AS u WHERE c.searchable"
        )
        postings = set(cursor.fetchall())
        cursor.execute(
            "SELECT c.collection_id, u.lexeme, count(*) FROM kb_chunk c "
            "CROSS JOIN LATERAL unnest(c.search_vector) AS u WHERE c.searchable GROUP BY 1, 2"
        )
        terms = set(cursor.fetchall())
        cursor.execute(
            "SELECT collection_id, count(*), sum(search_tsvector_length(search_vector)) "
            "FROM kb_chunk WHERE searchable GROUP BY 1"
        )
        collections = set(cursor.fetchall())
    return postings, terms, collections


def assert_index_consistent() -> None:
    stored, recomputed = index_snapshot(), index_recomputed()
    for name, got, want in zip(("postings", "term statistics", "collection statistics"), stored,
                               recomputed, strict=True):
        assert got == want, (
            f"{name}: extra {sorted(got - want)[:5]}, missing {sorted(want - got)[:5]}"
        )
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM search_termstatistic WHERE document_frequency < 0")
        assert cursor.fetchone()[0] == 0


def test_incremental_maintenance_equals_recomputation(collection, ingest_one, ingest):
    """After ingest, delete, disable, enable and re-ingest of a changed file, the index
    equals one recomputed from scratch from kb_chunk."""
    other = Collection.objects.create(slug="other", name="Other", text_search_config="simple")
    guide = (FIXTURES / "samples" / "guide.md").read_text()
    first = ingest_one(collection, "guide.md", guide)
    second = ingest_one(collection, "search.md", demo("how-search-works.md"))
    third = ingest_one(collection, "upload.md", demo("uploading-documents.md"))
    ingest_one(other, "search.md", demo("how-search-works.md"))
    assert_index_consistent()

    document_delete(document=second)
    assert_index_consistent()
    document_disable(document=third)
    assert_index_consistent()
    document_enable(document=third)
    assert_index_consistent()
    (outcome,) = ingest(collection, "guide.md",
                        guide.replace("## ", "## Revised ", 1) + "\n\nA new closing paragraph.\n")
    assert outcome.outcome == "updated" and outcome.document.pk == first.pk
    assert_index_consistent()
    document_disable(document=third)
    document_delete(document=third)
    assert_index_consistent()

    postings, _, collections = index_snapshot()
    assert {collection.pk, other.pk} <= {row[0] for row in postings}
    assert {collection.pk, other.pk} <= {row[0] for row in collections}


def test_text_search_config_is_per_collection(collection, ingest_one, reader):
    """The same text gives stemmed lexemes in an english collection and whole words in a simple
    one."""
    simple = Collection.objects.create(slug="simple", name="Simple", text_search_config="simple")
    text = "The runners were running quickly through the searches."
    ingest_one(collection, "notes.txt", text)
    ingest_one(simple, "notes.txt", text)

    english_lexemes = set().union(*chunk_lexemes(collection.pk).values())
    simple_lexemes = set().union(*chunk_lexemes(simple.pk).values())
    assert {"run", "runner", "search"} <= english_lexemes and "the" not in english_lexemes
    assert {"running", "runners", "searches", "the"} <= simple_lexemes

    def hits(slug: str, query: str) -> list[int]:
        params = services.SearchParams(query=query, mode="bm25", collections=(slug,))
        result = services.search(params=params, user=reader, record_usage=False)
        return [hit.chunk_id for hit in result.hits]

    assert hits("docs", "run") and not hits("simple", "run")
    assert hits("simple", "the") and not hits("docs", "the")


HOSTILE_QUERIES = {
    "thousand words": " ".join(f"word{i % 97} search index" for i in range(334)),
    "stopwords only": "the and of to a in is it",
    "tsquery operators": "& | ! ( ) :* <-> !! (search & | ) :*A",
    "quotes": "\"unterminated 'quotes' and \\\"escaped\\\" ones",
    "emoji": "🔍📄 search 🤖",
    "chinese": "如何搜索文档",
    "arabic": "كيف أبحث في المستندات",
    "russian": "как искать документы",
    "empty": "",
    "whitespace": "   \t\n ",
    "long token": "x" * 5000,
    "sql": "'); DROP TABLE kb_chunk; --",
    "nul byte": "search\x00index",
}


@pytest.mark.parametrize("mode", ["bm25", "vector", "hybrid"])
def test_hostile_queries_return_a_list(demo_collection, reader, bm25_engine, mode):
    """Any text is a valid query: results or an empty list, never an exception."""
    failures = {}
    for name, query in HOSTILE_QUERIES.items():
        try:
            result = services.search(params=services.SearchParams(query=query, mode=mode),
                                     user=reader, record_usage=False)
        except Exception as exc:  # collected, so one run reports every query that breaks
            failures[name] = f"{exc.__class__.__name__}: {exc}"
            continue
        if not isinstance(result.hits, list):
            failures[name] = f"hits is {type(result.hits)}"
        elif name == "stopwords only" and mode == "bm25" and (result.hits or result.query_lexemes):
            failures[name] = "stopwords matched"
        elif name == "thousand words" and not result.hits:
            failures[name] = "no hits, though 'search' and 'index' occur in the corpus"
    assert not failures, failures


@pytest.mark.parametrize("chunk_ids", ["close", "far apart"])
def test_rare_and_common_terms_rank_alike_in_both_engines(collection, ingest_one, settings,
                                                           chunk_ids, kb_bm25_installed):
    """Ties, a term in every chunk and a term in one: the C function and SQL agree exactly,
    whether it adds up by chunk id in an array (ids close together) or in a hash table."""
    for i in range(12):
        ingest_one(collection, f"note-{i}.txt",
                   f"Note {i}. The common ledger entry number {i % 3}.")
        if chunk_ids == "far apart" and i == 5:
            with connection.cursor() as cursor:
                cursor.execute("SELECT setval(pg_get_serial_sequence('kb_chunk', 'id'), "
                               "nextval(pg_get_serial_sequence('kb_chunk', 'id')) + 50000000)")
    ingest_one(collection, "rare.txt", "The common ledger mentions a zyzzyva once.")
    filters = SearchFilters(collection_ids=(collection.pk,))
    for query in ("common zyzzyva", "ledger entry number", "common", "zyzzyva",
                  "absent words only"):
        ranked = {}
        for engine in ("auto", "sql"):
            settings.KB_BM25_ENGINE = engine
            candidates = retrieve_candidates(query=query, query_vector=None, filters=filters,
                                             use_bm25=True, limit=5).candidates
            ranked[engine] = sorted((c.bm25_rank, c.chunk_id, round(c.bm25_score, 9))
                                    for c in candidates)
        assert ranked["auto"] == ranked["sql"], query
        settings.KB_BM25_ENGINE = "auto"
        if query != "absent words only":
            assert_top_matches_reference(collection, query, 5, k1=settings.KB_BM25_K1,
                                         b=settings.KB_BM25_B)


def test_native_engine_is_used_where_installed_and_sql_with_filters(demo_collection, settings,
                                                                   kb_bm25_installed):
    """Without filters BM25 comes from kb_bm25_top_chunks; with filters (a join) from SQL."""
    from django.test.utils import CaptureQueriesContext

    plain = SearchFilters(collection_ids=(demo_collection.pk,))
    filtered = SearchFilters(collection_ids=(demo_collection.pk,),
                             metadata={"audience": "everyone"})
    with CaptureQueriesContext(connection) as queries:
        unfiltered = retrieve_candidates(query=QUERIES[0], query_vector=None, filters=plain,
                                         use_bm25=True)
        with_filters = retrieve_candidates(query=QUERIES[0], query_vector=None, filters=filtered,
                                           use_bm25=True)
    used_native = ["kb_bm25_top_chunks" in query["sql"] for query in queries.captured_queries]
    assert used_native == [True, False]
    assert (unfiltered.bm25_engine, with_filters.bm25_engine) == ("kb_bm25", "sql")
