"""Retrieval evidence for chat's answerability decision: the legs' agreement and similarity
from the candidates, and the query terms' coverage of a chunk."""

from __future__ import annotations

import pytest

from search import services
from search.bm25 import query_term_coverage
from search.retrieval import Candidate

pytestmark = pytest.mark.django_db


@pytest.fixture
def corpus(shared_corpus, db):
    return shared_corpus.documents


def test_evidence_summarises_the_candidates_without_a_query():
    """Top similarity, its margin over the median, and top-5 agreement of the two legs."""
    candidates = [
        Candidate(chunk_id=1, bm25_score=9.0, bm25_rank=1, vector_similarity=0.8, vector_rank=1),
        Candidate(chunk_id=2, bm25_score=5.0, bm25_rank=2),
        Candidate(chunk_id=3, vector_similarity=0.4, vector_rank=2),
        Candidate(chunk_id=4, vector_similarity=0.2, vector_rank=3),
    ]

    evidence = services.retrieval_evidence(candidates)

    assert evidence.top_similarity == 0.8 and evidence.top_bm25 == 9.0
    assert evidence.similarity_margin == pytest.approx(0.8 - 0.4)
    # One chunk in both top lists, out of the two the BM25 leg has.
    assert evidence.agreement == 0.5
    assert services.retrieval_evidence([]).top_similarity is None


def test_search_results_carry_their_evidence(corpus, reader):
    params = services.SearchParams(query="How does hybrid search fuse results?")
    result = services.search(params=params, user=reader, record_usage=False)

    assert result.evidence.top_similarity is not None and result.evidence.agreement > 0


def test_coverage_is_the_share_of_query_idf_a_chunk_matches(corpus, reader):
    """Every query term in the chunk: 1; an unknown word weighs most, so it drags coverage down."""
    result = services.search(params=services.SearchParams(query="hybrid search", mode="bm25"),
                             user=reader, record_usage=False)
    top = result.hits[0].chunk_id

    full = query_term_coverage(chunk_ids=[top], lexemes=result.query_lexemes)
    diluted = query_term_coverage(chunk_ids=[top], lexemes=[*result.query_lexemes, "zxqvblorp"])

    assert full[top] == pytest.approx(1.0)
    assert 0 < diluted[top] < 0.5
    assert query_term_coverage(chunk_ids=[], lexemes=["x"]) == {}
