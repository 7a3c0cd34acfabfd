"""In a real headless Chromium, an editor grants a user a restricted collection on its admin
page, and that user, signed in on the site's sign-in page, can then search it."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.e2e.test_chat_page_browser import browser  # noqa: F401 (fixture)
from tests.live_server import running_asgi_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs Debian's chromium-driver"),
]


def sign_in(browser, wait, url: str, username: str, password: str) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By

    browser.get(url)
    browser.find_element(By.NAME, "username").send_keys(username)
    password_input = browser.find_element(By.NAME, "password")
    password_input.send_keys(password)
    password_input.submit()
    wait.until(lambda driver: "/login/" not in driver.current_url)


def search_titles(browser, base: str) -> list[str]:  # noqa: F811
    from selenium.webdriver.common.by import By

    browser.get(f"{base}/api/v1/search?query=cafeteria+opens&collection=private&mode=bm25&format=json")
    body = json.loads(browser.find_element(By.TAG_NAME, "body").text)
    return [hit["document_title"] for hit in body["results"]]


@pytest.mark.django_db(transaction=True)
def test_editor_grants_a_user_who_can_then_search(browser, django_user_model):  # noqa: F811
    from django.contrib.auth.models import Permission
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from kb.services.collections import collection_get_or_create
    from kb.services.uploads import documents_upload

    editor = django_user_model.objects.create_user("editor", password="pw-editor-123",
                                                   is_staff=True)
    editor.user_permissions.add(*Permission.objects.filter(
        content_type__app_label="kb", codename__in=["change_collection", "view_collection"]))
    django_user_model.objects.create_user("reader", password="pw-reader-123")
    collection = collection_get_or_create(slug="private", name="Private")
    collection.is_public = False
    collection.save()
    collection.allowed_users.add(editor)
    documents_upload(collection=collection, filename="canteen.md",
                              data=b"# Canteen\n\nThe cafeteria opens at 8 and closes at 3.\n")

    with running_asgi_server() as base:
        wait = WebDriverWait(browser, 30)
        sign_in(browser, wait, f"{base}/accounts/login/?next=/api/v1/search%3Fquery%3Dx",
                "reader", "pw-reader-123")
        assert search_titles(browser, base) == []
        browser.delete_all_cookies()

        sign_in(browser, wait, f"{base}/admin/login/?next=/admin/", "editor", "pw-editor-123")
        browser.get(f"{base}/admin/kb/collection/{collection.pk}/change/")
        available = wait.until(lambda d: d.find_element(By.ID, "id_allowed_users_from"))
        Select(available).select_by_visible_text("reader")
        browser.find_element(By.ID, "id_allowed_users_add").click()
        browser.find_element(By.NAME, "_save").click()
        wait.until(lambda d: d.current_url.endswith("/admin/kb/collection/"))
        assert "was changed successfully" in browser.page_source
        assert {u.username for u in collection.allowed_users.all()} == {"editor", "reader"}
        browser.delete_all_cookies()

        sign_in(browser, wait, f"{base}/accounts/login/", "reader", "pw-reader-123")
        assert browser.current_url == f"{base}/chat/"
        assert search_titles(browser, base) == ["Canteen"]
