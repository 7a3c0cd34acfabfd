"""HTTPReranker against a real local /rerank server in Cohere, Jina and TEI shapes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from kb.providers.base import ProviderError
from kb.providers.http_rerank import MISSING_SCORE, HTTPReranker
from tests.fakes.openai_server import FakeOpenAIServer, Fault, word_overlap

QUERY = "how do I reset my password"
DOCUMENTS = [
    "Billing happens monthly.",
    "To reset your password open settings.",
    "Password rules: at least twelve characters.",
    "How do I reset my password? Click reset.",
]
EXPECTED = [word_overlap(QUERY, document) for document in DOCUMENTS]


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture
def make_reranker(server):
    rerankers: list[HTTPReranker] = []

    def make(**options) -> HTTPReranker:
        options.setdefault("url", server.rerank_url)
        options.setdefault("timeout", 1.0)
        reranker = HTTPReranker(model=options.pop("model", "rerank-v3.5"), **options)
        rerankers.append(reranker)
        return reranker

    yield make
    for reranker in rerankers:
        reranker.close()


def test_cohere_shape_scores_come_back_in_input_order(server, make_reranker):
    """Cohere returns results sorted by score; the backend restores input order."""
    result = make_reranker(api_key="co-key").rerank(QUERY, DOCUMENTS)

    assert result.scores == EXPECTED
    assert result.input_tokens == 1  # meta.billed_units.search_units
    (request,) = server.requests
    assert request.path == "/rerank"
    assert request.headers["authorization"] == "Bearer co-key"
    assert request.body == {
        "query": QUERY,
        "documents": DOCUMENTS,
        "top_n": len(DOCUMENTS),
        "model": "rerank-v3.5",
    }


def test_tei_shape_bare_list_is_accepted(server, make_reranker):
    """TEI takes {"query", "texts"} and answers a bare [{"index", "score"}] list."""
    result = make_reranker(api="tei", model="").rerank(QUERY, DOCUMENTS)

    assert result.scores == EXPECTED
    assert result.input_tokens == 0
    assert server.requests[0].body == {"query": QUERY, "texts": DOCUMENTS}
    assert "authorization" not in server.requests[0].headers


def test_either_response_shape_is_accepted_for_either_request(server, make_reranker):
    """A Cohere-style request answered with a bare list still parses."""
    server.rerank_shape = "tei"

    assert make_reranker().rerank(QUERY, DOCUMENTS).scores == EXPECTED


def test_jina_usage_is_reported_as_input_tokens(server, make_reranker):
    """Jina reports usage.total_tokens, which becomes input_tokens."""
    server.rerank_shape = "jina"

    result = make_reranker().rerank(QUERY, DOCUMENTS)

    assert result.scores == EXPECTED
    assert result.input_tokens > 0


def test_documents_the_server_left_out_get_the_missing_score(server, make_reranker):
    """With top_n below the document count, unreturned documents sort last."""
    result = make_reranker(top_n=2).rerank(QUERY, DOCUMENTS)

    assert server.requests[0].body["top_n"] == 2
    best_two = sorted(range(len(DOCUMENTS)), key=lambda i: -EXPECTED[i])[:2]
    for index, score in enumerate(result.scores):
        assert score == (EXPECTED[index] if index in best_two else MISSING_SCORE)


def test_batch_size_splits_requests_and_keeps_order(server, make_reranker):
    """batch_size caps documents per request (TEI's default limit is 32)."""
    result = make_reranker(api="tei", batch_size=3).rerank(QUERY, DOCUMENTS)

    assert [len(r.body["texts"]) for r in server.requests] == [3, 1]
    assert result.scores == EXPECTED


def test_no_documents_sends_nothing(server, make_reranker):
    """An empty candidate list costs no request."""
    result = make_reranker().rerank(QUERY, [])

    assert result.scores == []
    assert server.requests == []


def test_rate_limit_and_server_error_are_retried(server, make_reranker):
    """A 429 with Retry-After then a 502 are both retried, honouring the header."""
    server.enqueue(Fault(status=429, retry_after=0.2), Fault(status=502, retry_after_ms=10))
    started = time.monotonic()

    result = make_reranker().rerank(QUERY, DOCUMENTS)

    assert result.scores == EXPECTED
    assert len(server.requests) == 3
    assert 0.2 <= time.monotonic() - started < 2.0


def test_timeout_then_success(server, make_reranker):
    """A slow response is abandoned after `timeout` and the request retried."""
    server.enqueue(Fault(delay=1.0))

    result = make_reranker(timeout=0.2).rerank(QUERY, DOCUMENTS)

    assert result.scores == EXPECTED
    assert len(server.requests) == 2


def test_giving_up_raises_provider_error(server, make_reranker):
    """Persistent 500s end in a ProviderError naming the endpoint, status and attempts."""
    server.enqueue(*[Fault(status=500, retry_after=0.01)] * 2)

    with pytest.raises(ProviderError) as caught:
        make_reranker(max_attempts=2).rerank(QUERY, DOCUMENTS)

    assert str(caught.value).startswith(f"rerank 'rerank-v3.5' at {server.rerank_url}: HTTP 500")
    assert "after 2 attempts" in str(caught.value)
    assert caught.value.status_code == 500
    assert caught.value.retryable is True


def test_malformed_json_is_a_provider_error(server, make_reranker):
    """A truncated body raises ProviderError, not JSONDecodeError, and is not retried."""
    server.enqueue(Fault(malformed_json=True))

    with pytest.raises(ProviderError, match="malformed JSON response"):
        make_reranker().rerank(QUERY, DOCUMENTS)
    assert len(server.requests) == 1


def test_wrong_endpoint_is_a_provider_error(server, make_reranker):
    """A URL that is not a rerank endpoint gives a ProviderError, not a raw HTTP error."""
    reranker = make_reranker(url=server.base_url + "/embeddings")

    with pytest.raises(ProviderError, match="HTTP 400"):
        reranker.rerank(QUERY, DOCUMENTS)
    with pytest.raises(ProviderError, match="HTTP 404 after 1 attempt"):
        make_reranker(url=server.url + "/nope").rerank(QUERY, DOCUMENTS)


def test_a_url_is_required():
    """Misconfiguration fails at construction, with a message that says what is missing."""
    with pytest.raises(ProviderError, match="needs a `url` option"):
        HTTPReranker(model="m")
