"""The chat users' sign-in and sign-out pages (/accounts/login/, /accounts/logout/)."""

from __future__ import annotations

import re

import pytest
from django.conf import settings

pytestmark = pytest.mark.django_db


@pytest.fixture
def reader(django_user_model):
    return django_user_model.objects.create_user("reader", password="pw-reader-123")


def test_anonymous_chat_goes_to_the_site_sign_in(client):
    """/chat/ sends an anonymous visitor to the site's sign-in page, not the admin's."""
    response = client.get("/chat/")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/chat/"
    page = client.get(response["Location"]).content.decode()
    assert 'name="username"' in page and 'name="password"' in page
    assert "staff account" not in page and 'href="/static/kb/site.css"' in page


def test_ordinary_user_signs_in_and_lands_on_the_chat(client, reader):
    """A non-staff active user signs in, lands on /chat/ and can use it."""
    response = client.post("/accounts/login/", {"username": "reader", "password": "pw-reader-123"})
    assert response.status_code == 302 and response["Location"] == "/chat/"
    page = client.get("/chat/")
    assert page.status_code == 200
    assert 'data-testid="sign-out"' in page.content.decode()


def test_next_is_honoured_only_when_it_is_on_this_site(client, reader):
    """`next` brings the user back to the page they asked for; another host is ignored."""
    credentials = {"username": "reader", "password": "pw-reader-123"}
    response = client.post("/accounts/login/", {**credentials, "next": "/chat/?collection=docs"})
    assert response["Location"] == "/chat/?collection=docs"
    client.logout()
    response = client.post("/accounts/login/", {**credentials, "next": "https://evil.example/"})
    assert response["Location"] == "/chat/"


def test_wrong_password_says_so_on_the_page(client, reader):
    """A wrong password re-renders the form with an error and the username kept."""
    response = client.post("/accounts/login/", {"username": "reader", "password": "nope"})
    assert response.status_code == 200
    page = response.content.decode()
    assert 'data-testid="login-error"' in page and 'value="reader"' in page


def test_inactive_user_cannot_sign_in(client, django_user_model):
    """A deactivated account is refused."""
    django_user_model.objects.create_user("gone", password="pw-gone-1234", is_active=False)
    response = client.post("/accounts/login/", {"username": "gone", "password": "pw-gone-1234"})
    assert response.status_code == 200 and "_auth_user_id" not in client.session


def test_sign_out_is_a_post_and_ends_the_session(client, reader):
    """The sign-out control posts to /accounts/logout/; afterwards /chat/ asks to sign in."""
    client.force_login(reader)
    page = client.get("/chat/").content.decode()
    form = re.search(r'<form method="post" action="([^"]+)" class="sign-out-form">', page)
    assert form and form.group(1) == "/accounts/logout/"
    assert client.get("/accounts/logout/").status_code == 405
    response = client.post("/accounts/logout/")
    assert response.status_code == 302 and response["Location"] == "/accounts/login/"
    assert client.get("/chat/").status_code == 302


def test_login_url_is_the_site_sign_in():
    """LOGIN_URL names the site's sign-in page, so every login_required view goes there."""
    assert settings.LOGIN_URL == "login"


def test_favicon_is_served_from_static(client):
    """Every page links a same-origin favicon, and /favicon.ico leads to it."""
    page = client.get("/").content.decode()
    assert '<link rel="icon" href="/static/kb/favicon.svg"' in page
    response = client.get("/favicon.ico")
    assert response.status_code == 301 and response["Location"] == "/static/kb/favicon.svg"


def test_admin_link_is_for_staff_only(client, reader, django_user_model):
    """Only staff see the Admin link: a chat user or a signed-out visitor would be refused."""
    client.force_login(reader)
    assert 'href="/admin/"' not in client.get("/chat/").content.decode()
    client.force_login(django_user_model.objects.create_user("ed", password="pw-ed-12345",
                                                             is_staff=True))
    assert 'href="/admin/"' in client.get("/chat/").content.decode()
    client.logout()
    assert '<a href="/admin/">Admin</a>' not in client.get("/accounts/login/").content.decode()
