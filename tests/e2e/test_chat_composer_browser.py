"""In a real headless Chromium: the question box shows its limit, a refused question shows the
server's reason and stays in the box, and the collection last chosen is kept."""

from __future__ import annotations

import shutil

import pytest

from tests.e2e.test_chat_page_browser import browser  # noqa: F401 (fixture)
from tests.live_server import running_asgi_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs Debian's chromium-driver"),
]


@pytest.mark.django_db(transaction=True)
def test_limit_reason_and_remembered_collection(browser, django_user_model):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from chat.api import MAX_MESSAGE_CHARS
    from kb import services

    services.collection_get_or_create(slug="demo", name="Demo")
    services.collection_get_or_create(slug="team", name="Team")
    django_user_model.objects.create_user("reader", password="pw-reader-123")

    with running_asgi_server() as base:
        wait = WebDriverWait(browser, 30)
        browser.get(f"{base}/chat/")
        wait.until(ec.url_contains("/accounts/login/"))
        browser.find_element(By.NAME, "username").send_keys("reader")
        browser.find_element(By.NAME, "password").send_keys("pw-reader-123")
        browser.find_element(By.CSS_SELECTOR, "[data-testid=login-submit]").click()
        wait.until(ec.url_to_be(f"{base}/chat/"))

        question = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid=question-input]")))
        counter = browser.find_element(By.CSS_SELECTOR, "[data-testid=question-counter]")
        assert question.get_attribute("maxlength") == str(MAX_MESSAGE_CHARS)
        question.send_keys("Hello")
        assert counter.text == f"5 / {MAX_MESSAGE_CHARS:,} characters"

        # maxlength stops typing; a pasted or scripted value can still be too long, and the
        # server's refusal must then say why.
        too_long = "x" * (MAX_MESSAGE_CHARS + 1)
        browser.execute_script(
            "arguments[0].value = arguments[1];"
            "arguments[0].dispatchEvent(new Event('input'));", question, too_long)
        browser.find_element(By.CSS_SELECTOR, "[data-testid=send-button]").click()
        error = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "[data-testid=error-message]")))
        assert f"no more than {MAX_MESSAGE_CHARS} characters" in error.text
        assert "Some parameters are invalid" not in error.text
        assert question.get_attribute("value") == too_long

        Select(browser.find_element(By.CSS_SELECTOR, "[data-testid=collection-select]")).select_by_value("team")
        browser.get(f"{base}/chat/")
        select = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "[data-testid=collection-select]")))
        wait.until(lambda _: Select(select).first_selected_option.get_attribute("value") == "team")
