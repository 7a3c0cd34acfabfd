"""Hybrid search: one round trip, explainable per-stage scores, RRF and convex fusion."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from kb.models import Chunk, Document, EmbeddingModel, UsageRecord
from kb.providers.base import EmbeddingBackend, ProviderError
from kb.services.documents import document_delete, document_disable, document_enable
from search import services
from search.fusion import convex_fusion, reciprocal_rank_fusion
from search.retrieval import Candidate

QUERY = "How does hybrid search fuse BM25 and vector results?"

pytestmark = pytest.mark.django_db


@pytest.fixture
def corpus(shared_corpus, db):
    """Five real documents ingested once for the module (tests/search/conftest.py)."""
    return shared_corpus.documents


@pytest.fixture
def search(reader):
    """search(**params) as a signed-in reader, without usage records."""

    def run(**kwargs) -> services.SearchResult:
        kwargs.setdefault("query", QUERY)
        return services.search(params=services.SearchParams(**kwargs), user=reader,
                               record_usage=False)

    return run


def test_hybrid_retrieval_is_one_statement_and_text_is_read_for_shown_hits_only(
        corpus, search, django_assert_num_queries):
    """With the query vector cached, hybrid search costs four queries, one of them retrieval.

    1. the collections the caller may search; 2. the active embedding model;
    3. BM25 + HNSW candidates, ids and scores, one statement; 4. the text and document
    of the k chunks shown. (record_usage=False: no ledger row, not even the cache hit's.)
    """
    search(mode="hybrid")  # warms the query-vector cache
    with CaptureQueriesContext(connection) as captured, django_assert_num_queries(4):
        result = search(mode="hybrid", k=3)

    assert len(result.hits) == 3
    retrieval = [q["sql"] for q in captured.captured_queries if "search_posting" in q["sql"]]
    assert len(retrieval) == 1
    assert "<=>" in retrieval[0] and "kb_document" not in retrieval[0]
    texts = [q["sql"] for q in captured.captured_queries if "c.text" in q["sql"]]
    assert len(texts) == 1
    assert all(str(hit.chunk_id) in texts[0] for hit in result.hits)


def test_record_usage_false_writes_no_ledger_row(corpus, reader):
    """Neither the search's own row nor its query embedding's, computed or from the
    query-vector cache; with record_usage on, both are written."""
    params = services.SearchParams(query="Which ledger rows does an unrecorded search write?")
    before = set(UsageRecord.objects.values_list("pk", flat=True))

    services.search(params=params, user=reader, record_usage=False)  # embeds the query
    services.search(params=params, user=reader, record_usage=False)  # a query-vector cache hit
    assert set(UsageRecord.objects.values_list("pk", flat=True)) == before

    services.search(params=params, user=reader)
    new = UsageRecord.objects.exclude(pk__in=before).values_list("kind", "cache_hit")
    assert sorted(new) == [(UsageRecord.Kind.EMBEDDING, True), (UsageRecord.Kind.SEARCH, False)]


def test_a_chunk_gone_since_retrieval_is_skipped_and_the_next_takes_its_place(corpus):
    chunks = list(Chunk.objects.filter(searchable=True).order_by("pk")[:3])
    gone, *kept = chunks
    Chunk.objects.filter(pk=gone.pk).update(searchable=False)
    deleted_id = Chunk.objects.order_by("-pk").values_list("pk", flat=True)[0] + 1000
    scored = [(Candidate(chunk_id=deleted_id), 0.9)] + [
        (Candidate(chunk_id=chunk.pk), 0.8 - index / 10) for index, chunk in enumerate(chunks)
    ]
    details = {}

    shown = services._with_details(scored, 2, details)

    assert [candidate.chunk_id for candidate, _, _ in shown] == [chunk.pk for chunk in kept]
    assert [detail.text for _, _, detail in shown] == [chunk.text for chunk in kept]
    assert shown[0][2].document_id == kept[0].document_id
    assert details[gone.pk] is None and details[deleted_id] is None


def test_explain_has_per_stage_scores_ranks_and_timings(corpus, search):
    """explain=True gives bm25, vector and fused score and rank per hit, and stage timings."""
    result = search(mode="hybrid", explain=True, k=5)

    assert {"embed", "retrieve", "fuse", "total"} <= set(result.timings_ms)
    assert all(value >= 0 for value in result.timings_ms.values())
    for rank, hit in enumerate(result.hits, start=1):
        assert set(hit.stages) == {"bm25", "vector", "fused"}
        assert hit.stages["fused"] == {"score": hit.score, "rank": rank}
        assert hit.stages["bm25"]["rank"] is not None or hit.stages["vector"]["rank"] is not None
    both = [hit for hit in result.hits
            if hit.stages["bm25"]["rank"] and hit.stages["vector"]["rank"]]
    assert both, "the top hits should be found by both retrievers"
    assert all(hit.stages["bm25"]["score"] > 0 and -1 <= hit.stages["vector"]["similarity"] <= 1
               for hit in both)


def test_rrf_scores_follow_the_formula(corpus, search, settings):
    """Each hybrid hit scores Σ 1/(k + rank) over the lists it is in, and hits are sorted by it."""
    settings.KB_RRF_K = 60
    result = search(mode="hybrid", explain=True, k=20)

    for hit in result.hits:
        expected = sum(1 / (60 + stage["rank"])
                       for stage in (hit.stages["bm25"], hit.stages["vector"])
                       if stage["rank"] is not None)
        assert hit.score == pytest.approx(expected, abs=1e-12)
    assert [hit.score for hit in result.hits] == sorted((hit.score for hit in result.hits),
                                                        reverse=True)


def test_rrf_by_hand():
    """Two lists: found by both beats found by one; ties fall back to chunk id."""
    candidates = [
        Candidate(chunk_id=1, bm25_rank=1),
        Candidate(chunk_id=2, bm25_rank=2, vector_rank=1),
        Candidate(chunk_id=3, vector_rank=2),
        Candidate(chunk_id=4, bm25_rank=3, vector_rank=3),
        Candidate(chunk_id=5, vector_rank=1),
    ]
    fused = reciprocal_rank_fusion(candidates, k=60)

    assert [(c.chunk_id, round(score, 6)) for c, score in fused] == [
        (2, round(1 / 62 + 1 / 61, 6)),
        (4, round(2 / 63, 6)),
        (1, round(1 / 61, 6)),
        (5, round(1 / 61, 6)),
        (3, round(1 / 62, 6)),
    ]


def test_convex_fusion_by_hand():
    """α·minmax(bm25) + (1−α)·minmax(cos); a list a candidate is missing from counts 0."""
    candidates = [
        Candidate(chunk_id=1, bm25_score=10.0, vector_similarity=0.2),
        Candidate(chunk_id=2, bm25_score=5.0, vector_similarity=0.8),
        Candidate(chunk_id=3, bm25_score=0.0),
        Candidate(chunk_id=4, vector_similarity=0.5),
    ]
    fused = dict((c.chunk_id, s) for c, s in convex_fusion(candidates, alpha=0.3))

    assert fused[1] == pytest.approx(0.3 * 1.0 + 0.7 * 0.0)
    assert fused[2] == pytest.approx(0.3 * 0.5 + 0.7 * 1.0)
    assert fused[3] == pytest.approx(0.0)
    assert fused[4] == pytest.approx(0.7 * 0.5)


def test_convex_fusion_in_search(corpus, search, settings):
    """fusion=convex with α=1 ranks like BM25, α=0 like vector search, scores in [0, 1]."""
    settings.KB_CONVEX_ALPHA = 1.0
    by_bm25 = search(mode="hybrid", fusion="convex", explain=True, k=5)
    settings.KB_CONVEX_ALPHA = 0.0
    by_vector = search(mode="hybrid", fusion="convex", explain=True, k=5)
    settings.KB_CONVEX_ALPHA = 0.5
    mixed = search(mode="hybrid", fusion="convex", k=10)

    assert [h.chunk_id for h in by_bm25.hits] == [h.chunk_id for h in search(mode="bm25", k=5).hits]
    assert [h.chunk_id for h in by_vector.hits] == [
        h.chunk_id for h in search(mode="vector", k=5).hits
    ]
    assert by_bm25.hits[0].score == pytest.approx(1.0)
    assert by_vector.hits[0].score == pytest.approx(1.0)
    assert all(0.0 <= h.score <= 1.0 for h in mixed.hits)
    assert [h.score for h in mixed.hits] == sorted((h.score for h in mixed.hits), reverse=True)


@pytest.mark.parametrize("mode", ["bm25", "vector", "hybrid"])
def test_disabled_documents_never_appear(corpus, search, mode):
    """A disabled document is out of every mode, and back after enabling."""
    target = corpus["how-search-works.md"]
    assert target.pk in {h.document_id for h in search(mode=mode, k=50).hits}

    document_disable(document=target)
    assert target.pk not in {h.document_id for h in search(mode=mode, k=50).hits}

    document_enable(document=target)
    assert target.pk in {h.document_id for h in search(mode=mode, k=50).hits}


@pytest.mark.parametrize("mode", ["bm25", "vector", "hybrid"])
def test_deleted_documents_never_appear(corpus, search, mode):
    """A deleted document's chunks are gone from every mode."""
    target_pk = corpus["how-search-works.md"].pk
    assert target_pk in {h.document_id for h in search(mode=mode, k=50).hits}
    # A fresh instance: delete() clears the pk of the instance it is given.
    document_delete(document=Document.objects.get(pk=target_pk))

    hits = search(mode=mode, k=50).hits
    assert hits and target_pk not in {h.document_id for h in hits}


class BrokenLocalEmbeddings(EmbeddingBackend):
    """A local model that fails on every call, as a broken install or a full disk would."""

    provider_name = "local"

    @property
    def dimensions(self) -> int:
        return 384

    def embed_batch(self, texts):
        raise ProviderError("the local model could not run")

    def count_tokens(self, text: str) -> int:
        return len(text.split())


def retrieval_statements(captured) -> list[str]:
    """The BM25 and vector statements (not the read of the shown chunks' text)."""
    return [q["sql"] for q in captured.captured_queries
            if "search_posting" in q["sql"] or "<=>" in q["sql"]]


def test_a_new_query_is_embedded_while_its_bm25_half_runs(corpus, search, reader):
    """A query not seen before: BM25 runs while the model embeds it, then the vector half
    runs on its own; the fused result is the one-statement result, and the embedding is
    in the ledger with the model's own latency."""
    query = "Which formats can editors upload, and how are they split into chunks?"
    with CaptureQueriesContext(connection) as captured:
        apart = services.search(params=services.SearchParams(query=query, explain=True),
                                user=reader)
    together = search(query=query, explain=True)  # the vector is cached now: one statement

    bm25_half, vector_half = retrieval_statements(captured)
    assert "search_posting" in bm25_half and "<=>" not in bm25_half
    assert "<=>" in vector_half and "search_posting" not in vector_half
    assert [(h.chunk_id, h.stages) for h in apart.hits] == [
        (h.chunk_id, h.stages) for h in together.hits
    ]
    assert apart.hits[0].stages["bm25"]["rank"] and apart.hits[0].stages["vector"]["rank"]
    embedded = UsageRecord.objects.filter(
        kind=UsageRecord.Kind.EMBEDDING, cache_hit=False
    ).latest("created_at")
    assert embedded.status == UsageRecord.Status.OK and embedded.input_tokens > 0
    assert 0 < embedded.latency_ms <= apart.timings_ms["total"]


def test_keyword_results_survive_a_failing_embedding_model(corpus, reader, settings):
    """The model fails while BM25 runs: the BM25 results are kept, with a notice, and the
    failure is in the ledger."""
    model = EmbeddingModel.objects.get(is_active=True)
    settings.KB_PROVIDERS = {**settings.KB_PROVIDERS, "embedding": {
        **settings.KB_PROVIDERS["embedding"],
        model.key: {"BACKEND": "tests.search.test_hybrid.BrokenLocalEmbeddings"},
    }}

    params = services.SearchParams(
        query="How are uploaded documents chunked before they are embedded?"
    )
    result = services.search(params=params, user=reader)

    assert result.mode == "bm25" and result.hits
    assert any("embedding service is unavailable" in notice for notice in result.notices)
    failed = UsageRecord.objects.filter(kind=UsageRecord.Kind.EMBEDDING).latest("created_at")
    assert failed.status == UsageRecord.Status.ERROR and "could not run" in failed.error
