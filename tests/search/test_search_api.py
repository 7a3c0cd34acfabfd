"""`/api/v1/search` over HTTP: parameters, validation, authentication, throttling, OpenAPI."""

from __future__ import annotations

import json
import re

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.utils import timezone
from rest_framework.test import APIClient

from kb.models import ApiKey, Chunk
from kb.services.api_keys import api_key_generate, api_key_hash

URL = "/api/v1/search"

pytestmark = pytest.mark.django_db


@pytest.fixture
def user(db):
    return get_user_model().objects.create_user(username="reader", password="a long passphrase 42")


@pytest.fixture
def raw_key(user) -> str:
    raw, prefix = api_key_generate()
    ApiKey.objects.create(name="test", prefix=prefix, hashed_key=api_key_hash(raw), user=user)
    return raw


@pytest.fixture
def client(raw_key) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    return client


@pytest.fixture
def corpus(shared_corpus, db):
    """Five real documents ingested once for the module; only uploading-documents.md has
    audience=editors (tests/search/conftest.py)."""
    return shared_corpus.documents


def test_get_returns_results_with_the_documented_fields(client, corpus):
    """GET with query parameters: chunk id, document id and title, text, snippet, score."""
    response = client.get(URL, {"query": "reciprocal rank fusion", "k": 3})

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["mode"] == "hybrid" and body["reranked"] is False
    assert 1 <= len(body["results"]) <= 3
    hit = body["results"][0]
    assert {"chunk_id", "document_id", "document_title", "text", "snippet", "score"} <= set(hit)
    search_doc = corpus["how-search-works.md"]
    assert hit["document_id"] == search_doc.pk and hit["document_title"] == "How search works"
    assert "<mark>" in hit["snippet"]
    assert "stages" not in hit and "timings_ms" not in body
    assert list(body) == ["query", "mode", "reranked", "results", "notices"]
    assert list(hit) == ["chunk_id", "document_id", "document_title", "text", "snippet", "score",
                         "heading_path", "page_start", "page_end", "url"]
    assert hit["url"] == f"/documents/{search_doc.pk}/#chunk-{hit['chunk_id']}"
    # The one place that builds it: the chunk row says the same.
    assert hit["url"] == Chunk.objects.get(pk=hit["chunk_id"]).get_absolute_url()


def test_post_json_with_explain_filters_and_collection(client, corpus, shared_corpus):
    """POST JSON: mode, collection, filters and explain are honoured."""
    response = client.post(URL, {
        "query": "upload a zip file", "k": 5, "mode": "bm25",
        "collection": [shared_corpus.collection.slug],
        "filters": {"metadata": {"audience": "editors"}}, "explain": True,
    }, format="json")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["mode"] == "bm25"
    editors = corpus["uploading-documents.md"]
    assert body["results"] and {hit["document_id"] for hit in body["results"]} == {editors.pk}
    assert {"bm25", "vector", "fused"} <= set(body["results"][0]["stages"])
    assert {"retrieve", "total"} <= set(body["timings_ms"])
    assert list(body) == ["query", "mode", "reranked", "results", "notices", "timings_ms"]
    assert list(body["results"][0])[-2:] == ["url", "stages"]


def test_get_filters_as_a_json_string(client, corpus):
    """On GET, filters is a JSON object in a query parameter."""
    target = corpus["how-search-works.md"]
    response = client.get(URL, {"query": "upload",
                                "filters": json.dumps({"document_ids": [target.pk]})})

    assert response.status_code == 200
    results = response.json()["results"]
    assert results and {hit["document_id"] for hit in results} == {target.pk}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"query": "x", "k": 0}, "k"),
        ({"query": "x", "k": 101}, "k"),
        ({"query": "x", "k": "ten"}, "k"),
        ({"query": "x", "mode": "fuzzy"}, "mode"),
        ({"query": "x", "filters": "{not json"}, "filters"),
        ({"query": "x", "filters": "[1, 2]"}, "filters"),
        ({"query": "x", "filters": json.dumps({"document_ids": ["a"]})}, "filters"),
        ({"query": "x", "filters": json.dumps({"created_after": "yesterday"})}, "filters"),
        ({"k": 5}, "query"),
    ],
)
def test_invalid_parameters_get_400_with_field_messages(client, db, params, field):
    """Bad parameters are a 400 naming the field, never a 500."""
    response = client.get(URL, params)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid"
    assert field in error["fields"] and error["fields"][field]


def test_nul_byte_in_query_is_a_400(client, db):
    """A NUL byte cannot reach PostgreSQL: the API rejects it as a field error."""
    response = client.post(URL, {"query": "a\x00b"}, format="json")

    assert response.status_code == 400
    assert "query" in response.json()["error"]["fields"]


def test_without_credentials_is_401(db):
    """No credentials: 401 with a Bearer challenge."""
    response = APIClient().get(URL, {"query": "x"})

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"


def test_revoked_or_unknown_key_is_401(user, raw_key):
    """A revoked key and a made-up key are both refused."""
    ApiKey.objects.filter(user=user).update(revoked_at=timezone.now())
    for key in (raw_key, "kb_made_up_key"):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
        assert client.get(URL, {"query": "x"}).status_code == 401


def test_session_authentication(user, corpus):
    """A logged-in browser session may search; its POSTs need the CSRF token (403 without)."""
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(user)

    assert client.get(URL, {"query": "fusion"}).status_code == 200
    response = client.post(URL, {"query": "fusion"}, format="json")
    assert response.status_code == 403
    assert "CSRF" in response.json()["error"]["message"]


def test_rate_limit_gives_429_with_retry_after(client, db, settings):
    """Past the configured rate, search answers 429 with Retry-After in seconds."""
    settings.RATELIMIT_ENABLE = True
    settings.KB_RATELIMITS = {**settings.KB_RATELIMITS, "search": "2/m"}
    cache.clear()
    try:
        statuses = [client.get(URL, {"query": "x"}).status_code for _ in range(2)]
        limited = client.get(URL, {"query": "x"})
    finally:
        cache.clear()

    assert statuses == [200, 200]
    assert limited.status_code == 429
    assert 1 <= int(limited["Retry-After"]) <= 60
    assert limited.json()["error"]["code"] == "throttled"


def test_openapi_schema_describes_search(db):
    """/api/schema/ is an OpenAPI 3 document with the search endpoint's parameters."""
    response = APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")

    assert response.status_code == 200
    schema = json.loads(response.content)
    assert schema["openapi"].startswith("3.")
    operation = schema["paths"]["/api/v1/search"]["get"]
    names = {p["name"] for p in operation["parameters"]}
    assert {"query", "k", "mode", "rerank", "collection", "filters", "explain"} <= names
    assert "post" in schema["paths"]["/api/v1/search"]


def test_docs_page_renders_without_a_cdn(db):
    """/api/docs/ loads Swagger UI from our own static files."""
    response = APIClient().get("/api/docs/")

    assert response.status_code == 200
    html = response.content.decode()
    assert "swagger-ui" in html.lower()
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", html)
    assert urls
    assert not [url for url in urls if url.startswith(("http:", "https:", "//"))], urls
    assert not re.search(r"cdn|jsdelivr|unpkg|cdnjs", html, re.IGNORECASE)
