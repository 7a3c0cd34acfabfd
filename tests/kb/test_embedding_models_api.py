"""Re-embedding over REST: start it (202 with the job's URL), follow its progress, activate,
cancel, drop vectors; with the admin's permissions, and never from a narrowed key."""

from __future__ import annotations

import pytest

from kb import embeddings
from kb.models import ChunkEmbedding, EmbeddingModel
from tests.kb.test_management_api import client_for, user_with
from tests.kb.test_reembedding import corpus, fake_embedder  # noqa: F401  (fixtures)

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(django_user_model):
    return user_with(django_user_model, "operator", "view_embeddingmodel",
                     "change_embeddingmodel")


def test_a_reembedding_answers_202_with_a_job_url_that_shows_it_done(
    operator, corpus, fake_embedder, django_capture_on_commit_callbacks  # noqa: F811
):
    api, _ = client_for(operator)
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/embedding-models/", {"key": "fake", "activate": False},
                            format="json")
    assert response.status_code == 202
    assert response["Location"].endswith("/api/v1/embedding-models/fake/")
    job = api.get(response["Location"]).json()
    assert job["status"] == "ready" and job["progress"] == 100.0 and job["error_message"] == ""
    assert job["chunks_embedded"] == job["chunks_total"] > 0

    activated = api.post("/api/v1/embedding-models/fake/activate/")
    assert activated.status_code == 200 and activated.json()["is_active"] is True
    listed = api.get("/api/v1/embedding-models/").json()
    assert listed[0]["key"] == "fake"

    with django_capture_on_commit_callbacks(execute=True):
        dropped = api.post("/api/v1/embedding-models/minilm-int8/drop-vectors/")
    assert dropped.status_code == 202
    assert api.get(dropped["Location"]).json()["status"] == "retired"
    assert not ChunkEmbedding.objects.filter(embedding_model__key="minilm-int8").exists()


def test_refusals_are_400s_that_say_why(operator, corpus):  # noqa: F811
    api, _ = client_for(operator)
    unknown = api.post("/api/v1/embedding-models/", {"key": "nope"}, format="json")
    assert unknown.status_code == 400 and "nope" in str(unknown.json()["error"]["fields"])
    active = api.post("/api/v1/embedding-models/minilm-int8/drop-vectors/")
    assert active.status_code == 400
    assert "activate another first" in str(active.json()["error"]["fields"])
    assert EmbeddingModel.objects.get(key="minilm-int8").is_active


def test_cancel_stops_a_building_model(operator, corpus, fake_embedder):  # noqa: F811
    api, _ = client_for(operator)
    embeddings.reembed_start(key="fake")  # as the POST does, before its job runs
    cancelled = api.post("/api/v1/embedding-models/fake/cancel/")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


@pytest.mark.parametrize("codenames, method, path, expected", [
    ((), "get", "/api/v1/embedding-models/", 403),
    (("view_embeddingmodel",), "get", "/api/v1/embedding-models/", 200),
    (("view_embeddingmodel",), "post", "/api/v1/embedding-models/minilm-int8/cancel/", 403),
    (("change_embeddingmodel",), "post", "/api/v1/embedding-models/minilm-int8/cancel/", 200),
])
def test_the_admins_permissions_apply(django_user_model, corpus, codenames, method,  # noqa: F811
                                      path, expected):
    api, _ = client_for(user_with(django_user_model, "someone", *codenames))
    assert getattr(api, method)(path).status_code == expected


def test_a_narrowed_key_cannot_change_the_whole_base(operator, corpus):  # noqa: F811
    api, _ = client_for(operator, collections=[corpus])
    response = api.post("/api/v1/embedding-models/minilm-int8/cancel/")
    assert response.status_code == 403
    assert "narrowed" in response.json()["error"]["message"]
    assert api.get("/api/v1/embedding-models/").status_code == 200
