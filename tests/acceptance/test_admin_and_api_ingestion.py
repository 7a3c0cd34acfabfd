"""An editor uploads every supported format through the admin in a real browser and through the
API with a key; the real workers ingest them, progress moves on the open page, and search finds
each file's text."""

from __future__ import annotations

import re
import time
import zipfile

import pytest

from tests.acceptance.conftest import EDITOR, SAMPLES, documents_wait_ready, search_titles

pytestmark = pytest.mark.slow

# A query each file answers, and the file whose document must come up for it.
EXPECTED_HITS = {
    "manual.pdf": "never open the valve chamber while the pumps are running",
    "policy.docx": "visitor network voucher code from reception",
    "article.html": "composting at home",
    "guide.md": "deploying the tide tables service container",
    "notes-latin1.txt": "budget prévisionnel de la fête d'été",
    "quokka-census.md": "quokka census on Rottnest Island",
    "lighthouse-log.txt": "lighthouse keeper lamp hours ledger",
}
ZIP_MEMBERS = {
    "quokka-census.md": "# Quokka census\n\nThe quokka census on Rottnest Island counted 1,204 "
                        "quokkas this spring, twelve more than last year.\n",
    "lighthouse-log.txt": "The lighthouse keeper logs the lamp hours every night in the "
                          "brass-bound ledger kept beside the lens.\n",
}
SAMPLE_FILES = ["manual.pdf", "policy.docx", "article.html", "guide.md", "notes-latin1.txt"]


def _zip(path):
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in ZIP_MEMBERS.items():
            archive.writestr(f"field-notes/{name}", text)
    return path


def _assert_each_file_is_found(server, collection: str) -> None:
    documents = documents_wait_ready(server, collection=collection, count=len(EXPECTED_HITS))
    names = {d["id"]: d["original_filename"] for d in documents}
    for filename, query in EXPECTED_HITS.items():
        hits = search_titles(server, query=query, collection=collection, k=3)
        found = [names.get(hit["document_id"], "") for hit in hits]
        assert any(name.endswith(filename) for name in found), (filename, query, found)


def test_editor_uploads_every_format_in_the_admin_and_sees_live_progress(kb_server, browser,
                                                                         tmp_path):
    """PDF, DOCX, HTML, Markdown, text and a zip go through the admin's upload form; the list's
    status and progress change on the open page, without a reload, until every row is Ready;
    then search finds each file's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    paths = [str(SAMPLES / name) for name in SAMPLE_FILES] + [str(_zip(tmp_path / "notes.zip"))]
    browser.get(f"{kb_server.base}/admin/login/")
    browser.find_element(By.ID, "id_username").send_keys(EDITOR[0])
    browser.find_element(By.ID, "id_password").send_keys(EDITOR[1])
    browser.find_element(By.CSS_SELECTOR, "#login-form [type=submit]").click()
    WebDriverWait(browser, 30).until(lambda b: "/admin/login/" not in b.current_url)

    browser.get(f"{kb_server.base}/admin/kb/document/upload/")
    Select(browser.find_element(By.ID, "id_collection")).select_by_visible_text("Handbook")
    browser.find_element(By.ID, "id_files").send_keys("\n".join(paths))
    browser.find_element(By.CSS_SELECTOR, ".kb-upload-form [type=submit]").click()
    WebDriverWait(browser, 60).until(lambda b: b.current_url.endswith("/admin/kb/document/"))
    errors = browser.find_elements(By.CSS_SELECTOR, ".messagelist .error")
    assert not errors, [error.text for error in errors]

    # Marks this page: a reload or navigation would lose the mark.
    browser.execute_script("window.kbSamePage = true;")
    statuses = browser.find_elements(By.CSS_SELECTOR, "[data-document-status]")
    assert len(statuses) == len(EXPECTED_HITS)
    first_seen = [status.text for status in statuses]
    assert {"Pending", "Processing"} & set(first_seen), first_seen

    seen: set[tuple[str, str]] = set()
    deadline = time.monotonic() + 300
    while not all(status.text == "Ready" for status in statuses):
        for progress in browser.find_elements(By.CSS_SELECTOR, "[data-document-progress]"):
            seen.add((progress.get_attribute("data-document-progress"), progress.text))
        failed = [status.get_attribute("title") for status in statuses if status.text == "Failed"]
        assert not failed, failed
        assert time.monotonic() < deadline, [status.text for status in statuses]
        time.sleep(0.25)
    assert browser.execute_script("return window.kbSamePage === true;")
    # Every row ends with its chunk count, written by the page's script, not a reload.
    for progress in browser.find_elements(By.CSS_SELECTOR, "[data-document-progress]"):
        assert re.search(r"\b[1-9]\d* chunks?\b", progress.text), progress.text
    browser.save_screenshot(str(tmp_path / "admin-list-ready.png"))

    _assert_each_file_is_found(kb_server, "handbook")


def test_api_upload_with_a_key_ingests_every_format(kb_server, tmp_path):
    """The same formats sent to POST /api/v1/documents/ with an API key are ingested by the
    workers (the PDF too) and found by search."""
    files = [("file", (name, (SAMPLES / name).read_bytes())) for name in SAMPLE_FILES]
    files.append(("file", ("notes.zip", _zip(tmp_path / "notes.zip").read_bytes())))
    with kb_server.api() as api:
        response = api.post("/api/v1/documents/", data={"collection": "api-uploads"},
                            files=files)
    assert response.status_code == 202, response.text
    outcomes = [result["outcome"] for result in response.json()["results"]]
    assert outcomes == ["created"] * len(EXPECTED_HITS), response.text

    _assert_each_file_is_found(kb_server, "api-uploads")
