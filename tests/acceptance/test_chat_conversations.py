"""A non-staff user manages and shares conversations on the chat page, through the real server
and its workers: rename in the history sidebar, copy an answer, share it with a colleague (an
outsider gets the 403 page), ask several collections at once, stop sharing, delete.

Set KB_CHAT_SHOTS=/some/dir to also keep screenshots of each step at a desktop (1280×800) and
a phone (390×844) viewport, for a person to look at.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.acceptance.conftest import documents_wait_ready
from tests.browser import chromium_start

pytestmark = pytest.mark.slow

SHARER = ("sharer", "acceptance-sharer-pw-1")
COLLEAGUE = ("colleague", "acceptance-colleague-pw-1")
OUTSIDER = ("outsider", "acceptance-outsider-pw-1")
DESKTOP = (1280, 800)
PHONE = (390, 844)

BEACONS = (
    "# Beacon lamps\n\n"
    "The beacon lamp on Skerry Point is replaced after every 400 hours of burning.\n\n"
    "## Lamp log\n\n"
    "To record a lamp change in the lamp log, run the beacon-log command:\n\n"
    "```\n"
    "beacon-log --lamp=skerry \\\n"
    "    --hours=400\n"
    "```\n"
)
LOG_COMMAND = "beacon-log --lamp=skerry \\\n    --hours=400"
TIDES = (
    "# Tide gauges\n\n"
    "The tide gauge at Pier 7 is calibrated every March by the harbour surveyor.\n"
)

# Two restricted collections: the sharer reads both, the colleague only beacons, the outsider
# neither. The editor (conftest) may upload to both.
_SETUP = f"""
from django.contrib.auth import get_user_model
from kb.services.collections import collection_get_or_create

User = get_user_model()
editor = User.objects.get(username="editor")
sharer = User.objects.create_user("{SHARER[0]}", password="{SHARER[1]}")
colleague = User.objects.create_user("{COLLEAGUE[0]}", password="{COLLEAGUE[1]}")
User.objects.create_user("{OUTSIDER[0]}", password="{OUTSIDER[1]}")
for slug, name, readers in (("beacons", "Beacons", [editor, sharer, colleague]),
                            ("tides", "Tides", [editor, sharer])):
    collection = collection_get_or_create(slug=slug, name=name)
    collection.is_public = False
    collection.save()
    collection.allowed_users.add(*readers)
"""


def _viewport(browser, size: tuple[int, int], *, mobile: bool = False) -> None:
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": mobile})


def _shot(browser, tmp_path: Path, name: str, *, on_phone=None, after_phone=None) -> None:
    """A screenshot of the page at the desktop size; with KB_CHAT_SHOTS, at the phone size too
    (on_phone prepares the narrow page, e.g. opens the history drawer; after_phone undoes it)."""
    browser.save_screenshot(str(tmp_path / f"{name}.png"))
    shots = os.environ.get("KB_CHAT_SHOTS")
    if not shots:
        return
    out = Path(shots)
    out.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(out / f"{name}-desktop.png"))
    _viewport(browser, PHONE, mobile=True)
    try:
        time.sleep(0.3)
        if on_phone:
            on_phone()
            time.sleep(0.4)  # the drawer slides in
        browser.save_screenshot(str(out / f"{name}-phone.png"))
    finally:
        if after_phone:
            after_phone()
        _viewport(browser, DESKTOP)
        time.sleep(0.2)


def _sign_in(browser, base: str, user: tuple[str, str]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{base}/accounts/login/")
    browser.find_element(By.NAME, "username").send_keys(user[0])
    browser.find_element(By.NAME, "password").send_keys(user[1] + Keys.RETURN)
    WebDriverWait(browser, 30).until(lambda b: b.current_url.rstrip("/").endswith("/chat"))


def _ask(browser, question: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "[data-testid=send-button]").is_enabled())
    before = len(browser.find_elements(By.CSS_SELECTOR, "[data-testid=assistant-message]"))
    browser.find_element(By.CSS_SELECTOR, "[data-testid=question-input]").send_keys(question)
    browser.find_element(By.CSS_SELECTOR, "[data-testid=send-button]").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR,
                                             "[data-testid=assistant-message]")) > before)
    answer = browser.find_elements(By.CSS_SELECTOR, "[data-testid=assistant-message]")[-1]
    wait.until(lambda _: answer.get_attribute("data-status") in {"complete", "error", "stopped"})
    assert answer.get_attribute("data-status") == "complete", answer.text
    # The sidebar is reloaded once the answer is stored.
    wait.until(lambda b: b.execute_script(
        "return document.querySelector('[data-testid=conversation-list] [aria-current=true]')"))
    return answer


def _item(browser, conversation_id: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(
        By.CSS_SELECTOR, f"[data-testid=conversation-item][data-id='{conversation_id}']")


def _titles(browser) -> list[str]:
    return browser.execute_script(
        "return [...document.querySelectorAll('[data-testid=conversation-title]')]"
        ".map((t) => t.textContent);")


def _menu_action(browser, conversation_id: str, action: str) -> None:
    """Open the conversation's "⋯" menu and choose rename, share or delete."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    _item(browser, conversation_id).find_element(
        By.CSS_SELECTOR, "[data-testid=conversation-actions]").click()
    WebDriverWait(browser, 10).until(ec.element_to_be_clickable(
        (By.CSS_SELECTOR, f"[data-testid={action}-conversation]"))).click()


def _focused_testid(browser) -> str | None:
    return browser.execute_script("return document.activeElement.dataset.testid || null;")


def _clipboard(browser) -> str:
    return browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "(window.kbClipboard || navigator.clipboard).readText()"
        ".then(done, (e) => done('clipboard error: ' + e));")


def _stored_answer(browser, conversation_id: str) -> str:
    """The last answer's text as the API stores it (Markdown)."""
    return browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/api/v1/conversations/' + arguments[0]).then((r) => r.json())"
        ".then((c) => done(c.messages.filter((m) => m.role === 'assistant').pop().content));",
        conversation_id)


def test_rename_copy_share_several_collections_and_delete(kb_server, browser, tmp_path):
    """Signed in through the form, a user renames a conversation (kept after a reload), copies
    an answer and a code block, shares the conversation (a colleague who may read its
    collection sees it read-only, an outsider gets the 403 page), asks two collections at once
    (the answer cites the second), stops sharing (the link no longer opens) and deletes
    conversations (gone after a reload; deleting the open one starts a new chat)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    kb_server.manage("shell", "-c", _SETUP)
    with kb_server.api() as api:
        for slug, name, text in (("beacons", "beacons.md", BEACONS), ("tides", "tides.md", TIDES)):
            response = api.post("/api/v1/documents/", data={"collection": slug},
                                files=[("file", (name, text.encode()))])
            assert response.status_code == 202, response.text
    documents_wait_ready(kb_server, collection="beacons", count=1)
    (tides_document,) = documents_wait_ready(kb_server, collection="tides", count=1)

    base = kb_server.base
    wait = WebDriverWait(browser, 30)
    _viewport(browser, DESKTOP)
    browser.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": base, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    _sign_in(browser, base, SHARER)

    # --- A question in one collection; its answer copied as Markdown ---------------------------
    Select(browser.find_element(By.CSS_SELECTOR, "[data-testid=collection-select]")
           ).select_by_value("beacons")
    answer = _ask(browser, "How often is the Skerry Point beacon lamp replaced?")
    assert "400 hours" in answer.text, answer.text
    assert answer.find_elements(By.CSS_SELECTOR, "[data-testid=citation-link]"), answer.text
    beacons_id = browser.find_element(
        By.CSS_SELECTOR, "[data-testid=conversation-item]").get_attribute("data-id")

    copy = answer.find_element(By.CSS_SELECTOR, "[data-testid=copy-answer]")
    assert copy.accessible_name == "Copy answer"
    copy.click()
    wait.until(lambda _: copy.text == "Copied")
    wait.until(lambda b: b.find_element(
        By.CSS_SELECTOR, "[data-testid=chat-announcer]").get_attribute("textContent")
        == "Copied to the clipboard.")
    copied = _clipboard(browser)
    assert copied == _stored_answer(browser, beacons_id), copied
    assert "400 hours" in copied and "[1]" in copied

    # A fenced code block in an answer has a copy button of its own: it copies the code alone.
    answer = _ask(browser, "How do I record a lamp change in the lamp log?")
    code = answer.find_element(By.CSS_SELECTOR, ".message-body pre code")
    assert code.get_attribute("textContent") == LOG_COMMAND, answer.text
    copy_code = answer.find_element(By.CSS_SELECTOR, "[data-testid=copy-code]")
    assert copy_code.accessible_name == "Copy code"
    copy_code.click()
    wait.until(lambda _: copy_code.text == "Copied")
    assert _clipboard(browser) == LOG_COMMAND
    _shot(browser, tmp_path, "answer-copy-buttons")

    # --- Rename in the sidebar: Enter saves, the title shows at once and after a reload -------
    more = _item(browser, beacons_id).find_element(
        By.CSS_SELECTOR, "[data-testid=conversation-actions]")
    assert more.accessible_name.startswith("Actions for")
    more.click()
    wait.until(lambda b: _focused_testid(b) == "rename-conversation")

    def open_drawer():
        browser.find_element(By.CSS_SELECTOR, ".sidebar-toggle").click()

    def escape():
        browser.switch_to.active_element.send_keys(Keys.ESCAPE)

    def open_menu_in_drawer():
        open_drawer()
        time.sleep(0.4)
        more.click()

    # (A resize closes the menu: after the phone screenshot it is opened again.)
    _shot(browser, tmp_path, "sidebar-menu", on_phone=open_menu_in_drawer,
          after_phone=lambda: (escape(), escape()))
    if not browser.find_element(By.CSS_SELECTOR, "[data-testid=conversation-menu]").is_displayed():
        more.click()
    # Arrow keys move through the menu; Escape closes it and gives focus back to its button.
    wait.until(lambda b: _focused_testid(b) == "rename-conversation")
    browser.switch_to.active_element.send_keys(Keys.ARROW_DOWN)
    assert _focused_testid(browser) == "share-conversation"
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait.until(lambda b: _focused_testid(b) == "conversation-actions")
    _menu_action(browser, beacons_id, "rename")
    title_input = wait.until(ec.visibility_of_element_located(
        (By.CSS_SELECTOR, "[data-testid=rename-input]")))
    assert _focused_testid(browser) == "rename-input"
    title_input.send_keys(Keys.CONTROL, "a")
    title_input.send_keys("Beacon lamp schedule" + Keys.RETURN)
    wait.until(lambda b: _titles(b)[:1] == ["Beacon lamp schedule"])
    assert _focused_testid(browser) == "conversation-actions"
    # Escape leaves the title as it was.
    _menu_action(browser, beacons_id, "rename")
    title_input = wait.until(ec.visibility_of_element_located(
        (By.CSS_SELECTOR, "[data-testid=rename-input]")))
    title_input.send_keys(" (draft)" + Keys.ESCAPE)
    wait.until(lambda b: not b.find_elements(By.CSS_SELECTOR, "[data-testid=rename-form]"))
    browser.refresh()
    wait.until(lambda b: _titles(b)[:1] == ["Beacon lamp schedule"])

    # --- Share: the dialog gives the link (copied without navigator.clipboard, as over plain
    # http on a LAN) ------------------------------------------------------------------------------
    _menu_action(browser, beacons_id, "share")
    dialog = wait.until(ec.visibility_of_element_located(
        (By.CSS_SELECTOR, "[data-testid=share-dialog]")))
    # Opening the dialog shares nothing yet: the link is made on request.
    assert _focused_testid(browser) == "create-share-link"
    assert not dialog.find_element(By.CSS_SELECTOR, "[data-testid=share-link]").is_displayed()
    dialog.find_element(By.CSS_SELECTOR, "[data-testid=create-share-link]").click()
    link_box = dialog.find_element(By.CSS_SELECTOR, "[data-testid=share-link]")
    wait.until(lambda _: link_box.get_attribute("value").startswith(f"{base}/chat/shared/"))
    share_link = link_box.get_attribute("value")
    assert "every collection it cites" in dialog.text
    assert _focused_testid(browser) == "copy-share-link"
    browser.execute_script(
        "window.kbClipboard = navigator.clipboard;"
        "Object.defineProperty(navigator, 'clipboard', {value: undefined, configurable: true});")
    dialog.find_element(By.CSS_SELECTOR, "[data-testid=copy-share-link]").click()
    wait.until(lambda _: "Copied" in dialog.find_element(
        By.CSS_SELECTOR, "[data-testid=copy-share-link]").text)
    assert _clipboard(browser) == share_link
    _shot(browser, tmp_path, "share-dialog")
    dialog.find_element(By.CSS_SELECTOR, "[data-testid=share-dialog-done]").click()
    wait.until(lambda _: not dialog.is_displayed())
    assert _focused_testid(browser) == "conversation-actions"
    _item(browser, beacons_id).find_element(By.CSS_SELECTOR, "[data-testid=shared-marker]")

    _shot(browser, tmp_path, "sidebar-renamed-shared", on_phone=open_drawer, after_phone=escape)

    # --- The link, opened by a colleague who may read beacons, and by an outsider ---------------
    other = chromium_start()
    try:
        _viewport(other, DESKTOP)
        _sign_in(other, base, COLLEAGUE)
        other.get(share_link)
        messages = WebDriverWait(other, 30).until(lambda b: b.find_elements(
            By.CSS_SELECTOR, "[data-testid=shared-message].message-assistant"))
        assert "400 hours" in messages[0].text
        assert other.find_element(By.CSS_SELECTOR, "[data-testid=shared-title]").text == (
            "Beacon lamp schedule")
        assert "Read-only" in other.find_element(By.TAG_NAME, "main").text
        assert not other.find_elements(By.CSS_SELECTOR, "[data-testid=question-input]")
        # As on the chat page: a citation opens its passage, the answer has a copy button.
        messages[0].find_element(By.CSS_SELECTOR, "[data-testid=citation-link]").click()
        panel = WebDriverWait(other, 10).until(ec.visibility_of_element_located(
            (By.CSS_SELECTOR, "[data-testid=source-panel]")))
        assert "400 hours" in panel.find_element(
            By.CSS_SELECTOR, "[data-testid=source-panel-text]").text
        assert messages[0].find_element(By.CSS_SELECTOR, "[data-testid=copy-answer]")
        _shot(other, tmp_path, "shared-page")

        other.find_element(By.CSS_SELECTOR, "[data-testid=sign-out]").click()
        WebDriverWait(other, 30).until(lambda b: "/accounts/login/" in b.current_url)
        _sign_in(other, base, OUTSIDER)
        other.get(share_link)
        assert other.find_elements(By.CSS_SELECTOR, "[data-testid=shared-denied]")
        assert "400 hours" not in other.page_source

        # --- "Several…": two collections; the answer cites the second one's document ---------
        browser.find_element(By.CSS_SELECTOR, "[data-testid=new-chat-button]").click()
        Select(browser.find_element(By.CSS_SELECTOR, "[data-testid=collection-select]")
               ).select_by_value(":several")
        boxes = wait.until(ec.visibility_of_element_located(
            (By.CSS_SELECTOR, "[data-testid=collection-checkboxes]")))
        for slug in ("beacons", "tides"):
            boxes.find_element(By.CSS_SELECTOR, f"input[value={slug}]").click()
        _shot(browser, tmp_path, "several-chooser")
        answer = _ask(browser, "When is the tide gauge at Pier 7 calibrated?")
        assert "March" in answer.text, answer.text
        cited = {link.get_attribute("title") for link in answer.find_elements(
            By.CSS_SELECTOR, "[data-testid=citation-link]")}
        assert tides_document["title"] in cited, (cited, tides_document)
        several_id = browser.find_element(
            By.CSS_SELECTOR, "[data-testid=conversation-list] [aria-current=true]"
        ).get_attribute("data-id")

        # A conversation reopened from history shows the scope it was asked in.
        select = Select(browser.find_element(By.CSS_SELECTOR, "[data-testid=collection-select]"))
        _item(browser, beacons_id).find_element(By.CSS_SELECTOR, ".conversation").click()
        wait.until(lambda _: select.first_selected_option.get_attribute("value") == "beacons")
        assert not boxes.is_displayed()
        _item(browser, several_id).find_element(By.CSS_SELECTOR, ".conversation").click()
        wait.until(lambda _: select.first_selected_option.get_attribute("value") == ":several")
        assert boxes.is_displayed()
        assert sorted(box.get_attribute("value") for box in boxes.find_elements(
            By.CSS_SELECTOR, "input:checked")) == ["beacons", "tides"]

        # --- Stop sharing: the marker goes, the link no longer opens ---------------------------
        _menu_action(browser, several_id, "share")
        dialog = wait.until(ec.visibility_of_element_located(
            (By.CSS_SELECTOR, "[data-testid=share-dialog]")))
        dialog.find_element(By.CSS_SELECTOR, "[data-testid=create-share-link]").click()
        wait.until(lambda _: link_box.get_attribute("value").startswith(f"{base}/chat/shared/"))
        several_link = link_box.get_attribute("value")
        assert several_link != share_link
        _item(browser, several_id).find_element(By.CSS_SELECTOR, "[data-testid=shared-marker]")
        dialog.find_element(By.CSS_SELECTOR, "[data-testid=stop-sharing]").click()
        wait.until(lambda _: not dialog.is_displayed())
        wait.until(lambda _: not _item(browser, several_id).find_elements(
            By.CSS_SELECTOR, "[data-testid=shared-marker]"))
        assert _focused_testid(browser) == "conversation-actions"
        other.get(several_link)
        assert "not found" in other.page_source.lower()
    finally:
        other.quit()

    # --- Delete: Escape keeps it; confirmed, it leaves the list and stays gone ------------------
    _menu_action(browser, beacons_id, "delete")
    dialog = wait.until(ec.visibility_of_element_located(
        (By.CSS_SELECTOR, "[data-testid=delete-dialog]")))
    assert "Beacon lamp schedule" in dialog.text
    assert _focused_testid(browser) == "cancel-delete"
    _shot(browser, tmp_path, "delete-confirmation")
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait.until(lambda _: not dialog.is_displayed())
    assert _focused_testid(browser) == "conversation-actions"
    assert "Beacon lamp schedule" in _titles(browser)

    _menu_action(browser, beacons_id, "delete")
    wait.until(lambda _: dialog.is_displayed())
    dialog.find_element(By.CSS_SELECTOR, "[data-testid=confirm-delete]").click()
    wait.until(lambda b: "Beacon lamp schedule" not in _titles(b))
    assert not dialog.is_displayed()
    # The open conversation (the one over two collections) is still on the page.
    assert "March" in browser.find_element(By.CSS_SELECTOR, "[data-testid=message-list]").text

    # Deleting the open conversation goes to a new chat.
    _menu_action(browser, several_id, "delete")
    wait.until(lambda _: dialog.is_displayed())
    dialog.find_element(By.CSS_SELECTOR, "[data-testid=confirm-delete]").click()
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".empty-state").is_displayed())
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid=assistant-message]")
    assert _focused_testid(browser) == "question-input"
    browser.refresh()
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".sidebar-status").text
               == "No conversations yet.")
    assert _titles(browser) == []
