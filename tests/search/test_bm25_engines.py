"""One contract for every BM25 engine: kb_bm25's C function, SQL and pg_textsearch.

Each holds every filter (the caller's collections, documents, metadata, dates, searchable
chunks only) and never starves a filtered query of its k results. The two that claim
Okapi BM25 over per-collection statistics give exact scores; pg_textsearch weighs with its
own statistics over chunk text alone (search.textsearch), so for it the top-10 agreement
with the SQL reference is measured and reported, not required to be exact.
"""

from __future__ import annotations

import pytest
from django.db import connection

from kb.models import Chunk
from kb.services.documents import document_disable
from search import bm25, textsearch
from search.filters import SearchFilters
from search.retrieval import retrieve_candidates
from tests.search.test_bm25 import chunk_lexemes, distinct_query_lexemes, reference_bm25

pytestmark = pytest.mark.django_db

ENGINES = ["kb_bm25", "sql", "pg_textsearch"]


@pytest.fixture
def textsearch_index(db):
    """pg_textsearch's index in the test database: required of the embedded server, which
    ships and preloads the extension; on a server of your own without it, skipped."""
    status = textsearch.textsearch_status()
    if not (status["available"] and status["preloaded"]):
        if connection.settings_dict["ENGINE"] == "kb.ops.embedded_postgres":
            pytest.fail(f"The embedded server should preload pg_textsearch: {status}")
        pytest.skip("This PostgreSQL server has no preloaded pg_textsearch.")
    with connection.cursor() as cursor:
        # Rows a test wrote in its transaction have deferred trigger events pending, which
        # CREATE INDEX refuses to run beside; fire them now.
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    textsearch.textsearch_index_create(k1=1.2, b=0.75)
    yield
    # The test's transaction takes the index away again; forget that it was there.
    textsearch._ready_by_database.clear()


@pytest.fixture(params=ENGINES)
def engine(request, settings):
    """The test runs once with each engine doing BM25."""
    settings.KB_BM25_K1, settings.KB_BM25_B = 1.2, 0.75
    if request.param == "kb_bm25":
        request.getfixturevalue("kb_bm25_installed")
        settings.KB_BM25_ENGINE = "auto"
    elif request.param == "sql":
        settings.KB_BM25_ENGINE = "sql"
    else:
        request.getfixturevalue("textsearch_index")
        settings.KB_BM25_ENGINE = "pg_textsearch"
    return request.param


def bm25_ranked(query: str, filters: SearchFilters, limit: int = 10,
                engine: bm25.BM25Engine | None = None):
    retrieved = retrieve_candidates(query=query, query_vector=None, filters=filters,
                                    use_bm25=True, limit=limit, bm25=engine)
    return retrieved, sorted(retrieved.candidates, key=lambda c: c.bm25_rank)


@pytest.fixture
def two_collections(collection, ingest_one):
    """A large collection and a small one (one chunk in twenty-one) that share a word."""
    from kb.services.collections import collection_get_or_create

    small = collection_get_or_create(slug="small", name="Small")
    for i in range(40):
        ingest_one(collection, f"big-{i}.txt", f"Ledger note {i}: the ledger balances {i}.")
    for i in range(2):
        ingest_one(small, f"small-{i}.txt", f"Small ledger {i} in the small collection.")
    return collection, small


def test_only_the_callers_collections_and_searchable_chunks_come_back(two_collections, engine):
    _big, small = two_collections
    _, ranked = bm25_ranked("ledger", SearchFilters(collection_ids=(small.pk,)))
    chunks = Chunk.objects.in_bulk([c.chunk_id for c in ranked])

    # The small collection is one chunk in twenty-one: a filter applied after an index's
    # own top rows would starve; every engine still returns both of its matching chunks.
    assert len(ranked) == 2
    assert {chunk.collection_id for chunk in chunks.values()} == {small.pk}

    document_disable(document=chunks[ranked[0].chunk_id].document)
    _, after = bm25_ranked("ledger", SearchFilters(collection_ids=(small.pk,)))
    assert [c.chunk_id for c in after] == [ranked[1].chunk_id]


def test_a_filtered_query_gets_its_k_results(two_collections, engine):
    big, small = two_collections
    retrieved, ranked = bm25_ranked("ledger", SearchFilters(collection_ids=(big.pk, small.pk)),
                                    limit=30)
    assert len(ranked) == 30
    # Whichever engine was asked, the one that answered is reported.
    assert retrieved.bm25_engine in {"kb_bm25", "sql", "pg_textsearch"}


def test_document_metadata_and_date_filters_hold(collection, ingest_one, engine):
    from datetime import timedelta

    from django.utils import timezone

    first = ingest_one(collection, "a.txt", "Quarterly ledger close.", metadata={"team": "a"})
    second = ingest_one(collection, "b.txt", "Ledger review notes.", metadata={"team": "b"})
    base = {"collection_ids": (collection.pk,)}

    def documents(**filters) -> set[int]:
        _, ranked = bm25_ranked("ledger", SearchFilters(**base, **filters))
        return set(Chunk.objects.filter(pk__in=[c.chunk_id for c in ranked])
                   .values_list("document_id", flat=True))

    assert documents() == {first.pk, second.pk}
    assert documents(document_ids=(second.pk,)) == {second.pk}
    assert documents(metadata={"team": "a"}) == {first.pk}
    assert documents(created_after=timezone.now() + timedelta(days=1)) == set()


def test_okapi_engines_score_exactly_and_pg_textsearch_agrees_on_the_top(
        shared_corpus, engine, record_property):
    """kb_bm25 and SQL: every score equals the reference to 1e-6. pg_textsearch: the share
    of the reference top 10 it also ranks in its top 10, recorded (its statistics and text
    differ by design), and its scores are positive and descending."""
    collection = shared_corpus.collection
    filters = SearchFilters(collection_ids=(collection.pk,))
    chunks = chunk_lexemes(collection.pk)
    agreement = []
    for query in ["How are BM25 scores computed from the inverted index?",
                  "vector embedding model HNSW", "Upload a zip archive of documents",
                  "citations in the answer", "passage"]:
        expected = reference_bm25(chunks, distinct_query_lexemes("english", query),
                                  k1=1.2, b=0.75)
        reference_top = [chunk_id for chunk_id, _ in
                         sorted(expected.items(), key=lambda item: (-item[1], item[0]))[:10]]
        if engine == "pg_textsearch":
            # Its own ranking, without the exact engine that backs it when results are few.
            retrieved, ranked = bm25_ranked(query, filters, engine=bm25.PG_TEXTSEARCH)
            assert retrieved.bm25_engine == "pg_textsearch"
            scores = [c.bm25_score for c in ranked]
            assert all(score > 0 for score in scores) and scores == sorted(scores, reverse=True)
            agreement.append(len(set(reference_top) & {c.chunk_id for c in ranked})
                             / len(reference_top))
        else:
            retrieved, ranked = bm25_ranked(query, filters)
            assert retrieved.bm25_engine == engine
            assert [c.chunk_id for c in ranked] == reference_top, query
            assert [c.bm25_score for c in ranked] == pytest.approx(
                [expected[chunk_id] for chunk_id in reference_top], abs=1e-6)
    if agreement:
        mean = sum(agreement) / len(agreement)
        record_property("pg_textsearch_top10_agreement", round(mean, 3))
        assert mean >= 0.5, agreement


def test_pg_textsearch_answers_when_it_can_and_an_exact_engine_when_it_starves(
        two_collections, settings, textsearch_index):
    settings.KB_BM25_ENGINE = "pg_textsearch"
    big, small = two_collections
    unfiltered, _ = bm25_ranked("ledger", SearchFilters(collection_ids=(big.pk, small.pk)),
                                limit=10)
    assert unfiltered.bm25_engine == "pg_textsearch"
    # Two chunks match in the small collection, fewer than the 10 asked for: the exact
    # engine is asked too, and gives the same two.
    starved, ranked = bm25_ranked("ledger", SearchFilters(collection_ids=(small.pk,)))
    assert starved.bm25_engine == bm25.exact_bm25_engine(SearchFilters((small.pk,))).name
    assert len(ranked) == 2


def test_pg_textsearch_keeps_to_the_callers_collections_in_its_own_statement(
        two_collections, textsearch_index):
    """Its rows, before any exact engine is asked: only the caller's searchable chunks, with
    the scores its index scan computed (equal to scoring each row again with <@>)."""
    big, _small = two_collections
    _, ranked = bm25_ranked("ledger balances", SearchFilters(collection_ids=(big.pk,)),
                            limit=40, engine=bm25.PG_TEXTSEARCH)
    chunks = Chunk.objects.filter(pk__in=[c.chunk_id for c in ranked])
    assert len(ranked) == 40
    assert set(chunks.values_list("collection_id", flat=True)) == {big.pk}
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, -(text <@> to_bm25query(%s, %s)) FROM kb_chunk "
                       "WHERE id = ANY(%s)",
                       ["ledger balances", textsearch.INDEX_NAME, [c.chunk_id for c in ranked]])
        rescored = dict(cursor.fetchall())
    assert [c.bm25_score for c in ranked] == pytest.approx(
        [rescored[c.chunk_id] for c in ranked], rel=1e-5)


def test_pg_textsearch_leaves_collections_of_other_languages_to_the_exact_engines(
        ingest_one, settings, textsearch_index):
    from kb.models import Collection

    settings.KB_BM25_ENGINE = "pg_textsearch"
    german = Collection.objects.create(slug="de", name="De", text_search_config="german")
    ingest_one(german, "de.txt", "Die Bilanz des Hauptbuchs.")
    assert bm25.bm25_engine(SearchFilters(collection_ids=(german.pk,))).name != "pg_textsearch"


@pytest.mark.parametrize("query", ["", "   ", "kb_chunk_text_bm25:ledger", "a:b:c", "'; DROP",
                                   "ledger " * 500, "🙂 漢字"])
def test_hostile_queries_are_a_list_in_every_engine(two_collections, engine, query):
    big, small = two_collections
    _, ranked = bm25_ranked(query, SearchFilters(collection_ids=(big.pk, small.pk)))
    assert isinstance(ranked, list)
