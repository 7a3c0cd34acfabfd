"""In a real headless Chromium: the history sidebar pages in with "Show more", a refused title
says why and Escape gives up the edit, a reopened conversation shows its scope, and
"Several…" with nothing ticked holds the question back."""

from __future__ import annotations

import shutil

import pytest

from tests.e2e.test_chat_page_browser import browser  # noqa: F401 (fixture)
from tests.live_server import running_asgi_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs Debian's chromium-driver"),
]

PAGE_SIZE = 50  # REST_FRAMEWORK["PAGE_SIZE"]


def _open_chat(driver, base: str, client, user) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    client.force_login(user)
    driver.get(f"{base}/healthz")
    driver.add_cookie({"name": "sessionid", "value": client.cookies["sessionid"].value,
                       "path": "/"})
    driver.get(f"{base}/chat/")
    WebDriverWait(driver, 30).until(ec.presence_of_element_located(
        (By.CSS_SELECTOR, "[data-testid=conversation-item]")))


def _titles(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('[data-testid=conversation-title]')]"
        ".map((t) => t.textContent);")


@pytest.mark.django_db(transaction=True)
def test_show_more_follows_the_cursor_to_the_end(browser, django_user_model, client):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from chat.models import Conversation
    from kb.services.collections import collection_get_or_create

    collection = collection_get_or_create(slug="demo", name="Demo")
    user = django_user_model.objects.create_user("reader", password="pw-reader-123")
    for i in range(PAGE_SIZE + 5):
        Conversation.objects.create(user=user, collection=collection, title=f"Question {i:02}")

    with running_asgi_server() as base:
        _open_chat(browser, base, client, user)
        wait = WebDriverWait(browser, 30)
        more = browser.find_element(By.CSS_SELECTOR, "[data-testid=conversations-more]")
        assert len(_titles(browser)) == PAGE_SIZE
        assert _titles(browser)[0] == f"Question {PAGE_SIZE + 4:02}"  # most recent first
        assert more.is_displayed() and more.text == "Show more"
        more.click()
        wait.until(lambda b: len(_titles(b)) == PAGE_SIZE + 5)
        assert _titles(browser) == [f"Question {i:02}" for i in reversed(range(PAGE_SIZE + 5))]
        assert not more.is_displayed()
        # Keyboard users carry on from the first conversation the page added.
        focused = browser.switch_to.active_element
        assert focused.get_attribute("class") == "conversation"
        assert focused.text.startswith("Question 04")


@pytest.mark.django_db(transaction=True)
def test_refused_title_escape_scope_and_several_with_none_ticked(
    browser, django_user_model, client, tmp_path,  # noqa: F811
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from chat.models import Conversation
    from kb.services.collections import collection_get_or_create

    demo = collection_get_or_create(slug="demo", name="Demo")
    team = collection_get_or_create(slug="team", name="Team")
    user = django_user_model.objects.create_user("reader", password="pw-reader-123")
    everything = Conversation.objects.create(user=user, title="Over everything")
    several = Conversation.objects.create(user=user, title="Over two")
    several.collections.set([demo, team])
    Conversation.objects.create(user=user, collection=team, title="About the team")

    with running_asgi_server() as base:
        _open_chat(browser, base, client, user)
        wait = WebDriverWait(browser, 30)
        select = Select(browser.find_element(By.CSS_SELECTOR, "[data-testid=collection-select]"))
        assert [o.text for o in select.options] == ["Demo", "Team", "All my collections",
                                                    "Several…"]
        boxes = browser.find_element(By.CSS_SELECTOR, "[data-testid=collection-checkboxes]")

        def item(conversation):
            return browser.find_element(
                By.CSS_SELECTOR, f"[data-testid=conversation-item][data-id='{conversation.pk}']")

        def scope():
            return select.first_selected_option.get_attribute("value")

        # Reopened, each conversation shows the scope it was asked in.
        item(several).find_element(By.CSS_SELECTOR, ".conversation").click()
        wait.until(lambda _: scope() == ":several")
        assert boxes.is_displayed()
        assert [b.get_attribute("value") for b in boxes.find_elements(
            By.CSS_SELECTOR, "input:checked")] == ["demo", "team"]
        item(everything).find_element(By.CSS_SELECTOR, ".conversation").click()
        wait.until(lambda _: scope() == ":all")
        assert not boxes.is_displayed()

        # A blank title is refused by the server, which says why; Save keeps the form open.
        item(everything).find_element(By.CSS_SELECTOR, "[data-testid=conversation-actions]").click()
        wait.until(ec.element_to_be_clickable(
            (By.CSS_SELECTOR, "[data-testid=rename-conversation]"))).click()
        title = wait.until(ec.visibility_of_element_located(
            (By.CSS_SELECTOR, "[data-testid=rename-input]")))
        title.send_keys(Keys.CONTROL, "a")
        title.send_keys(Keys.BACKSPACE)
        browser.find_element(By.CSS_SELECTOR, "[data-testid=rename-save]").click()
        error = wait.until(ec.visibility_of_element_located(
            (By.CSS_SELECTOR, "[data-testid=rename-error]")))
        assert error.text == "This field may not be blank."
        assert error.get_attribute("role") == "alert"
        assert title.get_attribute("aria-invalid") == "true"
        assert browser.switch_to.active_element == title
        browser.save_screenshot(str(tmp_path / "rename-refused.png"))
        # Escape gives the edit up: the old title is back, and focus is on the row's button.
        title.send_keys("Half-typed" + Keys.ESCAPE)
        wait.until(lambda b: not b.find_elements(By.CSS_SELECTOR, "[data-testid=rename-form]"))
        assert "Over everything" in _titles(browser)
        assert browser.switch_to.active_element.get_attribute("data-testid") == (
            "conversation-actions")
        assert Conversation.objects.get(pk=everything.pk).title == "Over everything"

        # "Several…" with nothing ticked: the question stays in the box, and nothing is sent.
        browser.find_element(By.CSS_SELECTOR, "[data-testid=new-chat-button]").click()
        select.select_by_value(":several")
        for box in boxes.find_elements(By.CSS_SELECTOR, "input:checked"):
            box.click()
        question = browser.find_element(By.CSS_SELECTOR, "[data-testid=question-input]")
        question.send_keys("Anything?" + Keys.ENTER)
        problem = wait.until(ec.visibility_of_element_located(
            (By.CSS_SELECTOR, "[data-testid=collection-checkboxes-error]")))
        assert "at least one collection" in problem.text
        assert question.get_attribute("value") == "Anything?"
        assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid=user-message]")
        assert browser.switch_to.active_element.get_attribute("value") == "demo"
        boxes.find_element(By.CSS_SELECTOR, "input[value=team]").click()
        wait.until(lambda _: not problem.is_displayed())

        # The choice and its ticks are remembered by this browser.
        browser.refresh()
        select = Select(wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, "[data-testid=collection-select]"))))
        boxes = browser.find_element(By.CSS_SELECTOR, "[data-testid=collection-checkboxes]")
        assert scope() == ":several" and boxes.is_displayed()
        assert [b.get_attribute("value") for b in boxes.find_elements(
            By.CSS_SELECTOR, "input:checked")] == ["team"]


@pytest.mark.django_db(transaction=True)
def test_the_open_conversation_is_in_the_address_and_a_reload_reopens_it(
    browser, django_user_model, client  # noqa: F811
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from chat.models import Conversation, Message
    from kb.services.collections import collection_get_or_create

    collection = collection_get_or_create(slug="demo", name="Demo")
    user = django_user_model.objects.create_user("reader", password="pw-reader-123")
    conversation = Conversation.objects.create(user=user, collection=collection,
                                               title="Tide tables")
    Message.objects.create(conversation=conversation, role="user",
                           content="When are the tide tables published?")
    Message.objects.create(conversation=conversation, role="assistant", status="complete",
                           content="Every morning at six.", answerable=True)

    with running_asgi_server() as base:
        _open_chat(browser, base, client, user)
        wait = WebDriverWait(browser, 30)
        browser.find_element(By.CSS_SELECTOR, "[data-testid=conversation-item] .conversation"
                             ).click()
        wait.until(lambda b: b.current_url.endswith(f"/chat/?c={conversation.pk}"))
        browser.refresh()
        wait.until(lambda b: "Every morning at six." in b.find_element(
            By.CSS_SELECTOR, "[data-testid=message-list]").text)
        browser.find_element(By.CSS_SELECTOR, "[data-testid=new-chat-button]").click()
        wait.until(lambda b: b.current_url.endswith("/chat/"))
        browser.get(f"{base}/chat/?c=not-a-conversation")
        wait.until(lambda b: b.current_url.endswith("/chat/"))
