"""The chat page's shell (chat.views.chat_page): its limits, its collection, its controls."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from chat.api import MAX_MESSAGE_CHARS
from chat.models import Conversation
from kb.services.collections import collection_get_or_create

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
