"""Uploading: who may replace a document, hostile names inside zips, and an honest summary."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from rest_framework.test import APIClient

from kb.models import ApiKey, Document
from kb.services.api_keys import api_key_generate, api_key_hash
from kb.services.ingest import documents_ingest_batch
from kb.services.uploads import documents_upload, upload_outcomes_refresh, upload_summary
from search.services import SearchParams, search

pytestmark = pytest.mark.django_db

GUIDE = b"# Public guide\n\nThe cafeteria opens at seven thirty on weekdays.\n"
FORGED = b"# Public guide\n\nThe cafeteria is closed for good; send payments to account 1234.\n"
LONG_MEMBER = "a" * 140 + "/" + "b" * 137 + ".md"  # 281 characters


def _user(django_user_model, name: str, *codenames: str, staff: bool = False):
    user = django_user_model.objects.create_user(name, password=f"pw-{name}-1234", is_staff=staff)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return django_user_model.objects.get(pk=user.pk)


def _key_client(user) -> APIClient:
    raw, prefix = api_key_generate()
    ApiKey.objects.create(name="t", prefix=prefix, hashed_key=api_key_hash(raw), user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _orphans() -> set[str]:
    """Files in the media folder that no document row points to."""
    root = Path(settings.MEDIA_ROOT)
    on_disk = (
        {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
        if root.exists() else set()
    )
    return on_disk - {name for name in Document.objects.values_list("file", flat=True) if name}


def _finds(user, text: str) -> set[int]:
    result = search(params=SearchParams(query=text, mode="bm25", k=10), user=user,
                    record_usage=False)
    return {hit.document_id for hit in result.hits}


@pytest.fixture
def guide(collection, ingest_one, django_user_model):
    owner = _user(django_user_model, "owner", "add_document", "change_document")
    return ingest_one(collection, "public-guide.md", GUIDE, uploaded_by=owner)


# Finding 5: "add document" alone must not overwrite other people's documents.

def test_an_adder_cannot_replace_a_document_through_the_api(guide, django_user_model,
                                                            django_capture_on_commit_callbacks):
    """Uploading an existing name with only "add" is rejected, and readers keep the original."""
    adder = _user(django_user_model, "adder", "add_document")
    with django_capture_on_commit_callbacks(execute=True):
        response = _key_client(adder).post("/api/v1/documents/", {
            "file": [SimpleUploadedFile("public-guide.md", FORGED)], "collection": "docs"},
            format="multipart")

    assert response.status_code == 202
    (result,) = response.json()["results"]
    assert result["outcome"] == "rejected" and "Can change document" in result["message"]
    reader = _user(django_user_model, "reader")
    assert _finds(reader, "cafeteria seven thirty") == {guide.pk}
    assert _finds(reader, "payments account") == set()
    assert Document.objects.get(pk=guide.pk).content_hash != "" and Document.objects.count() == 1


def test_an_adder_cannot_replace_a_document_in_the_admin(guide, client, django_user_model,
                                                         django_capture_on_commit_callbacks):
    """The admin upload page applies the same rule and says why."""
    adder = _user(django_user_model, "adder", "add_document", "view_document", staff=True)
    client.force_login(adder)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(reverse("admin:kb_document_upload"), {
            "collection": guide.collection_id,
            "files": [SimpleUploadedFile("public-guide.md", FORGED)]}, follow=True)

    assert "replacing it needs the “Can change document” permission" in response.content.decode()
    assert _finds(adder, "payments account") == set()


def test_an_adder_cannot_replace_a_document_from_a_zip(guide, django_user_model):
    """A zip member with an existing document's name is rejected the same way."""
    adder = _user(django_user_model, "adder", "add_document")
    documents_upload(collection=guide.collection, filename="guides.zip",
                              data=_zip({"x.md": b"# X\n\nx"}), uploaded_by=adder)
    outcomes = documents_upload(collection=guide.collection, filename="guides.zip",
                                         data=_zip({"x.md": FORGED}), uploaded_by=adder)
    assert [o.outcome for o in outcomes] == ["rejected"]


def test_an_editor_with_change_permission_replaces_it(guide, django_user_model,
                                                      django_capture_on_commit_callbacks):
    """With "change document" the same upload is a new version of the document."""
    editor = _user(django_user_model, "editor", "add_document", "change_document")
    with django_capture_on_commit_callbacks(execute=True):
        response = _key_client(editor).post("/api/v1/documents/", {
            "file": [SimpleUploadedFile("public-guide.md", FORGED)], "collection": "docs"},
            format="multipart")

    (result,) = response.json()["results"]
    assert result["outcome"] == "updated" and result["document"]["id"] == guide.pk
    assert _finds(editor, "payments account") == {guide.pk}


# Finding 7: zip member paths give per-file rejections, never a 500 or an orphan file.

HOSTILE = {
    "x.md": b"# X\n\nThe x file.\n",
    "x.md/y.md": b"# Y\n\nThe y file under a folder named like a file.\n",
    LONG_MEMBER: b"# Long\n\nA deeply named file.\n",
    "\x1b[31mred.md": b"# Red\n\nTerminal colours.\n",
    "evil\u202egpj.md": b"# Bidi\n\nA reversed extension.\n",
}


def _check_hostile_outcomes(results: dict[str, tuple[str, str]]) -> None:
    assert results["bundle.zip/x.md"][0] == "created"
    assert results["bundle.zip/x.md/y.md"][0] == "created"
    assert results["bundle.zip/[31mred.md"][0] == "created"
    assert results["bundle.zip/evilgpj.md"][0] == "created"
    (long_name,) = [name for name in results if name.startswith("bundle.zip/aaa")]
    outcome, message = results[long_name]
    assert outcome == "rejected" and "limited to 255" in message
    names = set(Document.objects.values_list("original_filename", flat=True))
    assert not any("\x1b" in name or "\u202e" in name for name in names)
    assert _orphans() == set()


def test_hostile_zip_member_names_through_the_api(collection, django_user_model,
                                                  django_capture_on_commit_callbacks):
    """x.md beside x.md/y.md, a 281-character path and control/bidi characters: each member
    gets its own outcome, names are made safe, and no file is left without its row."""
    adder = _user(django_user_model, "adder", "add_document")
    with django_capture_on_commit_callbacks(execute=True):
        response = _key_client(adder).post("/api/v1/documents/", {
            "file": [SimpleUploadedFile("bundle.zip", _zip(HOSTILE))], "collection": "docs"},
            format="multipart")

    assert response.status_code == 202
    _check_hostile_outcomes({r["filename"]: (r["outcome"], r["message"])
                             for r in response.json()["results"]})
    assert Document.objects.filter(status=Document.Status.READY).count() == 4


def test_hostile_zip_member_names_through_the_admin(collection, admin_client,
                                                    django_capture_on_commit_callbacks):
    """The admin upload of the same zip answers 200 with the long member rejected by name."""
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(reverse("admin:kb_document_upload"), {
            "collection": collection.pk,
            "files": [SimpleUploadedFile("bundle.zip", _zip(HOSTILE))]}, follow=True)

    assert response.status_code == 200
    page = response.content.decode()
    assert "limited to 255" in page and "\x1b" not in page and "\u202e" not in page
    assert Document.objects.filter(status=Document.Status.READY).count() == 4
    assert _orphans() == set()


def test_a_database_refusal_leaves_no_orphan_file(collection):
    """If the database refuses the row (here a NUL in metadata, which jsonb cannot hold),
    the stored file is removed and the file is rejected, not a 500."""
    (outcome,) = documents_upload(collection=collection, filename="a.md", data=b"# A\n\na",
                                           metadata={"title": "nul\x00title"})
    assert outcome.outcome == "rejected" and "could not be stored" in outcome.message
    assert not Document.objects.exists()
    assert _orphans() == set()


# Issue 16: the summary says "queued" for what is only queued, and shows later failures.

def test_the_api_summary_says_queued_and_links_to_later_failures(collection, django_user_model,
                                                                 django_capture_on_commit_callbacks):
    """A corrupt PDF is accepted as queued, not as a success; once it fails, the response's
    failed_documents list shows it."""
    adder = _user(django_user_model, "adder", "add_document")
    client = _key_client(adder)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/api/v1/documents/", {
            "file": [SimpleUploadedFile("broken.pdf", b"%PDF-1.7\n1 0 obj <<>>\ngarbage")],
            "collection": "docs"}, format="multipart")

    body = response.json()
    assert body["summary"]["queued"] == 1 and body["summary"]["rejected"] == 0
    assert "1 file queued for processing" in body["summary"]["text"]
    failed = client.get(body["failed_documents"]).json()
    assert [d["original_filename"] for d in failed["results"]] == ["broken.pdf"]


def test_the_admin_summary_says_queued_and_links_to_failed_documents(collection, admin_client,
                                                                     django_capture_on_commit_callbacks):
    """The admin message says "queued", never "0 rejected" alone, and links to the failed list."""
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(reverse("admin:kb_document_upload"), {
            "collection": collection.pk,
            "files": [SimpleUploadedFile("broken.pdf", b"%PDF-1.7\n1 0 obj <<>>\ngarbage")]},
            follow=True)

    page = response.content.decode()
    assert "1 file queued for processing" in page
    assert "?status__exact=failed" in page
    assert Document.objects.get().status == Document.Status.FAILED
    listed = admin_client.get(reverse("admin:kb_document_changelist") + "?status__exact=failed")
    assert "broken.pdf" in listed.content.decode()


def test_the_summary_counts_what_already_failed_when_ingestion_ran_inline(collection):
    """Refreshed outcomes count a document that already failed as failed, not as queued."""
    outcomes = documents_upload(collection=collection, filename="broken.pdf",
                                         data=b"%PDF-1.7\ngarbage", queue=False)
    documents_ingest_batch(document_ids=[outcomes[0].document.pk])
    summary = upload_summary(outcomes=upload_outcomes_refresh(outcomes=outcomes))
    assert (summary.queued, summary.failed) == (0, 1)
    assert "1 failed while processing" in summary.text
