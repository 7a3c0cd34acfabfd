"""Vector search: the model's partial HNSW index serves queries, and filters never starve."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from kb.models import Chunk, Collection, Document, EmbeddingModel
from search import services

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

pytestmark = pytest.mark.django_db


@pytest.fixture
def corpus(shared_corpus, db):
    """Five real documents (tests/search/conftest.py); only guide.md has team=alpha."""
    return shared_corpus.documents


def vector_sql(params: services.SearchParams, user) -> list[str]:
    """The statements search() sent for vector candidates, parameters inlined."""
    with CaptureQueriesContext(connection) as captured:
        services.search(params=params, user=user, record_usage=False)
    return [q["sql"] for q in captured.captured_queries if "<=>" in q["sql"]]


def explain(sql: str) -> str:
    with connection.cursor() as cursor:
        # Test tables are tiny, so sorting a few rows is cheaper than any index and the
        # planner sorts; at production sizes HNSW wins on cost. With sorting disabled the
        # planner takes an ordered index path if one exists, which HNSW can only be when
        # the ORDER BY and WHERE match the partial index's expression and predicate.
        cursor.execute("SET LOCAL enable_sort = off")
        cursor.execute("EXPLAIN " + sql)
        return "\n".join(row[0] for row in cursor.fetchall())


@pytest.mark.parametrize("mode", ["vector", "hybrid"])
def test_query_uses_the_active_models_partial_hnsw_index(corpus, reader, mode):
    """EXPLAIN shows an index scan on kb_chunkembedding_hnsw_<active model id>."""
    model = EmbeddingModel.objects.get(is_active=True)
    (sql,) = vector_sql(services.SearchParams(query="how are passages embedded", mode=mode), reader)

    plan = explain(sql)
    assert f"Index Scan using {model.hnsw_index_name}" in plan, plan


def test_exact_fallback_scans_the_filtered_rows_without_the_index(corpus, reader):
    """The starved-filter fallback orders by distance + 0, which no index serves: exact."""
    target = corpus["guide.md"]
    starve_hnsw()
    approximate, exact = vector_sql(services.SearchParams(
        query="how are passages embedded", mode="vector", k=3, document_ids=(target.pk,)), reader)

    assert "hnsw" in explain(approximate)
    assert "hnsw" not in explain(exact)


def test_ef_search_is_set_on_the_connection(db, settings):
    """hnsw.ef_search follows KB_HNSW_EF_SEARCH, sent with the connection request, as is
    the statement timeout: no statement per connection, or per pooled checkout."""
    with connection.cursor() as cursor:
        cursor.execute("SHOW hnsw.ef_search")
        assert int(cursor.fetchone()[0]) == settings.KB_HNSW_EF_SEARCH
        cursor.execute("SELECT setting::int FROM pg_settings WHERE name = 'statement_timeout'")
        assert cursor.fetchone()[0] == 60_000


def starve_hnsw(*, iterative_scan: str = "off") -> None:
    """Make HNSW serve the query (see explain) and return a single neighbour before
    filtering: the worst case for starvation. Without pgvector 0.8's iterative scan by
    default, as on a server of your own with an older pgvector, so the exact re-run runs."""
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_sort = off")
        cursor.execute("SET LOCAL hnsw.ef_search = 1")
        cursor.execute("SET LOCAL hnsw.iterative_scan = %s", [iterative_scan])


def chunk_ids(**filters) -> set[int]:
    return set(Chunk.objects.filter(searchable=True, **filters).values_list("pk", flat=True))


@pytest.mark.parametrize("mode", ["vector", "hybrid"])
def test_document_filter_returns_k_results(corpus, reader, mode):
    """One document among many: asking for as many results as it has chunks gives them all."""
    target = corpus["uploading-documents.md"]
    expected = chunk_ids(document=target)
    assert len(expected) >= 2
    starve_hnsw()

    result = services.search(params=services.SearchParams(
        query="reset my password", mode=mode, k=len(expected), document_ids=(target.pk,),
    ), user=reader, record_usage=False)

    assert {hit.chunk_id for hit in result.hits} == expected


def test_metadata_filter_returns_k_results(corpus, reader):
    """A metadata key matching one document gives its chunks, not an empty page."""
    expected = chunk_ids(document__metadata__team="alpha")
    starve_hnsw()

    result = services.search(params=services.SearchParams(
        query="vector similarity search", mode="vector", k=len(expected),
        metadata={"team": "alpha"},
    ), user=reader, record_usage=False)

    assert {hit.chunk_id for hit in result.hits} == expected


def test_date_range_filter_returns_k_results(corpus, reader):
    """A date range that only an older document falls in still fills k results."""
    old = corpus["getting-started.md"]
    Document.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=30))
    expected = chunk_ids(document=old)
    starve_hnsw()

    result = services.search(params=services.SearchParams(
        query="citations in answers", mode="vector", k=len(expected),
        created_before=timezone.now() - timedelta(days=7),
    ), user=reader, record_usage=False)

    assert {hit.chunk_id for hit in result.hits} == expected


def test_small_collection_among_large_ones_returns_k_results(corpus, reader, ingest_one):
    """Searching one small collection is a filter too: its chunks must all come back."""
    small = Collection.objects.create(slug="small", name="Small")
    document = ingest_one(small, "notes.txt",
                          (FIXTURES / "samples" / "notes-latin1.txt").read_bytes())
    expected = chunk_ids(document=document)
    starve_hnsw()

    result = services.search(params=services.SearchParams(
        query="how does search work", mode="vector", k=len(expected), collections=("small",),
    ), user=reader, record_usage=False)

    assert {hit.chunk_id for hit in result.hits} == expected


def test_unfiltered_search_needs_no_exact_fallback(corpus, reader):
    """Without filters HNSW alone answers: no second, exact statement is run."""
    result = services.search(params=services.SearchParams(query="upload a zip", mode="vector", k=5),
                             user=reader, record_usage=False)

    assert len(result.hits) == 5
    assert "retrieve_exact" not in result.timings_ms


def test_the_iterative_scan_fills_a_starved_filter_from_hnsw_without_the_exact_rerun(
        corpus, reader, settings):
    """pgvector 0.8 goes on scanning HNSW until the filter lets k rows through: k results,
    from the index, with no exact re-run (KB_HNSW_ITERATIVE_SCAN's default)."""
    assert settings.KB_HNSW_ITERATIVE_SCAN == "relaxed_order"
    target = corpus["uploading-documents.md"]
    expected = chunk_ids(document=target)
    starve_hnsw(iterative_scan="relaxed_order")
    params = services.SearchParams(query="which file types can an editor upload to a collection",
                                   mode="vector", k=len(expected), document_ids=(target.pk,))

    (statement,) = vector_sql(params, reader)
    result = services.search(params=params, user=reader, record_usage=False)

    assert "hnsw" in explain(statement)
    assert "retrieve_exact" not in result.timings_ms
    assert {hit.chunk_id for hit in result.hits} == expected


def test_a_new_hybrid_query_falls_back_to_exact_vectors_too(corpus, reader):
    """The BM25 half ran while the query was embedded, HNSW came back short under a filter
    and was re-run exactly: the result is the one-statement path's, stage by stage."""
    target = corpus["uploading-documents.md"]
    expected = chunk_ids(document=target)
    starve_hnsw()
    params = services.SearchParams(query="which file types can an editor upload to a collection",
                                   mode="hybrid", k=len(expected), document_ids=(target.pk,),
                                   explain=True)

    apart = services.search(params=params, user=reader, record_usage=False)
    # the vector is cached
    together = services.search(params=params, user=reader, record_usage=False)

    assert "retrieve_exact" in apart.timings_ms
    assert {hit.chunk_id for hit in apart.hits} == expected
    assert [(h.chunk_id, h.stages) for h in apart.hits] == [
        (h.chunk_id, h.stages) for h in together.hits
    ]
