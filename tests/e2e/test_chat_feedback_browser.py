"""In a real headless Chromium: only complete answers can be rated, a reopened conversation shows
the user's vote, a failed save says why and shows the vote the server still has, and the shared
page has no rating at all."""

from __future__ import annotations

import shutil

import pytest

from tests.e2e.test_chat_history_browser import _open_chat
from tests.e2e.test_chat_page_browser import browser  # noqa: F401 (fixture)
from tests.live_server import running_asgi_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs Debian's chromium-driver"),
]

STATUSES = ("complete", "interrupted", "error", "streaming")


def _pressed(answer) -> dict[str, str]:
    from selenium.webdriver.common.by import By

    return {rating: answer.find_element(By.CSS_SELECTOR, f"[data-testid=feedback-{rating}]")
            .get_attribute("aria-pressed") for rating in ("up", "down")}


def _click(driver, answer, testid: str) -> None:
    """Click a button of the answer. The message list scrolls smoothly, so WebDriver's own
    scroll would still be under way when it clicks: scroll at once first."""
    from selenium.webdriver.common.by import By

    button = answer.find_element(By.CSS_SELECTOR, f"[data-testid={testid}]")
    driver.execute_script(
        "arguments[0].scrollIntoView({block: 'center', behavior: 'instant'});", button)
    button.click()


def _offline(driver, offline: bool) -> None:
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": offline, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})


@pytest.mark.django_db(transaction=True)
def test_only_complete_answers_are_rated_and_a_failed_save_keeps_the_vote(
    browser, django_user_model, client, tmp_path,  # noqa: F811
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from chat.api import share_path
    from chat.feedback import feedback_record
    from chat.models import AnswerFeedback, Conversation, Message
    from chat.services import conversation_share
    from kb.services.collections import collection_get_or_create

    collection = collection_get_or_create(slug="demo", name="Demo")
    user = django_user_model.objects.create_user("reader", password="pw-reader-123")
    conversation = Conversation.objects.create(user=user, collection=collection, title="Ferries")
    answers = {}
    for status in STATUSES:
        Message.objects.create(conversation=conversation, role=Message.Role.USER,
                               content=f"A question answered {status}")
        answers[status] = Message.objects.create(
            conversation=conversation, role=Message.Role.ASSISTANT, status=status,
            mode=Message.Mode.EXTRACTED, content=f"The ferry leaves at 07:40 ({status}).")
    feedback_record(message=answers["complete"], user=user, api_key=None, rating="down",
                    reason="wrong", comment="It leaves at 08:10.")

    with running_asgi_server() as base:
        _open_chat(browser, base, client, user)
        wait = WebDriverWait(browser, 30)
        item = "[data-testid=conversation-item] .conversation"
        browser.find_element(By.CSS_SELECTOR, item).click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR,
                                                 "[data-testid=assistant-message]")) == 4)
        shown = dict(zip(STATUSES, browser.find_elements(
            By.CSS_SELECTOR, "[data-testid=assistant-message]"), strict=True))

        # The complete answer shows the stored vote; a stopped, failed or unfinished one has
        # no rating (it still has its Copy button).
        complete = shown["complete"]
        assert complete.find_element(By.CSS_SELECTOR, "[data-testid=feedback]").is_displayed()
        assert _pressed(complete) == {"up": "false", "down": "true"}
        for status in ("interrupted", "error", "streaming"):
            assert not shown[status].find_element(
                By.CSS_SELECTOR, "[data-testid=feedback]").is_displayed(), status
            assert shown[status].find_element(
                By.CSS_SELECTOR, "[data-testid=copy-answer]").is_displayed(), status

        # Offline: Helpful is shown at once, then the failure says why and the vote is back.
        error = complete.find_element(By.CSS_SELECTOR, "[data-testid=feedback-error]")
        _offline(browser, True)
        try:
            _click(browser, complete, "feedback-up")
            wait.until(lambda _: error.text)
        finally:
            _offline(browser, False)
        assert error.text == ("Your vote was not saved: Could not reach the server. "
                              "Check your connection.")
        assert error.get_attribute("role") == "alert"
        assert _pressed(complete) == {"up": "false", "down": "true"}
        vote = AnswerFeedback.objects.get()
        assert (vote.rating, vote.reason) == ("down", "wrong")

        # A refused comment (too long) keeps the form and what was typed, with the server's
        # reason; the stored vote stays the plain "down" the button made.
        _click(browser, complete, "feedback-down")
        wait.until(lambda _: _pressed(complete)["down"] == "false")
        assert not error.text
        _click(browser, complete, "feedback-down")
        form = wait.until(ec.visibility_of_element_located(
            (By.CSS_SELECTOR, "[data-testid=feedback-form]")))
        browser.execute_script("arguments[0].value = 'x'.repeat(4001);",
                               form.find_element(By.CSS_SELECTOR, "[data-testid=feedback-comment]"))
        _click(browser, form, "feedback-send")
        wait.until(lambda _: error.text)
        assert error.text == ("Your feedback was not sent: "
                              "Ensure this field has no more than 4000 characters.")
        assert form.is_displayed()
        assert _pressed(complete) == {"up": "false", "down": "true"}
        browser.save_screenshot(str(tmp_path / "feedback-refused.png"))
        vote = AnswerFeedback.objects.get()
        assert (vote.rating, vote.reason, vote.comment) == ("down", "", "")

        # The shared page (even for its owner) renders the answers without any rating.
        conversation_share(conversation=conversation)
        browser.get(base + share_path(conversation))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "[data-testid=shared-message]"))
        assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid=feedback]")
        assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid=feedback-up]")

        # The answer gone meanwhile (deleted in another tab): the server's message, and the
        # buttons show the vote as it was.
        browser.get(f"{base}/chat/")
        wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, item))).click()
        complete = wait.until(ec.visibility_of_element_located(
            (By.CSS_SELECTOR, "[data-testid=assistant-message]")))
        wait.until(lambda _: _pressed(complete)["down"] == "true")
        conversation.delete()
        _click(browser, complete, "feedback-up")
        error = complete.find_element(By.CSS_SELECTOR, "[data-testid=feedback-error]")
        wait.until(lambda _: error.text)
        assert error.text == "Your vote was not saved: No such answer."
        assert _pressed(complete) == {"up": "false", "down": "true"}
