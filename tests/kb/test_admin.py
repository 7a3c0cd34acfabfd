"""The editors' admin: upload, progress, chunk preview, actions, counts without N+1."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from kb.models import Document

SAMPLES = Path(__file__).resolve().parents[2] / "fixtures" / "samples"

pytestmark = pytest.mark.django_db


@pytest.fixture
def editor(admin_client, django_capture_on_commit_callbacks):
    return admin_client


def upload(client, django_capture_on_commit_callbacks, collection, *names):
    files = [SimpleUploadedFile(name, (SAMPLES / name).read_bytes()) for name in names]
    with django_capture_on_commit_callbacks(execute=True):
        return client.post(
            reverse("admin:kb_document_upload"),
            {"collection": collection.pk, "files": files},
            follow=True,
        )


def test_upload_several_files_at_once(editor, collection, django_capture_on_commit_callbacks):
    """Several files in one upload each become a ready document, with a summary message."""
    response = upload(editor, django_capture_on_commit_callbacks, collection, "guide.md",
                      "policy.docx")

    assert response.status_code == 200
    assert "2 files queued for processing" in response.content.decode()
    assert set(Document.objects.values_list("status", flat=True)) == {Document.Status.READY}


def test_changelist_shows_progress_and_polls(editor, collection,
                                             django_capture_on_commit_callbacks):
    """The list shows status and progress cells the page script refreshes from JSON."""
    upload(editor, django_capture_on_commit_callbacks, collection, "guide.md")
    document = Document.objects.get()

    page = editor.get(reverse("admin:kb_document_changelist")).content.decode()
    progress = editor.get(reverse("admin:kb_document_progress"), {"ids": str(document.pk)}).json()

    assert f'data-document-progress="{document.pk}"' in page
    assert "kb/admin_progress.js" in page
    (row,) = progress["documents"]
    assert row["status"] == "ready" and row["chunks_embedded"] == row["chunks_total"] > 0


def test_document_page_previews_chunks_read_only(editor, collection,
                                                 django_capture_on_commit_callbacks):
    """The change page lists the current chunks with tokens and heading path."""
    upload(editor, django_capture_on_commit_callbacks, collection, "guide.md")
    document = Document.objects.get()

    page = editor.get(reverse("admin:kb_document_change", args=[document.pk])).content.decode()

    assert "Chunks (current version, read-only)" in page
    assert document.chunks.first().text[:40].split("\n")[0] in page


def test_disable_action_and_failed_retry(editor, collection, django_capture_on_commit_callbacks):
    """Admin actions queue the services: disable takes a document out; retry re-runs a failure."""
    upload(editor, django_capture_on_commit_callbacks, collection, "guide.md")
    document = Document.objects.get()
    changelist = reverse("admin:kb_document_changelist")

    editor.post(changelist, {"action": "disable", "_selected_action": [document.pk]})
    assert Document.objects.get().status == Document.Status.DISABLED

    Document.objects.filter(pk=document.pk).update(status=Document.Status.FAILED)
    with django_capture_on_commit_callbacks(execute=True):
        editor.post(changelist, {"action": "retry_failed", "_selected_action": [document.pk]})
    assert Document.objects.get().status == Document.Status.READY


def test_collection_counts_take_constant_queries(editor, collection, django_assert_max_num_queries,
                                                 django_capture_on_commit_callbacks):
    """The collection list annotates its counts instead of a query per row."""
    from kb.services.collections import collection_get_or_create

    for slug in ["a", "b", "c", "d"]:
        collection_get_or_create(slug=slug)
    upload(editor, django_capture_on_commit_callbacks, collection, "guide.md")

    with django_assert_max_num_queries(8):
        response = editor.get(reverse("admin:kb_collection_changelist"))
    assert response.status_code == 200


def test_reembed_page_lists_other_models(editor):
    """The re-embed page offers configured models other than the active one."""
    page = editor.get(reverse("admin:kb_embeddingmodel_reembed")).content.decode()
    assert "openai" in page


def test_staff_without_the_add_permission_cannot_upload(client, django_user_model, collection):
    """Staff who may only view documents get a 403 from the upload page, and no button."""
    from django.contrib.auth.models import Permission

    viewer = django_user_model.objects.create_user("viewer", password="pw-viewer-123",
                                                   is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_document"),
                                Permission.objects.get(codename="change_document"))
    client.force_login(viewer)

    assert client.get(reverse("admin:kb_document_upload")).status_code == 403
    changelist = client.get(reverse("admin:kb_document_changelist"))
    assert changelist.status_code == 200
    assert reverse("admin:kb_document_upload") not in changelist.content.decode()
    response = client.post(reverse("admin:kb_document_upload"), {
        "collection": collection.pk, "files": [SimpleUploadedFile("a.md", b"# A")]})
    assert response.status_code == 403
    assert not Document.objects.exists()
