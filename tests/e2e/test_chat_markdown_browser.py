"""In headless Chromium: answers render as Markdown, hostile document text stays inert text,
and a question the documents do not cover says so, with related passages and no citations."""

from __future__ import annotations

import shutil

import pytest

from tests.e2e.test_chat_page_browser import browser  # noqa: F401 (fixture)
from tests.live_server import running_asgi_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("chromedriver"), reason="needs Debian's chromium-driver"),
]

HOSTILE = (
    "The launch policy says that <img src=x onerror=\"window.__xss=1\"> and "
    "<script>window.__xss=2</script> must never run in the launch console.\n\n"
    "The launch policy also links [the console](javascript:window.__xss=3) and "
    "<a href=\"javascript:window.__xss=4\">this page</a> as plain text.\n"
)
CONSOLE = (
    "# Console\n\n"
    "To start the launch console, run the following command:\n\n"
    "```\n"
    "launch-console --mode=safe \\\n"
    "    --policy=/etc/launch.conf\n"
    "```\n"
)


def _ask(driver, wait, question: str):
    from selenium.webdriver.common.by import By

    # The previous answer's stream must have closed (Send enabled again) before asking.
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "[data-testid=send-button]").is_enabled())
    before = len(driver.find_elements(By.CSS_SELECTOR, "[data-testid=assistant-message]"))
    box = driver.find_element(By.CSS_SELECTOR, "[data-testid=question-input]")
    box.send_keys(question)
    driver.find_element(By.CSS_SELECTOR, "[data-testid=send-button]").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "[data-testid=assistant-message]"))
               > before)
    answer = driver.find_elements(By.CSS_SELECTOR, "[data-testid=assistant-message]")[-1]
    wait.until(lambda _: answer.get_attribute("data-status") in {"complete", "error"})
    assert answer.get_attribute("data-status") == "complete", answer.text
    return answer


@pytest.mark.django_db(transaction=True)
def test_hostile_markdown_renders_inert_and_out_of_scope_is_not_covered(
    browser, settings, django_user_model, client, tmp_path,  # noqa: F811
):
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
    documents_upload(collection=collection, filename="launch-policy.txt", data=HOSTILE.encode())
    documents_upload(collection=collection, filename="console.md", data=CONSOLE.encode())
    django_user_model.objects.create_user("reader", password="pw-reader-123")
    client.login(username="reader", password="pw-reader-123")
    session_cookie = client.cookies["sessionid"].value

    with running_asgi_server() as base:
        browser.get(f"{base}/healthz")
        browser.add_cookie({"name": "sessionid", "value": session_cookie, "path": "/"})
        browser.get(f"{base}/chat/")
        wait = WebDriverWait(browser, 60)
        wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid=question-input]")))

        answer = _ask(browser, wait, "What must never run in the launch console policy?")
        body = answer.find_element(By.CSS_SELECTOR, ".message-body")
        assert "<img src=x" in body.text and "<script>" in body.text
        assert body.find_elements(By.CSS_SELECTOR, "img, script, iframe") == []
        links = body.find_elements(By.CSS_SELECTOR, "a")
        assert links and all("cite" in (a.get_attribute("class") or "").split() for a in links)
        assert not [a for a in links if (a.get_attribute("href") or "").startswith("javascript")]
        assert browser.execute_script("return window.__xss") is None
        browser.save_screenshot(str(tmp_path / "chat-markdown.png"))
        # The extracted label appears once: the answer text does not repeat it.
        assert len(answer.find_elements(By.CSS_SELECTOR, "[data-testid=mode-label]")) == 1
        assert "not generated" not in body.text.lower()
        assert body.find_elements(By.CSS_SELECTOR, "[data-testid=citation-link]")

        code_answer = _ask(browser, wait, "How do I start the launch console command?")
        code = code_answer.find_element(By.CSS_SELECTOR, ".message-body pre code")
        assert code.text.strip().startswith("launch-console --mode=safe")
        assert "--policy=/etc/launch.conf" in code.text
        browser.save_screenshot(str(tmp_path / "chat-code.png"))

        # A new conversation: in this one it would be a follow-up, searched with the question
        # before.
        browser.find_element(By.CSS_SELECTOR, "[data-testid=new-chat-button]").click()
        not_covered = _ask(browser, wait, "Capital of Mongolia?")
        assert "do not cover" in not_covered.text
        assert not_covered.find_elements(By.CSS_SELECTOR, "[data-testid=citation-link]") == []
        related = not_covered.find_element(By.CSS_SELECTOR, "[data-testid=related-sources]")
        assert ("launch-policy" in related.text.lower()
                or related.find_elements(By.CSS_SELECTOR, "button"))
        assert browser.execute_script("return window.__xss") is None
        browser.save_screenshot(str(tmp_path / "chat-markdown.png"))
