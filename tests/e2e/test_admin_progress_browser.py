"""The admin's live progress (kb/static/kb/admin_progress.js) in a real headless Chromium."""

from __future__ import annotations

import pytest

from tests.browser import chromium_available, chromium_start
from tests.live_server import running_asgi_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not chromium_available(), reason="needs Debian's chromium-driver"),
]


@pytest.fixture
def browser():
    driver = chromium_start()
    yield driver
    driver.quit()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("page", ["list", "detail"])
def test_progress_updates_without_a_reload(page, browser, client, admin_user, tmp_path):
    """A pending document's stage, chunk count and status change on the open page as the
    worker moves it on, in the document list and on the document's own page."""
    from django.urls import reverse
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from kb.models import Document
    from kb.services.collections import collection_get_or_create
    from kb.services.uploads import document_upload

    collection = collection_get_or_create(slug="docs", name="Docs")
    document = document_upload(collection=collection, filename="notes.md",
                                        data=b"# Notes\n\nTides.", queue=False).document
    client.force_login(admin_user)
    path = (reverse("admin:kb_document_changelist") if page == "list"
            else reverse("admin:kb_document_change", args=[document.pk]))

    with running_asgi_server() as base:
        browser.get(f"{base}/healthz")
        browser.add_cookie({"name": "sessionid", "value": client.cookies["sessionid"].value,
                            "path": "/"})
        browser.get(f"{base}{path}")
        progress = browser.find_element(By.CSS_SELECTOR,
                                        f"[data-document-progress='{document.pk}']")
        status = browser.find_element(By.CSS_SELECTOR, f"[data-document-status='{document.pk}']")
        assert status.text == "Pending"
        wait = WebDriverWait(browser, 20)

        Document.objects.filter(pk=document.pk).update(
            status=Document.Status.PROCESSING, stage=Document.Stage.EMBEDDING,
            chunks_embedded=3, chunks_total=10,
        )
        wait.until(lambda _: "3/10 chunks" in progress.text)
        assert status.text == "Processing"

        Document.objects.filter(pk=document.pk).update(status=Document.Status.READY,
                                                        chunks_embedded=10, title="Tide notes")
        wait.until(lambda _: status.text == "Ready")
        browser.save_screenshot(str(tmp_path / f"progress-{page}.png"))
        assert "10 chunks" in progress.text
        if page == "list":
            # The title parsing found replaces the file name without a reload.
            title = browser.find_element(By.CSS_SELECTOR, f"[data-document-title='{document.pk}']")
            assert title.text == "Tide notes"
        if page == "detail":
            assert "Reload to see its chunks" in progress.text
