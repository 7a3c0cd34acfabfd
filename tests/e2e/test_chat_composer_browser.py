"""In a real headless Chromium: the question box shows its limit, an over-long question is kept
whole with a visible warning and cannot be sent, and the collection last chosen is kept."""

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
def test_limit_warning_and_remembered_collection(browser, django_user_model):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from chat.api import MAX_MESSAGE_CHARS
    from kb.services.collections import collection_get_or_create

    collection_get_or_create(slug="demo", name="Demo")
    collection_get_or_create(slug="team", name="Team")
    django_user_model.objects.create_user("reader", password="pw-reader-123")

    with running_asgi_server() as base:
        wait = WebDriverWait(browser, 30)
        browser.get(f"{base}/chat/")
        wait.until(ec.url_contains("/accounts/login/"))
        browser.find_element(By.NAME, "username").send_keys("reader")
        browser.find_element(By.NAME, "password").send_keys("pw-reader-123")
        browser.find_element(By.CSS_SELECTOR, "[data-testid=login-submit]").click()
        wait.until(ec.url_to_be(f"{base}/chat/"))

        question = wait.until(ec.element_to_be_clickable(
            (By.CSS_SELECTOR, "[data-testid=question-input]")))
        counter = browser.find_element(By.CSS_SELECTOR, "[data-testid=question-counter]")
        send = browser.find_element(By.CSS_SELECTOR, "[data-testid=send-button]")
        warning = browser.find_element(By.CSS_SELECTOR, "[data-testid=question-too-long]")
        assert question.get_attribute("maxlength") is None
        question.send_keys("Hello")
        assert counter.text == f"5 / {MAX_MESSAGE_CHARS:,} characters"
        assert not warning.is_displayed() and send.is_enabled()

        # A long paste is kept whole (no silent cut), the counter turns red, a message says
        # why, and neither Send nor Enter sends it.
        browser.execute_script(
            "arguments[0].value = arguments[1];"
            "arguments[0].dispatchEvent(new Event('input'));", question, "x" * MAX_MESSAGE_CHARS)
        question.send_keys("y" * 300)
        too_long = "x" * MAX_MESSAGE_CHARS + "y" * 300
        assert question.get_attribute("value") == too_long
        assert counter.text == f"{MAX_MESSAGE_CHARS + 300:,} / {MAX_MESSAGE_CHARS:,} characters"
        assert "over-limit" in counter.get_attribute("class")
        assert counter.value_of_css_property("color") == "rgba(179, 38, 30, 1)"  # --danger
        assert warning.is_displayed()
        assert f"limited to {MAX_MESSAGE_CHARS:,} characters" in warning.text
        assert "shorten this one by 300" in warning.text
        assert not send.is_enabled()
        question.send_keys(Keys.ENTER)
        assert question.get_attribute("value") == too_long
        assert not browser.find_elements(By.CSS_SELECTOR, ".message-user")

        # Shortened back to the limit, it can be sent again.
        question.send_keys(Keys.BACKSPACE * 300)
        assert counter.text == f"{MAX_MESSAGE_CHARS:,} / {MAX_MESSAGE_CHARS:,} characters"
        assert not warning.is_displayed() and send.is_enabled()
        assert "over-limit" not in counter.get_attribute("class")

        dropdown = browser.find_element(By.CSS_SELECTOR, "[data-testid=collection-select]")
        Select(dropdown).select_by_value("team")
        browser.get(f"{base}/chat/")
        select = wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, "[data-testid=collection-select]")))
        wait.until(lambda _: Select(select).first_selected_option.get_attribute("value") == "team")
