"""Login throttling (django-axes) on the admin login and the chat sign-in.

The policy (kb.settings): after AXES_FAILURE_LIMIT failures, the client (its address)
and the account are each locked for the cool-off, whichever was counted; a different
account from a different client is not affected.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db

LOGINS = {"chat": "/accounts/login/", "admin": "/admin/login/"}
LIMIT = 3


@pytest.fixture(autouse=True)
def _throttled(settings):
    settings.AXES_ENABLED = True
    settings.AXES_FAILURE_LIMIT = LIMIT
    settings.AXES_LOCKOUT_PARAMETERS = ["ip_address", "username"]


@pytest.fixture
def accounts(django_user_model):
    return {
        "victim": django_user_model.objects.create_user(
            "victim", password="pw-victim-123", is_staff=True),
        "other": django_user_model.objects.create_user(
            "other", password="pw-other-123", is_staff=True),
    }


def attempt(client, url, username, password, ip):
    return client.post(url, {"username": username, "password": password}, REMOTE_ADDR=ip)


@pytest.mark.parametrize("login", sorted(LOGINS))
def test_wrong_passwords_then_lockout(client, accounts, login):
    """N wrong passwords are answered with the form; the next try, even right, gets 429."""
    url = LOGINS[login]
    for _ in range(LIMIT - 1):
        response = attempt(client, url, "victim", "wrong", "10.0.0.1")
        assert response.status_code == 200
    response = attempt(client, url, "victim", "wrong", "10.0.0.1")
    assert response.status_code == 429
    assert "Too many sign-in attempts" in response.content.decode()
    response = attempt(client, url, "victim", "pw-victim-123", "10.0.0.1")
    assert response.status_code == 429 and "_auth_user_id" not in client.session


@pytest.mark.parametrize("login", sorted(LOGINS))
def test_lockout_is_per_account_and_per_client(client, accounts, login):
    """The locked client cannot try other accounts, the locked account cannot be tried from
    elsewhere, and another account from another client signs in as usual."""
    url = LOGINS[login]
    for _ in range(LIMIT):
        attempt(client, url, "victim", "wrong", "10.0.0.1")
    assert attempt(client, url, "other", "pw-other-123", "10.0.0.1").status_code == 429
    assert attempt(client, url, "victim", "pw-victim-123", "10.0.0.2").status_code == 429
    response = attempt(client, url, "other", "pw-other-123", "10.0.0.3")
    assert response.status_code == 302
    assert client.session["_auth_user_id"] == str(accounts["other"].pk)


def test_the_two_logins_share_one_count(client, accounts):
    """Failures on the chat sign-in and the admin login add up: neither is a side door."""
    for _ in range(LIMIT - 1):
        attempt(client, LOGINS["chat"], "victim", "wrong", "10.0.0.1")
    assert attempt(client, LOGINS["admin"], "victim", "wrong", "10.0.0.1").status_code == 429


def test_failures_below_the_limit_do_not_lock(client, accounts):
    """A few typos and then the right password sign the user in."""
    for _ in range(LIMIT - 1):
        attempt(client, LOGINS["chat"], "victim", "wrong", "10.0.0.1")
    assert attempt(client, LOGINS["chat"], "victim", "pw-victim-123", "10.0.0.1").status_code == 302


def test_pair_policy_locks_only_that_client_on_that_account(client, accounts, settings):
    """With KB_LOGIN_LOCKOUT_PARAMETERS=username+ip_address, the account still signs in from
    another client, and the locked client may still sign in to another account."""
    settings.AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
    for _ in range(LIMIT):
        attempt(client, LOGINS["chat"], "victim", "wrong", "10.0.0.1")
    assert attempt(client, LOGINS["chat"], "victim", "pw-victim-123", "10.0.0.1").status_code == 429
    assert attempt(client, LOGINS["chat"], "other", "pw-other-123", "10.0.0.1").status_code == 302
    client.logout()
    assert attempt(client, LOGINS["chat"], "victim", "pw-victim-123", "10.0.0.2").status_code == 302
