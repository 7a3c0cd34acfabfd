"""An ordinary (non-staff) user allowed on one restricted collection signs in, asks a question
its document answers, sees the answer stream in with citations, and is told plainly when the
documents do not cover a question."""

from __future__ import annotations

import pytest

from tests.acceptance.conftest import READER, RESTRICTED, SAMPLES, documents_wait_ready

pytestmark = pytest.mark.slow

# Records every status an answer goes through, as the page sets it.
_WATCH_STATUSES = """
window.kbStatuses = [];
new MutationObserver((records) => {
  for (const record of records) {
    const node = record.target;
    if (node.dataset && node.dataset.testid === "assistant-message") {
      window.kbStatuses.push([node.dataset.status, node.innerText.length]);
    }
  }
}).observe(document.querySelector("[data-testid=message-list]"),
           {subtree: true, attributes: true, attributeFilter: ["data-status"]});
"""


def _ask(browser, question: str, index: int):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.CSS_SELECTOR, "[data-testid=question-input]").send_keys(question)
    browser.find_element(By.CSS_SELECTOR, "[data-testid=send-button]").click()
    wait = WebDriverWait(browser, 120)
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR,
                                             "[data-testid=assistant-message]")) > index)
    answer = browser.find_elements(By.CSS_SELECTOR, "[data-testid=assistant-message]")[index]
    wait.until(lambda _: answer.get_attribute("data-status") in {"complete", "error", "stopped"})
    assert answer.get_attribute("data-status") == "complete", answer.text
    return answer


def test_non_staff_user_signs_in_and_gets_cited_answers_and_a_plain_not_covered(
        kb_server, browser, tmp_path):
    """Sign-in page → /chat/ → a streamed answer citing the restricted collection's PDF; an
    out-of-scope question gets an answer saying the documents do not cover it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with kb_server.api() as api:
        response = api.post("/api/v1/documents/", data={"collection": RESTRICTED},
                            files=[("file", ("manual.pdf", (SAMPLES / "manual.pdf").read_bytes()))])
    assert response.status_code == 202, response.text
    documents_wait_ready(kb_server, collection=RESTRICTED, count=1)

    browser.get(f"{kb_server.base}/accounts/login/")
    browser.find_element(By.NAME, "username").send_keys(READER[0])
    browser.find_element(By.NAME, "password").send_keys(READER[1] + Keys.RETURN)
    WebDriverWait(browser, 30).until(lambda b: b.current_url.rstrip("/").endswith("/chat"))

    Select(browser.find_element(By.CSS_SELECTOR, "[data-testid=collection-select]")
           ).select_by_value(RESTRICTED)
    browser.execute_script(_WATCH_STATUSES)
    answer = _ask(browser, "What must never be opened while the pumps are running?", 0)
    assert "valve chamber" in answer.text.lower(), answer.text
    citations = answer.find_elements(By.CSS_SELECTOR, "[data-testid=citation-link]")
    assert citations, answer.text
    statuses = [status for status, _ in browser.execute_script("return window.kbStatuses;")]
    assert statuses[:1] == ["streaming"] and statuses[-1] == "complete", statuses
    browser.save_screenshot(str(tmp_path / "chat-answer.png"))

    not_covered = _ask(browser, "zxqv blorptang", 1)
    assert "do not cover" in not_covered.text.lower(), not_covered.text
    browser.save_screenshot(str(tmp_path / "chat-not-covered.png"))
