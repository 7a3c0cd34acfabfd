"""A non-staff user rates answers on the chat page, through the real server and its workers:
Not helpful with a reason and a comment (stored for the editors), still shown after a reload,
changed to Helpful, withdrawn.

Set KB_CHAT_SHOTS=/some/dir to also keep screenshots of the answer's buttons, the open form
and the thanks, at a desktop (1280×800) and a phone (390×844) viewport.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.acceptance.conftest import documents_wait_ready
from tests.acceptance.test_chat_conversations import DESKTOP, _ask, _shot, _sign_in, _viewport

pytestmark = pytest.mark.slow

RATER = ("rater", "acceptance-rater-pw-1")
FERRIES = (
    "# Ferry timetable\n\n"
    "The ferry to Holm Island leaves the north quay at 07:40 every weekday.\n\n"
    "## Winter service\n\n"
    "From November to February the Holm Island ferry does not run on Sundays.\n"
)
THANKS = "Thanks — your feedback goes to the editors."

# A restricted collection that the rater reads and the editor (conftest) uploads to.
_SETUP = f"""
from django.contrib.auth import get_user_model
from kb.services.collections import collection_get_or_create

User = get_user_model()
rater = User.objects.create_user("{RATER[0]}", password="{RATER[1]}")
ferries = collection_get_or_create(slug="ferries", name="Ferries")
ferries.is_public = False
ferries.save()
ferries.allowed_users.add(rater, User.objects.get(username="editor"))
"""

# The rater's votes as the database holds them: the editors' side of the feature.
_VOTES = f"""
import json
from chat.models import AnswerFeedback

votes = AnswerFeedback.objects.filter(user__username="{RATER[0]}")
print("VOTES " + json.dumps([[str(v.message_id), v.rating, v.reason, v.comment] for v in votes]))
"""


def _stored_votes(kb_server) -> list[list[str]]:
    return json.loads(kb_server.manage("shell", "-c", _VOTES).split("VOTES ", 1)[1])


def _api_vote(browser, message_id: str) -> dict | None:
    """GET …/feedback with the user's session: the vote, or None (404)."""
    return browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/api/v1/chat/messages/' + arguments[0] + '/feedback')"
        ".then((r) => (r.status === 404 ? null : r.json()))"
        ".then(done, (e) => done({error: String(e)}));",
        message_id)


def _wait_for_vote(browser, message_id: str, expected) -> dict | None:
    """Poll the API until the vote's rating is `expected` (None: no vote)."""
    deadline = time.monotonic() + 30
    while True:
        vote = _api_vote(browser, message_id)
        if (vote and vote.get("rating")) == expected:
            return vote
        assert time.monotonic() < deadline, vote
        time.sleep(0.2)


def _pressed(answer) -> dict[str, str]:
    from selenium.webdriver.common.by import By

    return {rating: answer.find_element(By.CSS_SELECTOR, f"[data-testid=feedback-{rating}]")
            .get_attribute("aria-pressed") for rating in ("up", "down")}


def _assistant_message_id(browser, conversation_id: str) -> str:
    return browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/api/v1/conversations/' + arguments[0]).then((r) => r.json())"
        ".then((c) => done(c.messages.filter((m) => m.role === 'assistant').pop().id));",
        conversation_id)


def test_not_helpful_with_a_reason_survives_a_reload_then_helpful_then_withdrawn(
        kb_server, browser, tmp_path):
    """The user marks an answer Not helpful, says it is outdated and why, and sends it: the
    vote is stored with its reason and comment and thanked for. After a reload the reopened
    conversation still shows it; Helpful replaces it; Helpful pressed again withdraws it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    kb_server.manage("shell", "-c", _SETUP)
    with kb_server.api() as api:
        response = api.post("/api/v1/documents/", data={"collection": "ferries"},
                            files=[("file", ("ferries.md", FERRIES.encode()))])
        assert response.status_code == 202, response.text
    documents_wait_ready(kb_server, collection="ferries", count=1)

    wait = WebDriverWait(browser, 30)
    _viewport(browser, DESKTOP)
    _sign_in(browser, kb_server.base, RATER)
    Select(browser.find_element(By.CSS_SELECTOR, "[data-testid=collection-select]")
           ).select_by_value("ferries")
    answer = _ask(browser, "When does the ferry to Holm Island leave?")
    assert "07:40" in answer.text, answer.text
    conversation_id = browser.find_element(
        By.CSS_SELECTOR, "[data-testid=conversation-list] [aria-current=true]"
    ).get_attribute("data-id")
    message_id = _assistant_message_id(browser, conversation_id)

    # --- Two labelled toggle buttons next to Copy, none pressed -----------------------------------
    group = answer.find_element(By.CSS_SELECTOR, "[data-testid=feedback]")
    assert group.is_displayed() and group.accessible_name == "Rate this answer"
    up = answer.find_element(By.CSS_SELECTOR, "[data-testid=feedback-up]")
    down = answer.find_element(By.CSS_SELECTOR, "[data-testid=feedback-down]")
    assert (up.tag_name, up.accessible_name) == ("button", "Helpful")
    assert (down.tag_name, down.accessible_name) == ("button", "Not helpful")
    assert _pressed(answer) == {"up": "false", "down": "false"}
    assert _api_vote(browser, message_id) is None
    _shot(browser, tmp_path, "feedback-buttons")

    # --- Not helpful: pressed at once, stored as "down", and the form asks why ------------------
    down.click()
    assert _pressed(answer) == {"up": "false", "down": "true"}
    form = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR,
                                                         "[data-testid=feedback-form]")))
    assert browser.switch_to.active_element.get_attribute("data-testid") == "feedback-reason-wrong"
    assert _wait_for_vote(browser, message_id, "down")["reason"] == ""
    legend = form.find_element(By.TAG_NAME, "legend").text
    assert legend == "What was wrong with this answer?"
    choices = [label.text for label in form.find_elements(By.CSS_SELECTOR, ".feedback-choice")]
    assert choices == ["Wrong", "Incomplete", "Outdated", "Not found in the documents"]

    form.find_element(By.XPATH, ".//label[normalize-space()='Outdated']").click()
    comment = form.find_element(By.CSS_SELECTOR, "[data-testid=feedback-comment]")
    assert comment.accessible_name == "Comment (optional)"
    comment.send_keys("The winter timetable moved the first ferry to 08:10.")

    def form_in_view():
        browser.execute_script("arguments[0].scrollIntoView({block: 'end', behavior: 'instant'});",
                               form)

    _shot(browser, tmp_path, "feedback-form", on_phone=form_in_view)
    form.find_element(By.CSS_SELECTOR, "[data-testid=feedback-send]").click()
    note = answer.find_element(By.CSS_SELECTOR, "[data-testid=feedback-note]")
    wait.until(lambda _: note.text == THANKS)
    assert note.get_attribute("role") == "status"
    assert not answer.find_elements(By.CSS_SELECTOR, "[data-testid=feedback-form]")
    # Focus goes back to the button the form came from.
    assert browser.switch_to.active_element == down
    assert _stored_votes(kb_server) == [
        [message_id, "down", "outdated", "The winter timetable moved the first ferry to 08:10."]]
    _shot(browser, tmp_path, "feedback-thanks")

    # --- A reload: the reopened conversation shows the vote ------------------------------------
    # The open conversation is in the address, so the reload reopens it by itself.
    assert browser.current_url.endswith(f"?c={conversation_id}")
    browser.refresh()
    wait.until(lambda b: "07:40" in b.find_element(
        By.CSS_SELECTOR, "[data-testid=message-list]").text)
    answer = wait.until(ec.visibility_of_element_located(
        (By.CSS_SELECTOR, "[data-testid=assistant-message]")))
    wait.until(lambda _: _pressed(answer) == {"up": "false", "down": "true"})

    # --- Helpful replaces the vote (its reason and comment go with it) --------------------------
    up = answer.find_element(By.CSS_SELECTOR, "[data-testid=feedback-up]")
    up.click()
    assert _pressed(answer) == {"up": "true", "down": "false"}
    vote = _wait_for_vote(browser, message_id, "up")
    assert (vote["reason"], vote["comment"]) == ("", "")
    assert not answer.find_elements(By.CSS_SELECTOR, "[data-testid=feedback-form]")

    # --- Helpful pressed again withdraws it ---------------------------------------------------
    up.click()
    assert _pressed(answer) == {"up": "false", "down": "false"}
    _wait_for_vote(browser, message_id, None)
    assert _stored_votes(kb_server) == []

    # --- Escape closes the form and keeps the plain "down" vote ---------------------------------
    answer.find_element(By.CSS_SELECTOR, "[data-testid=feedback-down]").click()
    wait.until(lambda _: browser.switch_to.active_element.get_attribute("data-testid")
               == "feedback-reason-wrong")
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    assert not answer.find_elements(By.CSS_SELECTOR, "[data-testid=feedback-form]")
    assert browser.switch_to.active_element.get_attribute("data-testid") == "feedback-down"
    assert _pressed(answer) == {"up": "false", "down": "true"}
    assert _wait_for_vote(browser, message_id, "down")["reason"] == ""
