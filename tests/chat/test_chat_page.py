"""The chat page's shell (chat.views.chat_page): its limits, its collection, its controls."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from chat.api import MAX_MESSAGE_CHARS
from chat.models import Conversation
from kb.models import Collection
from kb.services.collections import collection_delete, collection_get_or_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def reader(django_user_model):
    return django_user_model.objects.create_user("reader", password="pw-reader-123")


@pytest.fixture
def page(reader):
    def _page() -> str:
        client = Client()
        client.force_login(reader)
        response = client.get("/chat/")
        assert response.status_code == 200
        return response.content.decode()

    return _page


def selected_collection(html: str) -> str:
    return re.search(r'<option value="([^"]*)" selected>', html).group(1)


def test_question_box_shows_the_server_limit(page):
    """A counter shows the API's limit; the textarea has no maxlength, which would cut a long
    paste silently (the page warns and holds the question back instead)."""
    html = page()
    assert "maxlength" not in html.split('id="question-input"')[1].split(">")[0]
    assert f'data-testid="question-counter"\n         data-max="{MAX_MESSAGE_CHARS}"' in html
    assert f"0 / {MAX_MESSAGE_CHARS} characters" in html


def test_page_starts_on_the_collection_last_used(page, reader):
    """The collection of the user's latest conversation is preselected, not Demo."""
    demo = collection_get_or_create(slug="demo", name="Demo")
    collection_get_or_create(slug="handbook", name="Handbook")
    team = collection_get_or_create(slug="team", name="Team")
    assert selected_collection(page()) == "demo"

    Conversation.objects.create(user=reader, collection=demo, title="older")
    Conversation.objects.create(user=reader, collection=team, title="latest")
    assert selected_collection(page()) == "team"


def test_last_used_collection_no_longer_visible_is_not_offered(page, reader):
    """A last-used collection the user may no longer read falls back to the usual default."""
    collection_get_or_create(slug="demo", name="Demo")
    gone = collection_get_or_create(slug="secret", name="Secret")
    Conversation.objects.create(user=reader, collection=gone, title="before the change")
    gone.is_public = False
    gone.save()
    html = page()
    assert selected_collection(html) == "demo" and 'value="secret"' not in html


def test_page_has_a_sign_out_control(page):
    """The signed-in user's name and a sign-out button are in the page header."""
    html = page()
    assert 'data-testid="signed-in-user">reader<' in html
    assert 'data-testid="sign-out"' in html


def test_history_status_sits_under_the_heading(page):
    """'No conversations yet.' (the sidebar status) comes right under the History heading,
    not after the list, which fills the sidebar's height."""
    html = page()
    heading = html.index('id="history-title"')
    assert heading < html.index('class="sidebar-status') < html.index(
        'data-testid="conversation-list"')


def options(html: str) -> list[tuple[str, str]]:
    select = html.split('id="collection-select"', 1)[1].split("</select>")[0]
    return re.findall(r'<option value="([^"]*)"[^>]*>([^<]*)</option>', select)


def test_scope_options_follow_the_collections(page):
    """After the collections come "All my collections" and, with two or more, "Several…" and
    its checkboxes (one per collection); with none there is nothing to choose."""
    for collection in Collection.objects.all():  # the migrations' default collection
        collection_delete(collection=collection)
    assert options(page()) == [("", "No collections")]
    assert 'data-testid="collection-checkboxes"' not in page()

    collection_get_or_create(slug="demo", name="Demo")
    assert options(page()) == [("demo", "Demo"), (":all", "All my collections")]
    assert 'data-testid="collection-checkboxes"' not in page()

    collection_get_or_create(slug="team", name="Team")
    html = page()
    assert options(html) == [("demo", "Demo"), ("team", "Team"), (":all", "All my collections"),
                             (":several", "Several…")]
    boxes = html.split('data-testid="collection-checkboxes"', 1)[1].split("</fieldset>")[0]
    assert re.findall(r'type="checkbox" name="collections" value="([^"]+)"', boxes) == [
        "demo", "team"]


def test_conversation_actions_are_labelled_buttons_and_dialogs(page):
    """Rename, share and delete are buttons of a labelled menu; sharing and deleting happen in
    real <dialog>s, labelled by their headings; "Show more" waits, hidden, for a next page."""
    html = page()
    menu = html.split('id="conversation-menu"', 1)[1].split("</div>")[0]
    assert 'role="menu"' in menu and 'aria-label="Conversation actions"' in menu
    assert re.findall(r'<button type="button" role="menuitem"[^>]*>([^<]+)</button>', menu) == [
        "Rename", "Share…", "Delete…"]
    for dialog in ("share-dialog", "delete-dialog"):
        assert re.search(rf'<dialog id="{dialog}" [^>]*aria-labelledby="{dialog}-title"', html)
        assert f'id="{dialog}-title"' in html
    assert "Only people who may read every collection it cites can open it." in html
    assert re.search(r'<button type="button" class="show-more"[^>]*hidden>Show more</button>',
                     html)
