"""In a real headless Chromium: several citations of one document are told apart, in the
chips under the answer and in the source panel."""

from __future__ import annotations

import shutil

import pytest

from tests.e2e.test_chat_page_browser import browser  # noqa: F401 (fixture)
from tests.live_server import running_asgi_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs Debian's chromium-driver"),
]


def citation(n: int, document_id: int, section: str, text: str) -> dict:
    return {"n": n, "chunk_id": n, "document_id": document_id,
            "document_title": "Lighthouse keeper handbook", "page": None,
            "heading_path": ["Lighthouse keeper handbook", section], "text": text, "url": ""}


@pytest.mark.django_db(transaction=True)
def test_citations_of_one_document_are_told_apart(browser, tmp_path, django_user_model, client):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from chat.models import Conversation, Message
    from kb.services.collections import collection_get_or_create
    from kb.services.uploads import documents_upload

    # Citations are shown only for documents the reader may read: a real one.
    collection = collection_get_or_create(slug="demo", name="Demo")
    document = documents_upload(collection=collection, filename="lighthouse.md",
                                         data=b"# Lamp\n\nLight the lamp at dusk.\n")
    document = document[0].document
    user = django_user_model.objects.create_user("reader", password="pw-reader-123")
    conversation = Conversation.objects.create(user=user, collection=collection,
                                               title="Lamp duties")
    Message.objects.create(conversation=conversation, role=Message.Role.USER,
                           content="Lamp duties?")
    Message.objects.create(
        conversation=conversation, role=Message.Role.ASSISTANT, mode=Message.Mode.EXTRACTED,
        content="Light the lamp at dusk. [1] Log the lamp hours. [2] Clean the lens. [3]",
        citations=[citation(1, document.pk, "Lamp", "Light the lamp at dusk."),
                   citation(2, document.pk, "Log book", "Log the lamp hours."),
                   citation(3, document.pk, "Lamp", "Clean the lens.")],
        cited=[1, 2, 3], answerable=True)
    client.force_login(user)
    session_cookie = client.cookies["sessionid"].value

    with running_asgi_server() as base:
        browser.get(f"{base}/healthz")
        browser.add_cookie({"name": "sessionid", "value": session_cookie, "path": "/"})
        browser.get(f"{base}/chat/")
        wait = WebDriverWait(browser, 30)
        wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, ".conversation"))).click()
        answer = wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, "[data-testid=assistant-message]")))
        wait.until(lambda _: answer.find_elements(By.CSS_SELECTOR, ".source-chip"))

        chips = [" ".join(chip.text.split())
                 for chip in answer.find_elements(By.CSS_SELECTOR, ".source-chip")]
        # Numbered 1..n in order; the one section cited once is named, the twice-cited one numbered.
        assert chips == ["[1] Lighthouse keeper handbook · passage 1",
                         "[2] Lighthouse keeper handbook › Log book",
                         "[3] Lighthouse keeper handbook · passage 3"]
        assert len(set(chips)) == 3

        answer.find_elements(By.CSS_SELECTOR, ".source-chip")[2].click()
        panel = wait.until(ec.visibility_of_element_located(
            (By.CSS_SELECTOR, "[data-testid=source-panel]")))
        meta = panel.find_element(By.CSS_SELECTOR, ".source-meta").text
        assert "passage 3 of 3 from this document" in meta
        browser.save_screenshot(str(tmp_path / "sources.png"))
