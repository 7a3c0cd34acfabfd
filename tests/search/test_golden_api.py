"""Golden sets over REST, with the golden set admin's permissions and collection access."""

from __future__ import annotations

import pytest

from kb.services.collections import collection_get_or_create
from search.models import GoldenQuery, GoldenSet
from tests.kb.test_management_api import client_for, user_with
from tests.search.test_golden import TOPICS, harbour  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db

CURATOR = ("view_goldenquery", "add_goldenquery", "change_goldenquery", "delete_goldenquery")


def test_a_golden_query_is_added_changed_and_removed(harbour, collection,  # noqa: F811
                                                     django_user_model):
    api, _ = client_for(user_with(django_user_model, "curator", *CURATOR))
    made = api.post("/api/v1/golden-queries/", {
        "collection": "docs", "question": "When is the Pier 7 gauge calibrated?",
        "documents": [harbour["tides.md"].pk]}, format="json")
    assert made.status_code == 201, made.content
    assert made.json()["version"] == 1 and made.json()["documents"] == [harbour["tides.md"].pk]
    path = f"/api/v1/golden-queries/{made.json()['id']}/"
    changed = api.patch(path, {"documents": [harbour["tides.md"].pk, harbour["buoys.md"].pk]},
                        format="json")
    assert changed.status_code == 200 and len(changed.json()["documents"]) == 2
    assert [q["id"] for q in api.get("/api/v1/golden-queries/",
                                     {"collection": "docs"}).json()["results"]] == [
        made.json()["id"]]
    assert api.delete(path).status_code == 204
    assert not GoldenQuery.objects.exists()
    assert GoldenSet.objects.get(collection=collection).version == 3


def test_documents_must_be_the_collections_and_the_collection_readable(
    harbour, django_user_model, ingest_one  # noqa: F811
):
    hidden = collection_get_or_create(slug="hidden")
    hidden.is_public = False
    hidden.save()
    stray = ingest_one(collection_get_or_create(slug="other"), "x.md", "# X\n\nElsewhere.\n")
    api, _ = client_for(user_with(django_user_model, "curator", *CURATOR))
    wrong = api.post("/api/v1/golden-queries/", {"collection": "docs", "question": "Where?",
                                                 "documents": [stray.pk]}, format="json")
    assert wrong.status_code == 400 and "documents" in wrong.json()["error"]["fields"]
    unreadable = api.post("/api/v1/golden-queries/", {"collection": "hidden",
                                                      "question": "Where?",
                                                      "documents": [stray.pk]}, format="json")
    assert unreadable.status_code == 400
    assert "collection" in unreadable.json()["error"]["fields"]


def test_reading_is_not_writing(harbour, django_user_model):  # noqa: F811
    viewer, _ = client_for(user_with(django_user_model, "viewer", "view_goldenquery"))
    assert viewer.get("/api/v1/golden-queries/").status_code == 200
    assert viewer.post("/api/v1/golden-queries/", {}, format="json").status_code == 403
    nobody, _ = client_for(user_with(django_user_model, "nobody"))
    assert nobody.get("/api/v1/golden-queries/").status_code == 403
