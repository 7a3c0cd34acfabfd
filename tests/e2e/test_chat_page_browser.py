"""A real headless Chromium asks a question on /chat/, sees it stream, opens a citation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.live_server import running_asgi_server

SAMPLES = Path(__file__).resolve().parents[2] / "fixtures" / "demo"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs Debian's chromium-driver"),
]


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.mark.django_db(transaction=True)
def test_ask_stream_and_open_a_citation(browser, settings, tmp_path, django_user_model, client):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from kb.services.collections import collection_get_or_create
    from kb.services.uploads import documents_upload

    settings.KB_PROVIDERS = {
        **settings.KB_PROVIDERS,
        "chat": [{"BACKEND": "kb.providers.extractive.ExtractiveChat", "MODEL": "extractive"}],
    }
    collection = collection_get_or_create(slug="demo", name="Demo")
    for name in ("how-search-works.md", "uploading-documents.md"):
        documents_upload(collection=collection, filename=name, data=(SAMPLES / name).read_bytes())
    django_user_model.objects.create_user("reader", password="pw-reader-123")
    client.login(username="reader", password="pw-reader-123")
    session_cookie = client.cookies["sessionid"].value

    with running_asgi_server() as base:
        browser.get(f"{base}/healthz")
        browser.add_cookie({"name": "sessionid", "value": session_cookie, "path": "/"})
        browser.get(f"{base}/chat/")
        wait = WebDriverWait(browser, 60)
        question = wait.until(ec.element_to_be_clickable(
            (By.CSS_SELECTOR, "[data-testid=question-input]")))
        question.send_keys("How are duplicate uploads handled?")
        browser.find_element(By.CSS_SELECTOR, "[data-testid=send-button]").click()

        answer = wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, "[data-testid=assistant-message]")))
        wait.until(lambda _: answer.get_attribute("data-status") in {"complete", "error"})
        assert answer.get_attribute("data-status") == "complete", answer.text
        assert "duplicate" in answer.text.lower()
        citation = answer.find_element(By.CSS_SELECTOR, "[data-testid=citation-link]")
        citation.click()

        panel = wait.until(ec.visibility_of_element_located(
            (By.CSS_SELECTOR, "[data-testid=source-panel]")))
        passage = panel.find_element(By.CSS_SELECTOR, "[data-testid=source-panel-text]").text
        title = panel.find_element(By.CSS_SELECTOR, "[data-testid=source-panel-title]").text
        assert passage.strip() and title.strip()
        browser.save_screenshot(str(tmp_path / "chat.png"))
